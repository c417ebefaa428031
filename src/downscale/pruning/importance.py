"""Importance scores of every prunable unit: MLP channels, query heads, KV heads, hidden channels, layers.

Three methods (``compress.importance``):

- ``magnitude``: the squared L2 norm of every weight slice a unit owns (``structure.RULES``).
- ``activation`` (Minitron, Muralidharan et al. 2024): on calibration blocks, mean |activation|
  of each MLP channel (the input of down_proj), the mean L2 norm of each head's output (the input
  of o_proj, per head), hidden channels from the RMSNorm outputs, mean |x| summed over all norms,
  and layer importance = mean over tokens of 1 - cosine(layer input, layer output) (ShortGPT's
  block influence).
- ``taylor``: first-order Taylor, sum over calibration batches of |grad x weight| over every weight
  slice a unit owns (the gradient of the mean next-token loss). Each gradient is reduced to unit
  scores the moment it is accumulated and then freed, so an 8B model never holds a full gradient.
  MLP channels, query heads and layers are scored instead by the first-order estimate of removing the unit's
  output, token by token, summed over tokens (``_Removal``): |g x a| of an MLP channel's down_proj input,
  |<g, o_h>| of a head's slice of the o_proj input, |<dL/d h_out, h_out - h_in>| of a layer's residual update
  (KV groups then use their query heads, as with activation). On SmolLM2-135M the weight sums ranked the last
  layers (21, 24-28) least important (30 -> 24 layers: held-out loss 14.6 nats; by the removal estimate 3.27, by
  the activation method's block influence 3.31) and cut MLP channels worse (MLP-only 0.6: 5.70 vs 4.87);
  BENCHMARKS.md "Taylor importance on the real model". Hidden channels keep the |grad x weight| sums.

- ``random``: seeded uniform random scores for every unit (a baseline: what a real method buys over it).

``magnitude`` can be worse than random on a trained LLM: it ignores the scale of each weight's input, and
trained LLaMAs route a few "massive activation" hidden channels through tiny weights (SmolLM2-135M: of the 8
hidden channels with the largest mean |activation|, two rank 573rd and 575th of 576 by weight magnitude, so
magnitude pruning removes them first; its MLP scores are uncorrelated with activation, Spearman 0.00, and its
head scores anti-correlated, -0.37). It is kept as the classic baseline, with a warning when chosen.

Every calibration pass also records each RMSNorm's input mean square per channel (``norm_ms``),
which the hidden-size surgery uses to rescale norm weights. Scores are small (a few vectors per
layer) and are cached as safetensors (see ``save_scores`` / ``load_scores``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from downscale.pruning.structure import RULES, decoder_layers, norm_modules, parse_name

METHODS = ("magnitude", "activation", "taylor", "random")


@dataclass
class Scores:
    """Unit scores in the indexing of the model they were computed on (higher = more important)."""

    method: str
    mlp: torch.Tensor  # [L, I]
    heads: torch.Tensor  # [L, H]
    kv: torch.Tensor  # [L, KV]: a KV head's own k/v weights (0 for activation: groups use their heads)
    hidden: torch.Tensor  # [D]
    layers: torch.Tensor  # [L]
    norm_ms: torch.Tensor | None = None  # [2L+1, D]: mean square of each RMSNorm's input per channel
    meta: dict[str, str] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k).contiguous() for k in ("mlp", "heads", "kv", "hidden", "layers")}
        if self.norm_ms is not None:
            out["norm_ms"] = self.norm_ms.contiguous()
        return out


def _empty(model, method: str) -> Scores:
    c = model.config
    n_layers, hidden = c.num_hidden_layers, c.hidden_size
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731 - float64 sums over many tokens
    return Scores(method, z(n_layers, c.intermediate_size), z(n_layers, c.num_attention_heads),
                  z(n_layers, c.num_key_value_heads), z(hidden), z(n_layers))


def _head_dim(model) -> int:
    c = model.config
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _accumulate(scores: Scores, name: str, t: torch.Tensor, head_dim: int,
                units: tuple[str, ...] = ("mlp", "heads", "kv", "hidden", "layers")) -> None:
    """Add the element scores ``t`` (same shape as parameter ``name``) to those of the ``units`` that own them."""
    layer, leaf = parse_name(name)
    owners = {u: axis for u, axis in RULES[leaf].items() if u in units}
    if not owners and "layers" not in units:
        return
    t = t.float()
    for unit, axis in owners.items():
        other = [d for d in range(t.dim()) if d != axis]
        vec = (t.sum(dim=other) if other else t).double().cpu()
        if unit in ("heads", "kv"):
            vec = vec.view(-1, head_dim).sum(1)
        if unit == "hidden":
            scores.hidden += vec
        else:
            getattr(scores, unit)[layer] += vec
    if "layers" in units and layer is not None:
        scores.layers[layer] += float(t.sum())


@torch.no_grad()
def random_scores(model, seed: int) -> Scores:
    """Uniform random scores in [0, 1) for every unit, from ``seed`` (the same seed, the same choice)."""
    scores = _empty(model, "random")
    gen = torch.Generator().manual_seed(int(seed))
    for name in ("mlp", "heads", "kv", "hidden", "layers"):
        t = getattr(scores, name)
        setattr(scores, name, torch.rand(t.shape, generator=gen, dtype=torch.float64))
    return scores


@torch.no_grad()
def magnitude_scores(model) -> Scores:
    """Squared L2 norm of each unit's weight slices (a tied embedding counted once)."""
    scores = _empty(model, "magnitude")
    hd = _head_dim(model)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        _accumulate(scores, name, p.float().square(), hd)
    return scores


