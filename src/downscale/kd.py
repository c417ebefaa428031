"""Distillation losses: KD(teacher || student) + next-token CE, fused with the student's LM head.

The objective of the specialize stage, per token whose label is not ``ignore_index``::

    loss = kd_ratio * T^2 * KD(p_T || p_S) + (1 - kd_ratio) * CE(next token)

averaged over those tokens. ``p_T = softmax(teacher_logits / T)``, ``p_S = softmax(student_logits / T)``;
CE is the plain next-token cross-entropy at temperature 1. The T^2 factor (Hinton et al.) keeps the
gradient scale of the KD term independent of T. KD is one of (``p = p_T``, ``q = p_S``)::

    forward_kl      KL(p || q)       = sum p (log p - log q)              (Minitron's choice)
    reverse_kl      KL(q || p)       = sum q (log q - log p)
    jsd (beta)      M = beta p + (1 - beta) q;  beta KL(p || M) + (1 - beta) KL(q || M)
                    (exactly TRL's ``generalized_jsd_loss``; beta strictly in (0, 1))
    skew_kl (alpha) KL(p || alpha p + (1 - alpha) q)    (DistiLLM's skew forward KL; alpha in (0, 1))

Memory. ``distill_loss`` never builds the full [N, V] logits. It takes the student's final hidden
states [N, H] and LM-head weight [V, H] and, chunk by chunk of ``chunk_tokens`` tokens, makes the
chunk's logits, the loss and its gradient w.r.t. the logits (analytically, in fp32), and turns that
into the gradients w.r.t. the chunk's hidden states and the head weight, accumulated over chunks and
handed to autograd in backward (a Liger-style fused linear loss). The teacher's logits are made per
chunk too (``DenseTeacher``: teacher hidden states + head weight), or read per chunk from given
logits (``LogitTeacher``) or from a cache of its top-k log-probs (``SparseTeacher``). At most a few
[chunk_tokens, V] fp32 temporaries live at once.

Precision. Softmaxes, divergences, gradients and sums are fp32 whatever the input dtypes. The head
matmuls (logits, and the two gradient matmuls) run in the autocast dtype when ``distill_loss`` is
called under autocast (as the model's own lm_head would), else in fp32 when the hidden states and the
weight are both fp32, else in the lower precision of the two; ``matmul_dtype=torch.float32`` forces
fp32 logits. The head-weight gradient is accumulated over chunks in fp32. On a 2-core CPU with
AVX512-bf16, bf16 head matmuls made the whole loss ~2.5x faster than fp32 at V = 8192
(benchmarks/bench_kd_memory.py).

Sparse (cached) teachers. The teacher is stored as its top-k token ids, their log-probs at
temperature T, and ``tail_logmass`` = log(1 - sum of the top-k probabilities). The student's
distribution is collapsed onto the same k + 1 bins: its probabilities of the teacher's top-k ids,
and one "rest" bin holding all its other probability (the logsumexp of its other logits, minus its
log-partition). The teacher's k + 1 log-probs are renormalised (log-softmax over the bins: an
identity up to rounding for an fp32 cache, and it absorbs the rounding of an fp16 cache), and the KD
is the chosen divergence between the two (k + 1)-bin distributions. With k = V the rest bin is
empty on both sides and the result equals online KD (values and gradients, up to rounding).
``top_k`` ids must be distinct within a row.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl")
IGNORE_INDEX = -100
_FMIN = torch.finfo(torch.float32).min  # stands in for log(0): keeps 0 * log(0) terms at 0, not NaN


# --------------------------------------------------------------------------- teachers


@dataclass
class DenseTeacher:
    """Online teacher as final hidden states [N, H_T] and LM-head weight [V, H_T] (no bias): its
    logits are made per chunk inside the loss, never as a whole [N, V] tensor."""

    hidden: torch.Tensor
    head_weight: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]


@dataclass
class LogitTeacher:
    """Online teacher as ready-made logits [N, V] (any float dtype; upcast per chunk)."""

    logits: torch.Tensor

    def __len__(self) -> int:
        return self.logits.shape[0]


@dataclass
class SparseTeacher:
    """Cached teacher: per token the top-k ids [N, k], their log-probs [N, k] at ``temperature`` and
    ``tail_logmass`` [N] = log of the probability outside the top k (-inf when k = V). See the module
    docstring for how the tail is used. ``temperature`` (when known) must equal the loss's."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    temperature: float | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseTeacher:
        """The same targets on ``device``."""
        return SparseTeacher(self.ids.to(device, non_blocking=non_blocking),
                             self.logprobs.to(device, non_blocking=non_blocking),
                             self.tail_logmass.to(device, non_blocking=non_blocking), self.temperature)

    @classmethod
    def concat(cls, parts: list[SparseTeacher]) -> SparseTeacher:
        """Rows of several sparse teachers (same k and temperature) one after another."""
        if not parts:
            raise ValueError("SparseTeacher.concat needs at least one part")
        ks = {p.ids.shape[1] for p in parts}
        temps = {p.temperature for p in parts}
        if len(ks) != 1 or len(temps) != 1:
            raise ValueError(f"SparseTeacher.concat: parts differ in top_k {sorted(ks)} or temperature {temps}")
        return cls(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                   torch.cat([p.tail_logmass for p in parts]), parts[0].temperature)


