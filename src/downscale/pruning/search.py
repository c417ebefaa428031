"""Shape search: which split of the cut between MLP, hidden size, heads and depth hurts least.

On a real pretrained model the shape of the cut decides most of the damage (SmolLM2-135M at 60% of its size:
query heads 9 -> 6 alone cost +3.1 nats; the same budget spent on depth or MLP costs far less), so instead of
one split policy the compress stage can try many shapes at the same parameter budget and keep the best, as
Model Optimizer's NAS-based pruning does, made cheap:

1. ``candidate_shapes`` (no weights): a grid over depth, hidden size and attention heads (within KV groups and
   whole KV groups); for each point the MLP takes whatever the budget leaves (the widest multiple of
   ``round_to``). Points that waste the budget (under ``min_fill`` of it with the MLP already whole), that leave
   the MLP under ``min_mlp`` of its size, or that the architecture's config class refuses are dropped.
2. ``search`` (weights): every candidate is cut out of the base from the cached importance scores and scored on
   held-out blocks of the student's own shard; successive halving spends more blocks on the better half until
   ``finalists`` remain, which are scored on all the search blocks. Every score uses the same blocks, so the
   comparison is paired and a few thousand tokens separate shapes whose losses differ by tenths of a nat.

The importance scores are computed once on the base, so a candidate costs one slice of the weights and a few
forward passes; no gradient, no training (the optional short distillation of the finalists is done by the
stage, which owns the teacher and the data).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from downscale.pruning.plan import ArchInfo, Shape, check_shape, count_params, hidden_step


@dataclass
class Candidate:
    """One shape at the budget, and what the search measured of it."""

    shape: Shape
    params: int
    family: str  # which dimensions it cuts, e.g. "mlp+depth"
    losses: dict[int, float] = field(default_factory=dict)  # blocks scored -> mean NLL on them
    distilled_loss: float | None = None  # after the optional short distillation
    refused: str | None = None  # why the config class refuses it (never searched)

    @property
    def loss(self) -> float:
        """The loss on the most blocks this candidate was scored on (inf if never scored)."""
        return self.losses[max(self.losses)] if self.losses else math.inf

    def to_dict(self, base_total: int) -> dict:
        return {"shape": self.shape.as_dict(), "params": self.params, "fraction_of_base":
                round(self.params / base_total, 6), "family": self.family,
                "loss": None if math.isinf(self.loss) else round(self.loss, 6),
                "blocks_scored": max(self.losses) if self.losses else 0,
                "distilled_loss": None if self.distilled_loss is None else round(self.distilled_loss, 6)}


def _family(base: Shape, s: Shape) -> str:
    parts = []
    if s.intermediate_size < base.intermediate_size:
        parts.append("mlp")
    if s.hidden_size < base.hidden_size:
        parts.append("hidden")
    if s.num_heads // s.num_kv_heads < base.num_heads // base.num_kv_heads:
        parts.append("heads")
    if s.num_kv_heads < base.num_kv_heads:
        parts.append("groups")
    if s.num_layers < base.num_layers:
        parts.append("depth")
    return "+".join(parts) or "none"


def head_options(info: ArchInfo) -> list[tuple[int, int]]:
    """(query heads, KV heads) to try: the base's; fewer query heads in every group (one fewer, and half); fewer
    whole KV groups (one fewer, and half). A full-attention base (one query head per group) cuts groups only."""
    b, g0 = info.base, info.groups
    opts = [(b.num_heads, b.num_kv_heads)]
    for g in sorted({g0 - 1, math.ceil(g0 / 2)}, reverse=True):
        if 1 <= g < g0:
            opts.append((b.num_kv_heads * g, b.num_kv_heads))
    for kv in sorted({b.num_kv_heads - 1, math.ceil(b.num_kv_heads / 2)}, reverse=True):
        if 1 <= kv < b.num_kv_heads:
            opts.append((kv * g0, kv))
    return list(dict.fromkeys(opts))


def candidate_shapes(info: ArchInfo, goal: int, round_to: int = 8, depth: bool = True,
                     fixed: dict[str, int] | None = None, min_fill: float = 0.97, min_mlp: float = 0.15,
                     refusal: Callable[[Shape], str | None] | None = None,
                     hidden_fracs: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
                     depth_fracs: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)) -> list[Candidate]:
    """Every grid shape at or under ``goal`` parameters (see the module docstring), widest MLP first within a
    family; ``fixed`` pins shape fields (compress.shape); ``refusal(shape)`` is the config class's verdict."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    b = info.base
    layer_opts = sorted({max(1, round(b.num_layers * f)) for f in (depth_fracs if depth else (1.0,))}, reverse=True)
    if "num_layers" in fixed:
        layer_opts = [fixed["num_layers"]]
    heads = head_options(info)
    if "num_heads" in fixed or "num_kv_heads" in fixed:
        heads = [(fixed.get("num_heads", h), fixed.get("num_kv_heads", kv)) for h, kv in heads]
        heads = list(dict.fromkeys(heads))
    out: dict[Shape, Candidate] = {}
    for n_layers in layer_opts:
        for h, kv in heads:
            step = hidden_step(info, h, round_to)
            hiddens = {max(step, int(b.hidden_size * f) // step * step) for f in hidden_fracs}
            if "hidden_size" in fixed:
                hiddens = {fixed["hidden_size"]}
            for hidden in sorted(hiddens, reverse=True):
                s = Shape(hidden, b.intermediate_size, h, kv, n_layers)
                if "intermediate_size" in fixed:
                    s = Shape(hidden, fixed["intermediate_size"], h, kv, n_layers)
                    if count_params(info, s)["total"] > goal:
                        continue
                else:
                    s = _widest_mlp(info, s, goal, round_to)
                    if s is None or s.intermediate_size < min_mlp * b.intermediate_size:
                        continue
                total = count_params(info, s)["total"]
                if s.intermediate_size == b.intermediate_size and total < min_fill * goal:
                    continue  # the other cuts already went past the budget: a smaller shape wastes it
                try:
                    check_shape(info, s)
                except ValueError:
                    continue
                why = refusal(s) if refusal is not None else None
                if why is None and s not in out:
                    out[s] = Candidate(s, total, _family(b, s))
    return sorted(out.values(), key=lambda c: (-c.params, c.family))


def _widest_mlp(info: ArchInfo, s: Shape, goal: int, round_to: int) -> Shape | None:
    """``s`` with the widest MLP (a multiple of ``round_to``, at most the base's) that keeps it under ``goal``."""
    zero = count_params(info, Shape(s.hidden_size, 0, s.num_heads, s.num_kv_heads, s.num_layers))["total"]
    per_channel = count_params(info, Shape(s.hidden_size, 1, s.num_heads, s.num_kv_heads, s.num_layers))["total"] - zero
    if zero + per_channel * round_to > goal:
        return None
    width = min(info.base.intermediate_size, (goal - zero) // per_channel // round_to * round_to)
    return Shape(s.hidden_size, width, s.num_heads, s.num_kv_heads, s.num_layers)


def successive_halving(candidates: list[Candidate], score: Callable[[Candidate, int], float], blocks: int,
                       start_blocks: int, finalists: int, log: Callable[[str], None] | None = None,
                       deadline: float | None = None) -> list[Candidate]:
    """Score every candidate on ``start_blocks`` blocks, keep the better half, double the blocks, until at most
    ``finalists`` remain; those are scored on all ``blocks``. Returns the finalists, best first. ``score(c, n)``
    is the mean loss of ``c`` on the first ``n`` search blocks (the same blocks for every candidate)."""
    alive = list(candidates)
    n = max(1, min(start_blocks, blocks))
    while True:
        t = time.time()
        for c in alive:
            if n not in c.losses:
                c.losses[n] = score(c, n)
        alive.sort(key=lambda c: c.loss)
        if log is not None:
            log(f"  {len(alive)} candidates on {n} block(s) in {time.time() - t:.1f}s; best {alive[0].loss:.3f} "
                f"{alive[0].family} {alive[0].shape.as_dict()}")
        if len(alive) <= finalists or n >= blocks:
            break
        alive = alive[:max(finalists, math.ceil(len(alive) / 2))]
        n = min(blocks, 2 * n)
    if n < blocks:
        for c in alive:
            c.losses[blocks] = score(c, blocks)
        alive.sort(key=lambda c: c.loss)
    return alive[:finalists]


def spread(candidates: list[Candidate], limit: int, keep: Candidate | None = None) -> list[Candidate]:
    """At most ``limit`` candidates, evenly spread over the list (``keep`` always among them)."""
    if len(candidates) <= limit:
        out = list(candidates)
    else:
        idx = sorted({round(i * (len(candidates) - 1) / max(1, limit - 1)) for i in range(limit)})
        out = [candidates[i] for i in idx]
    if keep is not None and all(c.shape != keep.shape for c in out):
        out = out[: max(0, limit - 1)] + [keep]
    return out


@dataclass
class SearchStudent:
    """What the search needs of one student: its importance scores on the base and its held-out blocks."""

    scores: Any  # importance.Scores
    blocks: Any  # np.ndarray [N, T] token ids of the student's own shard, never used for calibration
    norm_rescale: bool = True
    grams: Any = None  # reconstruct.Grams of the base on the student's calibration blocks: refit every candidate
    damp: float = 0.01


def run_search(base, candidates: list[Candidate], students: list[SearchStudent], *, blocks: int, start_blocks: int,
               finalists: int, batch_size: int, device, amp, log: Callable[[str], None],
               distill: Callable[[Any, int], Any] | None = None) -> list[Candidate]:
    """Successive halving over ``candidates`` for one shape shared by every student: a candidate's loss is the
    mean over students of its mean NLL on the student's first n search blocks, each student cut from the base
    with its own scores. With ``distill(model, student_index) -> model`` the finalists are distilled briefly
    and ranked by the loss after it. Returns the finalists, best first (every candidate keeps its losses)."""
    import numpy as np
    import torch

    from downscale.models import block_nll
    from downscale.pruning.reconstruct import refit_student
    from downscale.pruning.surgery import extract_student, select_units

    sums: dict[tuple[Shape, int], list[float]] = {}  # (shape, student) -> [blocks scored, nll sum, tokens]

    def cut(c: Candidate, j: int, train: bool = False):
        st = students[j]
        keep = select_units(st.scores, base.config, c.shape)
        model = extract_student(base, c.shape, keep, st.scores.norm_ms if st.norm_rescale else None, share=not train)
        if st.grams is not None:
            refit_student(model, base, keep, st.grams, st.damp)
        return model

    def nll(model, tokens) -> tuple[float, int]:
        total, count = 0.0, 0
        for a in range(0, len(tokens), batch_size):
            x = torch.as_tensor(np.asarray(tokens[a:a + batch_size], dtype=np.int64))
            t, n = block_nll(model, x, device, amp)
            total, count = total + t, count + n
        return total, count

    def score(c: Candidate, n: int) -> float:
        losses = []
        for j, st in enumerate(students):
            done, total, count = sums.get((c.shape, j), [0, 0.0, 0])
            want = min(n, len(st.blocks))
            if want > done:
                model = cut(c, j)
                model.eval()
                with torch.no_grad():
                    t, k = nll(model, st.blocks[done:want])
                del model
                done, total, count = want, total + t, count + k
                sums[(c.shape, j)] = [done, total, count]
            losses.append(total / count if count else math.inf)
        return float(sum(losses) / len(losses))

    best = successive_halving(candidates, score, blocks, start_blocks, finalists, log=log)
    if distill is None:
        return best
    for c in best:
        t0, losses = time.time(), []
        for j, st in enumerate(students):
            model = distill(cut(c, j, train=True), j)
            model.eval()
            with torch.no_grad():
                t, k = nll(model, st.blocks[:blocks])
            losses.append(t / k)
            del model
        c.distilled_loss = float(sum(losses) / len(losses))
        log(f"  finalist {c.family} {c.shape.as_dict()}: {c.loss:.3f} right after pruning, {c.distilled_loss:.3f} "
            f"after distillation ({time.time() - t0:.1f}s)")
    return sorted(best, key=lambda c: c.distilled_loss)


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Best first: candidates scored on more blocks (they survived more halving rounds) before the others, then by
    loss (losses on different numbers of blocks are not comparable)."""
    return sorted(candidates, key=lambda c: (-(max(c.losses) if c.losses else 0),
                                             c.distilled_loss if c.distilled_loss is not None else math.inf, c.loss))


def describe(candidates: list[Candidate], base_total: int, limit: int | None = None) -> list[str]:
    """Table lines (best first, see ``ranked``) for the log."""
    lines = [f"{'family':<24}{'hidden':>7}{'mlp':>7}{'heads':>7}{'kv':>4}{'layers':>7}{'params':>8}{'loss':>8}"
             f"{'blocks':>7}"]
    for c in ranked(candidates)[:limit]:
        s = c.shape
        loss = "-" if math.isinf(c.loss) else f"{c.loss:.3f}"
        lines.append(f"{c.family:<24}{s.hidden_size:>7}{s.intermediate_size:>7}{s.num_heads:>7}{s.num_kv_heads:>4}"
                     f"{s.num_layers:>7}{c.params / base_total:>8.1%}{loss:>8}{max(c.losses, default=0):>7}")
    return lines


def as_candidates(shapes: list[Shape], info: ArchInfo, family: str | None = None) -> list[Candidate]:
    """Plain shapes (e.g. the split policy's) as candidates."""
    return [Candidate(s, count_params(info, s)["total"], family or _family(info.base, s)) for s in shapes]


__all__ = ["Candidate", "SearchStudent", "as_candidates", "candidate_shapes", "describe", "head_options", "ranked",
           "run_search", "spread", "successive_halving"]