class _Hooks:
    """Forward hooks that collect activation scores and norm input statistics. They sum on the model's device
    (float64) and ``flush`` adds the sums to the scores once, at the end: no device-to-host copy per layer and
    batch (on a GPU each would stop the host from queueing the next kernels)."""

    def __init__(self, model, scores: Scores):
        self.scores, self.handles = scores, []
        self.acc: dict[tuple, torch.Tensor] = {}
        hd = _head_dim(model)
        self.ms = torch.zeros(2 * model.config.num_hidden_layers + 1, model.config.hidden_size, dtype=torch.float64)
        for i, layer in enumerate(decoder_layers(model)):
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._mlp(i)))
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._heads(i, hd)))
            self.handles.append(layer.register_forward_hook(self._layer(i), with_kwargs=True))
        for row, norm in enumerate(norm_modules(model)):
            self.handles.append(norm.register_forward_hook(self._norm(row)))

    def _add(self, key: tuple, value: torch.Tensor) -> None:
        value = value.double()
        cur = self.acc.get(key)
        self.acc[key] = value.clone() if cur is None else cur.add_(value)

    def flush(self) -> None:
        """Add the device sums to the scores (CPU) and start again."""
        for (kind, i), v in self.acc.items():
            v = v.cpu()
            if kind == "layers":
                self.scores.layers[i] += float(v)
            elif kind == "ms":
                self.ms[i] += v
            elif kind == "hidden":
                self.scores.hidden += v
            else:  # mlp, heads
                getattr(self.scores, kind)[i] += v
        self.acc.clear()

    def _mlp(self, i):
        def hook(mod, args):
            x = args[0].detach()  # [B, T, I]
            self._add(("mlp", i), x.float().abs().sum(dim=(0, 1)))
        return hook

    def _heads(self, i, hd):
        def hook(mod, args):
            x = args[0].detach()  # [B, T, H * hd]
            per_head = x.float().view(*x.shape[:-1], -1, hd).norm(dim=-1)  # [B, T, H]
            self._add(("heads", i), per_head.sum(dim=(0, 1)))
        return hook

    def _layer(self, i):
        def hook(mod, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)
            self._add(("layers", i), (1 - cos).sum())
        return hook

    def _norm(self, row):
        def hook(mod, args, out):
            x = args[0].detach().float()  # [B, T, D]
            self._add(("ms", row), x.square().sum(dim=(0, 1)))
            self._add(("hidden", 0), out.detach().float().abs().sum(dim=(0, 1)))
        return hook

    def remove(self):
        self.flush()
        for h in self.handles:
            h.remove()