Teacher = DenseTeacher | LogitTeacher | SparseTeacher


# --------------------------------------------------------------------------- validation


def check_kd_args(kind: str, *, kd_ratio: float | None = None, temperature: float = 1.0, beta: float = 0.5,
                  alpha: float = 0.1) -> None:
    """Raise ``ValueError`` (one line) when a KD setting is out of range: kind one of ``KINDS``,
    kd_ratio in [0, 1], temperature > 0, beta (jsd) and alpha (skew_kl) strictly in (0, 1)."""
    if kind not in KINDS:
        raise ValueError(f"kd loss must be one of {', '.join(KINDS)}; got {kind!r}")
    if kd_ratio is not None and not (0.0 <= kd_ratio <= 1.0):
        raise ValueError(f"kd_ratio must be in [0, 1]; got {kd_ratio!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if kind == "jsd" and not (0.0 < beta < 1.0):
        raise ValueError(f"jsd beta must be strictly between 0 and 1; got {beta!r}")
    if kind == "skew_kl" and not (0.0 < alpha < 1.0):
        raise ValueError(f"skew_kl alpha must be strictly between 0 and 1; got {alpha!r}")


# --------------------------------------------------------------------------- plain reference


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl", *,
                  temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """The chosen divergence per token between softmax(teacher_logits / T) and softmax(student_logits / T),
    computed in fp32 on full logits [..., V] -> [...]. No T^2 factor. Differentiable (plain autograd).

    This is the unfused reference of ``distill_loss`` and the metric for evaluation (e.g. the
    validation KL to the teacher, one chunk of logits at a time).
    """
    check_kd_args(kind, temperature=temperature, beta=beta, alpha=alpha)
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if kind == "reverse_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if kind == "skew_kl":
        logm = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
        return (logp.exp() * (logp - logm)).sum(-1)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)


# --------------------------------------------------------------------------- divergences on bins


