"""Least-squares refit of the output projections after a structured cut (``compress.reconstruct``).

Cutting MLP channels or attention heads removes their contribution to the layer's output. On a trained model
the removed channels are correlated with the kept ones, so much of that contribution can be folded back into
the kept weights: for a projection ``y = W x`` (``down_proj`` of the MLP, ``o_proj`` of attention) whose input
channels are split into kept ``K`` and removed ``R``, the kept weights that best reproduce the base's output on
calibration tokens (least squares over tokens) are

    W'_K = W_K + W_R G_RK (G_KK + lambda I)^-1,     G = sum over tokens of x x^T  (the input's Gram matrix)

where ``lambda`` is ``damp`` times the mean diagonal of ``G_KK`` (GPTQ's dampening: a channel that is nearly a
combination of others must not get huge weights). This is the closed-form structured version of what SparseGPT /
OBS do per weight and of FLAP's bias compensation (which keeps only the mean); the cut itself still follows the
importance scores, the refit only moves the kept weights. It costs one forward pass over the calibration blocks
(the Gram matrices) and one small solve per cut projection; nothing is trained.

Measured on SmolLM2-135M at 60% of its size (searched shape 576 / MLP 776 / 6-2 heads / 27 layers, activation
importance, 32 calibration blocks of the student's own shard; BENCHMARKS.md, "The real model"): pooled loss right
after pruning 5.105 -> 4.68 (code student), 5.471 -> 4.82 (docs).

The Gram matrices are taken on the model being cut (the base, or the previous round's student), once per
student: a layer's input in the student differs from the base's after earlier layers were cut or dropped, so the
refit is one-shot, not sequential. Memory: per layer ``I^2 + (H * head_dim)^2`` floats (SmolLM2-135M: 0.32 GB per
student; LLaMA-3-8B: 28 GB per student, held on the model's device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from downscale.pruning.structure import decoder_layers


@dataclass
class Grams:
    """Per layer of the model they were taken on: Gram matrices of the inputs of ``down_proj`` ([I, I]) and
    ``o_proj`` ([H * head_dim, H * head_dim]), summed over ``tokens`` calibration tokens (float32)."""

    mlp: list[torch.Tensor]
    attn: list[torch.Tensor]
    tokens: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.mlp, *self.attn))


@torch.no_grad()
def collect_grams(model, blocks: np.ndarray, batch_size: int, device: torch.device, amp: torch.dtype | None = None,
                  desc: str = "gram matrices") -> Grams:
    """One forward pass of the decoder over ``blocks`` [N, T] with hooks that sum ``x x^T`` of every
    ``down_proj`` and ``o_proj`` input (float32, on the model's device)."""
    from downscale.models import autocast
    from downscale.pruning.importance import calibration_batches

    layers = decoder_layers(model)
    c = model.config
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    mlp = [torch.zeros(c.intermediate_size, c.intermediate_size, device=device) for _ in layers]
    attn = [torch.zeros(c.num_attention_heads * head_dim, c.num_attention_heads * head_dim, device=device)
            for _ in layers]

    def hook(acc: torch.Tensor):
        def add(mod, args):
            x = args[0].detach().flatten(0, -2).float()
            acc.addmm_(x.T, x)
        return add

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(mlp[i])))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(attn[i])))
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for x in calibration_batches(blocks, batch_size, device, desc):
            tokens += x.numel()
            with autocast(device, amp):
                model.get_decoder()(input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration blocks")
    return Grams(mlp, attn, tokens)


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """The kept input columns of ``weight`` [out, in] refit so that ``W'_K x_K`` best matches ``W x`` over the
    tokens ``gram`` [in, in] was summed on (see the module docstring); ``keep`` ascending indices into ``in``.
    Returns a new [out, len(keep)] tensor in ``weight``'s dtype; with nothing removed, the kept columns.

    Solved by a Cholesky factorisation of the damped G_KK (positive definite: a Gram matrix plus a ridge) in the
    Gram's precision (float32 in the stage); where that is not enough (the factorisation fails) in float64. The
    shape search refits every candidate, so this solve is most of its time: the float32 Cholesky is ~2x the
    float64 general solve, with the same reconstruction error to 7 digits (measured at SmolLM2's MLP width)."""
    n = weight.shape[1]
    keep = keep.to(gram.device)
    mask = torch.ones(n, dtype=torch.bool, device=gram.device)
    mask[keep] = False
    removed = torch.nonzero(mask).flatten()
    w = weight.detach().to(gram.device)
    if removed.numel() == 0:
        return w[:, keep].to(weight.device).clone()
    out = None
    first = torch.promote_types(gram.dtype, torch.float32)  # the stage's Grams are float32
    for dtype in dict.fromkeys((first, torch.float64)):
        g = gram.to(dtype)
        g_kk = g[keep][:, keep]
        mean_diag = float(g_kk.diagonal().mean())
        lam = damp * mean_diag if mean_diag > 0 else 1.0
        g_kk.diagonal().add_(lam)
        rhs = g[keep][:, removed] @ w[:, removed].to(dtype).T  # [K, out]
        chol, info = torch.linalg.cholesky_ex(g_kk)
        if int(info) != 0:
            continue
        out = w[:, keep].to(dtype) + torch.cholesky_solve(rhs, chol).T
        if torch.isfinite(out).all():
            break
        out = None
    if out is None:  # a degenerate Gram (no tokens reach these channels): keep the plain cut
        return w[:, keep].to(weight.device).clone()
    return out.to(weight.dtype).to(weight.device)


@torch.no_grad()
def refit_student(student, source, keep, grams: Grams, damp: float = 0.01) -> int:
    """Refit every kept layer's ``down_proj`` (when MLP channels were cut) and ``o_proj`` (when query heads were
    cut) of ``student``, cut from ``source`` with ``keep`` (surgery.Keep), from ``source``'s ``grams``. Replaces the
    student's weight tensors (never writes into ``source``'s, which a scored-only student may share). Returns how
    many projections were refit."""
    from downscale.pruning.surgery import _expand

    c = source.config
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    src_layers, dst_layers = decoder_layers(source), decoder_layers(student)
    cut_hidden = len(keep.hidden) < c.hidden_size
    done = 0
    for j, i in enumerate(keep.layers):
        pairs = []
        if len(keep.mlp[j]) < c.intermediate_size:
            pairs.append((src_layers[i].mlp.down_proj, dst_layers[j].mlp.down_proj, grams.mlp[i], keep.mlp[j]))
        if len(keep.heads[j]) < c.num_attention_heads:
            pairs.append((src_layers[i].self_attn.o_proj, dst_layers[j].self_attn.o_proj, grams.attn[i],
                          _expand(keep.heads[j], head_dim)))
        for src, dst, gram, cols in pairs:
            w = src.weight
            if cut_hidden:
                w = w.index_select(0, keep.hidden.to(w.device))
            new = refit_columns(w, gram, cols, damp)
            if tuple(new.shape) != tuple(dst.weight.shape):
                raise RuntimeError(f"refit of layer {j}: {tuple(new.shape)} != {tuple(dst.weight.shape)}")
            dst.weight = torch.nn.Parameter(new, requires_grad=dst.weight.requires_grad)
            done += 1
    return done


__all__ = ["Grams", "collect_grams", "refit_columns", "refit_student"]