class _Removal:
    """Taylor's scores of MLP channels, query heads and layers: the first-order change of the loss, token by token,
    if the unit's output were removed, summed over tokens: per MLP channel |g x a| of its down_proj input a, per
    query head |<g, o_h>| of its slice o_h of the o_proj input, per layer |<dL/d h_out, h_out - h_in>| (its residual
    update). Forward hooks keep each input (detached) and hook the gradient that reaches it; the sums stay on the
    model's device until ``flush``."""

    def __init__(self, model, head_dim: int):
        c = model.config
        self.shapes = {"mlp": (c.num_hidden_layers, c.intermediate_size),
                       "heads": (c.num_hidden_layers, c.num_attention_heads), "layers": (c.num_hidden_layers,)}
        self.sums: dict[str, torch.Tensor] = {}
        self.head_dim = head_dim
        self.handles = []
        for i, layer in enumerate(model.get_decoder().layers):
            self.handles.append(layer.register_forward_hook(self._layer(i), with_kwargs=True))
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._input(i, "mlp")))
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._input(i, "heads")))

    def _add(self, unit: str, i: int, v: torch.Tensor) -> None:
        if unit not in self.sums:
            self.sums[unit] = torch.zeros(self.shapes[unit], dtype=torch.float64, device=v.device)
        self.sums[unit][i] += v

    def _input(self, i: int, unit: str):
        def hook(module, args):
            x = args[0]
            if not x.requires_grad:
                return
            kept = x.detach()

            def on_grad(g):
                prod = g.float() * kept.float()  # [B, T, C]
                if unit == "heads":
                    prod = prod.view(*prod.shape[:-1], -1, self.head_dim).sum(-1)  # [B, T, H]
                self._add(unit, i, prod.abs().flatten(0, -2).sum(0, dtype=torch.float64))

            x.register_hook(on_grad)
        return hook

    def _layer(self, i: int):
        def hook(module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            if not h_out.requires_grad:
                return
            update = (h_out - h_in).detach()

            def on_grad(g):
                self._add("layers", i, (g.float() * update.float()).sum(-1).abs().sum(dtype=torch.float64))

            h_out.register_hook(on_grad)
        return hook

    def flush(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.sums[u].cpu() if u in self.sums else torch.zeros(self.shapes[u], dtype=torch.float64)
                     for u in ("mlp", "heads", "layers"))


def calibration_batches(blocks: np.ndarray, batch_size: int, device: torch.device, desc: str):
    """Batches [b, T] of ``blocks`` as int64 tensors on ``device``, with a progress bar (off with
    DOWNSCALE_NO_PROGRESS=1): the one pass over calibration text that scoring and the Gram matrices share."""
    from downscale import progress

    bar = progress.bar(range(0, len(blocks), batch_size), desc=desc, unit="batch", leave=False)
    for start in bar:
        yield torch.as_tensor(np.asarray(blocks[start:start + batch_size], dtype=np.int64), device=device)


def calibration_scores(model, blocks: np.ndarray, method: str, batch_size: int, device: torch.device,
                       amp: torch.dtype | None = None, desc: str = "calibration", seed: int = 0) -> Scores:
    """Scores from one pass over calibration ``blocks`` [N, T] (token ids) in batches.

    ``activation``, ``magnitude`` and ``random`` run forward only (magnitude and random use the pass only for the
    norm statistics; random draws its scores from ``seed``); ``taylor`` also runs backward and reduces each
    gradient to unit scores as it lands. Every method returns ``norm_ms``.
    """
    from downscale.models import autocast

    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; one of {', '.join(METHODS)}")
    act = _empty(model, "activation")
    hooks = _Hooks(model, act)
    taylor = _empty(model, "taylor") if method == "taylor" else None
    grad_hooks, saved_flags = [], {}
    was_training = model.training
    model.eval()
    if taylor is not None:
        hd = _head_dim(model)
        seen = set()
        for name, p in model.named_parameters():
            saved_flags[name] = p.requires_grad
            if id(p) in seen:
                continue
            seen.add(id(p))
            p.requires_grad_(True)

            def on_grad(param, name=name):
                _accumulate(taylor, name, (param.grad.float() * param.detach().float()).abs(), hd, units=("hidden",))
                param.grad = None  # freed at once: never a full set of gradients in memory

            grad_hooks.append(p.register_post_accumulate_grad_hook(on_grad))
        removal = _Removal(model, hd)
        grad_hooks.extend(removal.handles)
    tokens = 0
    try:
        for x in calibration_batches(blocks, batch_size, device, desc):
            tokens += x.numel()
            if taylor is None:
                # the decoder only: the LM head's [B, T, V] logits are not needed for any score
                with torch.no_grad(), autocast(device, amp):
                    model.get_decoder()(input_ids=x, use_cache=False)
            else:
                # next-token CE from the final hidden states, the head applied chunk by chunk (fused)
                from downscale.kd import distill_loss

                with autocast(device, amp):
                    hidden = model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state
                    loss, _ = distill_loss(hidden[:, :-1].flatten(0, 1), model.get_output_embeddings().weight,
                                           x[:, 1:].flatten(), None, kd_ratio=0.0)
                loss.backward()
    finally:
        hooks.remove()
        for h in grad_hooks:
            h.remove()
        for name, p in model.named_parameters():
            if name in saved_flags:
                p.requires_grad_(saved_flags[name])
            p.grad = None
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration blocks")
    for name in ("mlp", "heads", "hidden", "layers"):
        setattr(act, name, getattr(act, name) / tokens)
    norm_ms = hooks.ms / tokens
    if method == "activation":
        out = act
    elif method == "taylor":
        out = taylor
        out.mlp, out.heads, out.layers = removal.flush()
    elif method == "random":
        out = random_scores(model, seed)
    else:
        out = magnitude_scores(model)
    out.norm_ms = norm_ms
    out.meta = {"tokens": str(tokens), "blocks": str(len(blocks))}
    return out


def save_scores(scores: Scores, path: str | Path) -> None:
    """Write scores as safetensors (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(scores.tensors(), str(tmp), metadata={"method": scores.method, **scores.meta})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_scores(path: str | Path) -> Scores:
    """Read scores written by ``save_scores``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    method = meta.pop("method")
    return Scores(method, t["mlp"], t["heads"], t["kv"], t["hidden"], t["layers"], t.get("norm_ms"), meta)