def _divergence(logq: torch.Tensor, logp: torch.Tensor, kind: str, beta: float, alpha: float,
                need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D(p || q) per row and a = dD/d(log q) per bin, for log-probs [C, B] (student q, teacher p) whose
    -inf entries were clamped to the fp32 minimum (so 0 * log 0 terms are exactly 0). ``logp`` may be
    overwritten."""
    if kind == "forward_kl":  # logp is consumed (it becomes p)
        diff = logp - logq
        p = logp.exp_()
        d = diff.mul_(p).sum(-1)
        return d, (p.neg_() if need_grad else None)
    if kind == "reverse_kl":
        q = logq.exp()
        diff = logq - logp
        d = (diff * q).sum(-1)
        return d, (diff.add_(1.0).mul_(q) if need_grad else None)
    if kind == "skew_kl":  # KL(p || m), m = alpha p + (1 - alpha) q; dD/dlog q = -(1 - alpha) p q / m
        logm = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
        p = logp.exp()
        d = ((logp - logm).mul_(p)).sum(-1)
        if not need_grad:
            return d, None
        return d, (logq - logm).exp_().mul_(p).mul_(-(1.0 - alpha))
    # jsd: M = beta p + (1 - beta) q; D = beta KL(p||M) + (1-beta) KL(q||M); dD/dlog q = (1-beta) q (log q - log M)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    p, q = logp.exp(), logq.exp()
    kl_q = (logq - logm).mul_(q)
    d = beta * (logp - logm).mul_(p).sum(-1) + (1.0 - beta) * kl_q.sum(-1)
    return d, (kl_q.mul_(1.0 - beta) if need_grad else None)


# --------------------------------------------------------------------------- the fused loss

# The default chunk of the fused loss, by device and head-matmul dtype: elements of one [chunk, V] fp32 temporary
# (a few live at once), measured (benchmarks/bench_kd_chunks.py, BENCHMARKS.md "KD loss chunk size"). On a 2-core
# CPU at SmolLM2's shape (V = 49,152, 2,040 tokens, student hidden 456), forward + backward was fastest at 512-1024
# tokens per chunk in fp32 and in bf16 (1.26x and 1.15x faster than the former 32 MiB chunk of 170 tokens): short
# chunks make the [V, C] x [C, H] head-gradient product bound by writing its [V, H] output, and the fp32
# accumulator gets one upcast [V, H] add per chunk. Chunks of a multiple of 256 tokens ran faster than their
# neighbours (640 and 682 were 1.1-1.2x slower than 512 and 768). On a GPU, 256 MiB (~520 tokens at V = 128,256):
# a 65-token chunk's matmuls take ~50 us on an H100, no longer than launching the chunk's dozen kernels.
AUTO_CHUNK_BYTES = {("cpu", torch.float32): 96 * 2**20, ("cpu", torch.bfloat16): 96 * 2**20,
                    ("cpu", torch.float16): 96 * 2**20, ("cuda", None): 256 * 2**20}


def auto_chunk_tokens(vocab_size: int, chunk_tokens: int | None = None, device: Any = None,
                      dtype: torch.dtype | None = None) -> int:
    """``chunk_tokens`` if given, else the default chunk of ``distill_loss``: ``AUTO_CHUNK_BYTES`` of the device
    (None: CPU) and head-matmul ``dtype`` (None: fp32) per [chunk, V] fp32 temporary, in tokens, rounded down to a
    multiple of 256 tokens when there are at least 256 (512 at V = 49,152 on a CPU; 192 at V = 128,256; 523 at
    V = 128,256 on CUDA, not rounded there), at least 16."""
    if chunk_tokens is not None:
        return int(chunk_tokens)
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return max(16, AUTO_CHUNK_BYTES[("cuda", None)] // (4 * max(1, int(vocab_size))))
    budget = AUTO_CHUNK_BYTES.get((kind, dtype or torch.float32), AUTO_CHUNK_BYTES[("cpu", torch.float32)])
    tokens = budget // (4 * max(1, int(vocab_size)))
    step = 256 if tokens >= 256 else 64 if tokens >= 64 else 16
    return max(16, tokens // step * step)


@dataclass
class _Opts:
    kind: str
    kd_ratio: float
    temperature: float
    beta: float
    alpha: float
    chunk_tokens: int
    ignore_index: int
    matmul_dtype: torch.dtype | None


def _mm_dtype(a: torch.dtype, b: torch.dtype, override: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The head-matmul dtype: ``override``; else the autocast dtype when autocast is on for ``device`` (what
    the model's own lm_head would use); else fp32 for two fp32 inputs, or the lower precision of the two."""
    if override is not None:
        return override
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    if a == b:
        return a
    return a if a != torch.float32 else b


def _take(x: torch.Tensor, sel: slice | torch.Tensor, device: torch.device) -> torch.Tensor:
    part = x[sel] if isinstance(sel, slice) else x.index_select(0, sel.to(x.device))
    return part.to(device, non_blocking=True)


def _teacher_logp(teacher: Teacher, sel: slice | torch.Tensor, o: _Opts, device: torch.device,
                  t_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher log-probs of one chunk: dense [C, V] (ids None) or on the k + 1 bins [C, k + 1] with ids [C, k]."""
    if isinstance(teacher, SparseTeacher):
        ids = _take(teacher.ids, sel, device).long()
        lp = _take(teacher.logprobs, sel, device).float()
        tail = _take(teacher.tail_logmass, sel, device).float()
        logp = torch.log_softmax(torch.cat([lp, tail[:, None]], dim=1), dim=1)  # renormalised over the bins
        return logp.clamp_min_(_FMIN), ids
    if isinstance(teacher, DenseTeacher):
        h = _take(teacher.hidden, sel, device)
        t = (h.to(t_weight.dtype) @ t_weight.T).float()  # [C, V], a fresh tensor
        if o.temperature != 1.0:
            t.div_(o.temperature)
    else:
        t = _take(teacher.logits, sel, device).float()  # may be a view of the caller's logits: no in-place ops
        if o.temperature != 1.0:
            t = t / o.temperature
    logp = torch.log_softmax(t, dim=1)  # finite for finite logits; given logits may hold -inf (masked ids)
    return (logp if isinstance(teacher, DenseTeacher) else logp.clamp_min_(_FMIN)), None


def _chunk(z: torch.Tensor, labels: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor | None] | None,
           o: _Opts, w_ce: float, w_kd: float, need_grad: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token CE [C] and KD [C] (without T^2) of one chunk of student logits ``z`` [C, V] (fp32, consumed),
    and the gradient of ``w_ce * sum CE + w_kd * sum KD`` w.r.t. ``z`` (``w_kd`` includes the T^2; None when
    not needed). CE and KD gradients share one softmax when T = 1."""
    T = o.temperature
    lab = labels[:, None]
    ce_grad = need_grad and w_ce != 0.0
    kd_grad = need_grad and w_kd != 0.0 and target is not None
    logq1 = torch.log_softmax(z, dim=1)  # [C, V] student log-probs at T = 1
    ce = logq1.gather(1, lab).squeeze(1).neg_()
    if target is None:
        del z
        if not ce_grad:
            return ce, None, None
        g = logq1.exp_().mul_(w_ce)
        return ce, None, g.scatter_add_(1, lab, torch.full(lab.shape, -w_ce, device=g.device))
    logp, ids = target
    logq = logq1 if T == 1.0 else torch.log_softmax(z.div_(T), dim=1)  # [C, V] at T
    del z
    if ids is None:  # dense: the bins are the vocabulary
        kd, a = _divergence(logq, logp, o.kind, o.beta, o.alpha, kd_grad)
        a_top = rest_soft = None
    else:  # sparse: the teacher's top-k bins + one rest bin
        k = ids.shape[1]
        rest = logq.scatter(1, ids, float("-inf"))  # student log-probs outside the teacher's top k
        logq_rest = torch.logsumexp(rest, dim=1)  # -inf when k = V
        logq_bins = torch.cat([logq.gather(1, ids), logq_rest[:, None]], dim=1).clamp_min_(_FMIN)
        kd, a_bins = _divergence(logq_bins, logp, o.kind, o.beta, o.alpha, kd_grad)
        if kd_grad:
            # d log q_top_b / ds_j = [j = id_b] - q_j ; d log q_rest / ds_j = [j not in top] q_j / q_rest - q_j
            safe = torch.where(torch.isfinite(logq_rest), logq_rest, torch.zeros_like(logq_rest))
            rest_soft = rest.sub_(safe[:, None]).exp_()  # softmax over the tokens outside the top k; 0 at top k
            a_top, a = a_bins[:, :k], a_bins[:, k:]  # a: the rest bin's [C, 1], times rest_soft below
        del rest
    if not need_grad:
        return ce, kd, None
    # dD/ds = A - q_T * sum(a), A = a (dense) or scatter(a_top) + a_rest * rest_soft (sparse)
    asum = a_bins.sum(1) if ids is not None and kd_grad else (a.sum(1) if kd_grad else None)
    g_kd = None
    if T == 1.0:  # one softmax for both terms: g = q (w_ce - w_kd sum a) + w_kd A - w_ce onehot
        coef = torch.full_like(ce, w_ce if ce_grad else 0.0)
        if kd_grad:
            coef.sub_(asum, alpha=w_kd)
        g = logq1.exp_().mul_(coef[:, None])
        g_kd = g
        scale = w_kd
    else:
        g = logq1.exp_().mul_(w_ce) if ce_grad else None
        if kd_grad:
            g_kd = logq.exp_().mul_(asum.neg_()[:, None])
        scale = 1.0
    if kd_grad:
        if ids is None:
            g_kd.add_(a, alpha=scale)
        else:
            g_kd.scatter_add_(1, ids, a_top * scale)
            g_kd.add_(rest_soft.mul_(a * scale))
        if T != 1.0:
            g_kd.mul_(w_kd / T)  # w_kd holds the T^2; dD/dz = dD/ds / T
            g = g_kd if g is None else g.add_(g_kd)
    if ce_grad:
        g.scatter_add_(1, lab, torch.full(lab.shape, -w_ce, device=g.device))
    return ce, kd, g


def _run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher: Teacher | None, o: _Opts,
         grad_hidden: bool, grad_weight: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop. Returns (loss, stats [ce_sum, kd_sum, tokens], dloss/dhidden, dloss/dweight)."""
    device = hidden.device
    n_rows = hidden.shape[0]
    valid = labels != o.ignore_index
    n = int(valid.sum())
    rows = None if n == n_rows else valid.nonzero().squeeze(1)
    mm = _mm_dtype(hidden.dtype, weight.dtype, o.matmul_dtype, device)
    w = weight.detach().to(mm)
    t_weight = None
    if isinstance(teacher, DenseTeacher):
        tw = teacher.head_weight.detach()
        t_weight = tw.to(device, _mm_dtype(teacher.hidden.dtype, tw.dtype, o.matmul_dtype, device))
    w_ce = (1.0 - o.kd_ratio) / max(n, 1)
    w_kd = o.kd_ratio * o.temperature**2 / max(n, 1)
    # fp16 gradients of a mean loss underflow (|g| ~ 1/n); they are kept in fp32 until backward has applied
    # the upstream gradient (e.g. a GradScaler's scale), and scaled by n before each fp16 matmul.
    gh = torch.zeros(hidden.shape, dtype=_grad_dtype(hidden.dtype), device=device) if grad_hidden else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=device) if grad_weight else None
    g_up = float(max(n, 1)) if mm == torch.float16 else 1.0
    need_grad = grad_hidden or grad_weight
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    kd_sum = torch.zeros((), dtype=torch.float64, device=device)
    from downscale.models import no_autocast

    with no_autocast(device), torch.no_grad():
        for c0 in range(0, n, o.chunk_tokens):
            c1 = min(n, c0 + o.chunk_tokens)
            sel = slice(c0, c1) if rows is None else rows[c0:c1]
            h = _take(hidden.detach(), sel, device).to(mm)  # [C, H]
            target = _teacher_logp(teacher, sel, o, device, t_weight) if teacher is not None else None
            # [C, V] fp32 logits of this chunk only, handed over without a reference kept here
            ce, kd, g = _chunk((h @ w.T).float(), _take(labels, sel, device).long(), target, o, w_ce, w_kd,
                               need_grad)
            del target
            ce_sum += ce.sum(dtype=torch.float64)
            if kd is not None:
                kd_sum += kd.sum(dtype=torch.float64)
            if g is None:
                continue
            if g_up != 1.0:
                g.mul_(g_up)
            gm = g.to(mm)
            del g
            if grad_hidden:
                gc = (gm @ w).to(gh.dtype)  # [C, H]
                if g_up != 1.0:
                    gc.div_(g_up)
                if rows is None:
                    gh[sel] = gc
                else:
                    gh.index_copy_(0, sel, gc)
            if grad_weight:
                if mm == torch.float32:
                    gw.addmm_(gm.T, h)
                else:
                    gw.add_((gm.T @ h).float(), alpha=1.0 / g_up)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    if o.kd_ratio < 1.0:
        loss = loss + (1.0 - o.kd_ratio) * ce_sum / max(n, 1)
    if o.kd_ratio > 0.0:
        loss = loss + o.kd_ratio * o.temperature**2 * kd_sum / max(n, 1)
    stats = torch.stack([ce_sum, kd_sum, torch.tensor(float(n), dtype=torch.float64, device=device)])
    if gw is not None:
        gw = gw.to(_grad_dtype(weight.dtype))
    return loss.float(), stats, gh, gw


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where a gradient waits for backward: fp32 for fp16 tensors (range), else their own dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


class _FusedDistill(torch.autograd.Function):
    """Forward computes the loss and (when needed) its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, teacher, opts):  # noqa: ANN001, ANN205
        loss, stats, gh, gw = _run(hidden, weight, labels, teacher, opts, ctx.needs_input_grad[0],
                                   ctx.needs_input_grad[1])
        ctx.save_for_backward(gh, gw)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):  # noqa: ANN001, ANN205
        gh, gw = ctx.saved_tensors
        scale = None if bool(grad_loss == 1) else grad_loss
        if gh is not None and scale is not None:
            gh = gh * scale.to(gh.dtype)
        if gw is not None and scale is not None:
            gw = gw * scale.to(gw.dtype)
        return (None if gh is None else gh.to(ctx.hidden_dtype), None if gw is None else gw.to(ctx.weight_dtype),
                None, None, None)


def distill_loss(student_hidden: torch.Tensor, student_head_weight: torch.Tensor, labels: torch.Tensor,
                 teacher: Teacher | None, *, kd_ratio: float, kind: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, alpha: float = 0.1, chunk_tokens: int | None = None,
                 ignore_index: int = IGNORE_INDEX, matmul_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """``kd_ratio * T^2 * mean KD + (1 - kd_ratio) * mean CE`` over the tokens whose label is not
    ``ignore_index``, fused with the student's LM head and computed ``chunk_tokens`` tokens at a time.

    Args:
        student_hidden: final hidden states [N, H] (position t predicts ``labels[t]``); any float dtype.
        student_head_weight: LM-head weight [V, H] (no bias).
        labels: next-token ids [N]; ``ignore_index`` rows count neither in CE nor in KD.
        teacher: targets for the same N rows (``DenseTeacher`` | ``LogitTeacher`` | ``SparseTeacher``), on
            any device (moved chunk by chunk); None only when ``kd_ratio == 0``.
        kd_ratio: weight of the KD term, in [0, 1].
        kind: ``forward_kl`` | ``reverse_kl`` | ``jsd`` | ``skew_kl`` (see the module docstring).
        temperature: T > 0, applied to both models' logits for KD (CE stays at T = 1); KD is scaled by T^2.
        beta: jsd interpolation, strictly in (0, 1).  alpha: skew_kl mixing weight, strictly in (0, 1).
        chunk_tokens: tokens per chunk; a few [chunk_tokens, V] fp32 temporaries are alive at once.
            None: ``auto_chunk_tokens(V, device=..., dtype=<the head-matmul dtype>)``.
        matmul_dtype: dtype of the head matmuls; None: the autocast dtype under autocast, else fp32 if hidden
            and weight are fp32, else the lower precision of the two.

    Returns:
        (loss, stats): a scalar fp32 tensor carrying gradients to ``student_hidden`` and
        ``student_head_weight``, and floats ``{"loss", "ce", "kd", "tokens"}`` where ``ce`` is the mean CE,
        ``kd`` the mean KD term as it enters the loss (times T^2; NaN without a teacher), ``tokens`` the
        number of tokens counted. With a teacher and ``kd_ratio == 0`` the KD is still measured for stats.
    """
    check_kd_args(kind, kd_ratio=kd_ratio, temperature=temperature, beta=beta, alpha=alpha)
    if student_hidden.dim() != 2 or student_head_weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"distill_loss expects hidden [N, H], head weight [V, H], labels [N]; got "
                         f"{tuple(student_hidden.shape)}, {tuple(student_head_weight.shape)}, {tuple(labels.shape)}")
    n_rows, vocab = student_hidden.shape[0], student_head_weight.shape[0]
    if student_head_weight.shape[1] != student_hidden.shape[1] or labels.shape[0] != n_rows:
        raise ValueError(f"distill_loss: shapes do not match: hidden {tuple(student_hidden.shape)}, head weight "
                         f"{tuple(student_head_weight.shape)}, labels {tuple(labels.shape)}")
    mm = _mm_dtype(student_hidden.dtype, student_head_weight.dtype, matmul_dtype, student_hidden.device)
    chunk_tokens = auto_chunk_tokens(vocab, chunk_tokens, student_hidden.device, mm)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
    if teacher is None and kd_ratio > 0:
        raise ValueError(f"kd_ratio is {kd_ratio} but no teacher targets were given")
    if teacher is not None:
        _check_teacher(teacher, n_rows, vocab, temperature)
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(f"labels must be token ids in [0, {vocab}) or {ignore_index}; got "
                         f"[{int(valid.min())}, {int(valid.max())}]")
    opts = _Opts(kind, float(kd_ratio), float(temperature), float(beta), float(alpha), int(chunk_tokens),
                 int(ignore_index), matmul_dtype)
    wants = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head_weight.requires_grad)
    if wants:
        loss, stats = _FusedDistill.apply(student_hidden, student_head_weight, labels, teacher, opts)
    else:
        loss, stats, _, _ = _run(student_hidden, student_head_weight, labels, teacher, opts, False, False)
    ce_sum, kd_sum, n = stats.tolist()
    out = {"loss": float(loss.detach()), "ce": ce_sum / n if n else float("nan"),
           "kd": (temperature**2 * kd_sum / n if n else float("nan")) if teacher is not None else float("nan"),
           "tokens": int(n)}
    return loss, out


def _check_teacher(teacher: Teacher, n_rows: int, vocab: int, temperature: float) -> None:
    if len(teacher) != n_rows:
        raise ValueError(f"teacher targets have {len(teacher)} rows but the student has {n_rows}")
    if isinstance(teacher, DenseTeacher):
        v, h = teacher.head_weight.shape
        if v != vocab or teacher.hidden.shape[1] != h:
            raise ValueError(f"teacher head weight {tuple(teacher.head_weight.shape)} does not fit hidden "
                             f"{tuple(teacher.hidden.shape)} and vocabulary {vocab}")
    elif isinstance(teacher, LogitTeacher):
        if teacher.logits.shape[1] != vocab:
            raise ValueError(f"teacher logits have {teacher.logits.shape[1]} columns; the student's vocabulary "
                             f"is {vocab}")
    elif isinstance(teacher, SparseTeacher):
        k = teacher.ids.shape[1]
        if teacher.logprobs.shape != teacher.ids.shape or teacher.tail_logmass.shape != (n_rows,) or k > vocab:
            raise ValueError(f"sparse teacher shapes do not fit: ids {tuple(teacher.ids.shape)}, logprobs "
                             f"{tuple(teacher.logprobs.shape)}, tail {tuple(teacher.tail_logmass.shape)}, V={vocab}")
        if teacher.temperature is not None and not math.isclose(teacher.temperature, temperature, rel_tol=1e-6):
            raise ValueError(f"the cached teacher log-probs are at temperature {teacher.temperature}; the loss "
                             f"asks for {temperature}: rebuild the teacher cache")
        if n_rows and (int(teacher.ids.max()) >= vocab or int(teacher.ids.min()) < 0):
            raise ValueError(f"sparse teacher ids out of the vocabulary [0, {vocab})")
    else:
        raise TypeError(f"teacher must be DenseTeacher, LogitTeacher or SparseTeacher; got {type(teacher).__name__}")


def head_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, temperature: float = 1.0,
                  matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 log-probs at temperature T [C, V] of hidden states [C, H] through a head weight [V, H], with the
    same matmul-precision rule as ``distill_loss`` (the teacher cache uses this, so cached and online
    teachers agree)."""
    mm = _mm_dtype(hidden.dtype, head_weight.dtype, matmul_dtype, hidden.device)
    from downscale.models import no_autocast

    with no_autocast(hidden.device):
        z = (hidden.to(mm) @ head_weight.to(mm).T).float()
    if temperature != 1.0:
        z = z.div_(temperature)
    return torch.log_softmax(z, dim=-1)


# --------------------------------------------------------------------------- vocabulary check


class VocabularyMismatch(ValueError):
    """Student and teacher do not share a vocabulary or tokenizer."""


def tokenizer_hash(tok_dir: str | Path) -> str:
    """Hash of what maps text to ids in an HF tokenizer folder: tokenizer.json's model (vocab + merges),
    added/special tokens, normalizer and pre-tokenizer, plus the special-token names of
    tokenizer_config.json; without tokenizer.json, the raw vocab/merges/sentencepiece files."""
    d = Path(tok_dir)
    payload: dict[str, Any] = {}
    tj = d / "tokenizer.json"
    if tj.is_file():
        obj = json.loads(tj.read_text(encoding="utf-8"))
        payload = {k: obj.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    else:
        for name in ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "added_tokens.json"):
            if (d / name).is_file():
                payload[name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
        if not payload:
            raise VocabularyMismatch(f"{d}: no tokenizer files (tokenizer.json, vocab.json, tokenizer.model)")
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        conf = json.loads(tc.read_text(encoding="utf-8"))
        payload["special"] = {k: str(conf.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _vocab_facts(obj: Any) -> dict[str, int]:
    config = getattr(obj, "config", obj)
    facts = {"config vocab_size": int(config.vocab_size)}
    if isinstance(obj, torch.nn.Module):
        facts["input embedding rows"] = int(obj.get_input_embeddings().weight.shape[0])
        head = obj.get_output_embeddings()
        if head is not None:
            facts["output head rows"] = int(head.weight.shape[0])
    return facts


def check_same_vocab(student: Any, teacher: Any, student_tok_dir: str | Path | None = None,
                     teacher_tok_dir: str | Path | None = None) -> None:
    """Fail fast unless student and teacher share one vocabulary: config ``vocab_size`` and the
    embedding / head rows (padded rows included) of models or configs, and, when both folders are
    given, the tokenizer (``tokenizer_hash``). Raises ``VocabularyMismatch`` (a ValueError) with one line."""
    s, t = _vocab_facts(student), _vocab_facts(teacher)
    for key in s:
        if key in t and s[key] != t[key]:
            raise VocabularyMismatch(f"student and teacher vocabularies differ: {key} {s[key]} (student) vs "
                                     f"{t[key]} (teacher); students must keep the base's vocabulary, padded rows "
                                     f"included")
    if student_tok_dir is not None and teacher_tok_dir is not None:
        hs, ht = tokenizer_hash(student_tok_dir), tokenizer_hash(teacher_tok_dir)
        if hs != ht:
            raise VocabularyMismatch(f"student tokenizer {student_tok_dir} differs from the teacher's "
                                     f"{teacher_tok_dir} (hash {hs} vs {ht}); students must share the base's "
                                     f"tokenizer")
