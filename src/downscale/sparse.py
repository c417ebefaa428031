"""Sparse routed execution: the ensemble mode ``sparse``, cheaper than the base at inference.

Every other mode runs every student on every token. ``sparse`` routes each sequence once, from its first
``prefix`` tokens (P), and from then on runs only the ``top_k`` chosen students (SmallTalk LM routes a
sequence once from its prefix; c-BTM routes by the distance of the text to the data clusters):

- positions 0 .. P-2 (the prefix): every student runs; the prediction of x_{t+1} is the routed mixture with the
  router's weights from the tokens seen so far (exactly what mode ``routed`` with ``router_prefix = P``
  predicts there; the routed mode's ``router_top_k`` does not apply in the prefix);
- at position P-1 the router decides once per sequence: the Bayes router from each student's likelihood of
  x_1 .. x_{P-1} and the prior (its posterior), the cluster router from the text x_0 .. x_{P-1}; the ``top_k``
  largest weights are kept, renormalised and frozen;
- positions P-1 .. T-1: only the chosen students run, continuing from their KV caches of the prefix; the
  prediction is their mixture with the frozen weights.

So with top_k = n it equals mode ``routed`` with ``router_prefix = P``, and with top_k = 1 every position after
the prefix gets the chosen student's own log-probabilities (tests/test_sparse.py checks both). Generation
(``generate``): the prompt is the prefix. The Bayes router scores the whole prompt with every student, then only
the chosen ones decode, from their caches; the cluster router reads the prompt's text, so no student runs for the
decision and only the chosen ones read the prompt.

What runs is counted in ``SparseStats`` (student x position pairs computed, prefix included), from which the
evaluate stage reports active parameters and FLOPs per token averaged over positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from downscale import routing
from downscale.fastpath import StackedKV, StackedStudents, padded_causal_mask
from downscale.models import nll_chunk_tokens, split_head


@dataclass
class SparseStats:
    """What the sparse mode computed since the last ``reset``: token positions processed, and per student the
    positions it ran on and the sequences routed to it."""

    n: int
    positions: int = 0
    student_positions: list[int] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.positions, self.student_positions, self.sequences = 0, [0] * self.n, [0] * self.n

    def active_fraction(self) -> list[float]:
        """Per student: the fraction of positions it ran on."""
        return [p / max(1, self.positions) for p in self.student_positions]

    def active(self, per_student: list[float]) -> float:
        """Any per-student cost (parameters, FLOPs per token) averaged over the positions processed."""
        return sum(c * f for c, f in zip(per_student, self.active_fraction(), strict=True))

    def as_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "student_positions": list(self.student_positions),
                "sequences_routed": list(self.sequences)}


def _run(student, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: Any):
    """One student's forward on ``ids`` [B, q] continuing ``cache`` (None: from nothing). Returns (a function
    t0, t1 -> fp32 logits of positions [t0, t1) [B, t1 - t0, V], the new cache). The head is applied per call,
    so [B, q, V] logits never exist at once (when the head can be split off)."""
    kwargs = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "use_cache": True,
              "past_key_values": cache}
    split = split_head(student)
    if split is None:
        out = student(**kwargs)
        logits = out.logits
        return (lambda t0, t1: logits[:, t0:t1].float()), out.past_key_values
    body, head = split
    out = body(**kwargs)
    h = out.last_hidden_state
    return (lambda t0, t1: head(h[:, t0:t1]).float()), out.past_key_values


def _target_logprobs(logits_of, targets: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """log p(targets[:, t] | ...) [B, m] for the first m = targets.shape[1] positions, in chunks of positions."""
    m = targets.shape[1]
    out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    step = max(1, nll_chunk_tokens(vocab) // max(1, rows))
    for t0 in range(0, m, step):
        t1 = min(m, t0 + step)
        z = logits_of(t0, t1)
        out[:, t0:t1] = z.gather(-1, targets[:, t0:t1, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return out


def cluster_router(ens, prefix: int | None) -> routing.ClusterRouter:
    """The cluster router that reads the first ``prefix`` tokens (None: all), without top-k (the sparse decision
    applies its own)."""
    routers = ens.__dict__.setdefault("_sparse_clusters", {})
    if prefix not in routers:
        base = ens._router()  # checks the tokenizer and loads the clusterer
        routers[prefix] = routing.ClusterRouter(base.clusterer, base.decode, ens.n, prefix=prefix,
                                                temperature=ens.router_temperature, top_k=None)
    return routers[prefix]


def _log_prior(ens, device) -> torch.Tensor:
    return torch.tensor(ens.prior or [1.0 / ens.n] * ens.n, dtype=torch.float64).log().to(device)


@torch.no_grad()
def score(ens, ids: torch.Tensor, full: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sparse mode on unpadded ``ids`` [B, T]: (log p(x_{t+1} | x_<=t) of the combined model [B, T-1],
    its full log-probabilities [B, T, V] when ``full`` else None). Counts what runs in ``ens.sparse_stats``."""
    n, (B, T), V = ens.n, ids.shape, ens.vocab_size
    dev, P, k = ids.device, ens.sparse_prefix, min(ens.sparse_top_k, ens.n)
    c = min(P - 1, T)  # the columns every student runs
    positions = torch.arange(T, device=dev)[None].expand(B, T)
    stats = ens.sparse_stats
    stats.positions += B * T
    target = torch.full((B, max(0, T - 1)), -math.inf, device=dev)
    out = torch.full((B, T, V), -math.inf, device=dev) if full else None

    # 1. the prefix: every student; the routed mixture with the weights of the tokens seen so far
    caches: list[Any] = [None] * n
    lp_a = torch.zeros(n, B, min(c, T - 1), device=dev)  # log p_i(x_{t+1}) for the prefix columns t < c
    z_a = torch.empty(n, B, c, V, device=dev) if full and c else None
    if c:
        for i, student in enumerate(ens.students):
            logits_of, caches[i] = _run(student, ids[:, :c], positions[:, :c], None, None)
            lp_a[i] = _target_logprobs(logits_of, ids[:, 1:c + 1], B, V)
            if z_a is not None:
                z_a[i] = logits_of(0, c)
            stats.student_positions[i] += B * c
    seg_b = c < T  # positions after the prefix exist: the router decides
    cols = c + 1 if seg_b else c  # router weights for the prefix columns and, when deciding, column c
    if ens.router == "cluster":
        mask = torch.ones(B, cols, dtype=torch.long, device=dev)
        log_w = cluster_router(ens, P).log_weights(ids[:, :cols], mask, positions[:, :cols], start=0).double()
    else:
        evidence = routing.causal_evidence(lp_a, cols)  # the weight at column t has seen x_1 .. x_t
        log_w = routing.bayes_log_weights(evidence, _log_prior(ens, dev), ens.router_temperature)
    m = min(c, T - 1)
    if m:
        target[:, :m] = torch.logsumexp(log_w[:, :, :m].float() + lp_a[:, :, :m], dim=0)
    if z_a is not None:
        out[:, :c] = routing.mixture_from_logits(z_a, log_w[:, :, :c].float())[0]
    del z_a
    if not seg_b:
        return target, out

    # 2. the decision, once per sequence: the top-k of the router's weights at column c, renormalised, frozen
    decision = routing.normalise_log_weights(log_w[:, :, c], k).float()  # [n, B]
    # 3. after the prefix: only the chosen students, each from its cache of the prefix, on the rows it was chosen for
    for i, student in enumerate(ens.students):
        rows = torch.nonzero(torch.isfinite(decision[i])).flatten()
        if rows.numel() == 0:
            caches[i] = None
            continue
        stats.sequences[i] += int(rows.numel())
        cache = caches[i]
        if cache is not None and rows.numel() < B:
            cache.batch_select_indices(rows)
        caches[i] = None
        logits_of, _ = _run(student, ids[rows, c:], positions[rows, c:], None, cache)
        stats.student_positions[i] += int(rows.numel()) * (T - c)
        w = decision[i, rows][:, None]  # [R, 1]
        if T - 1 > c:
            lp = _target_logprobs(logits_of, ids[rows, c + 1:], int(rows.numel()), V)
            target[rows, c:] = torch.logaddexp(target[rows, c:], w + lp)
        if out is not None:
            step = max(1, nll_chunk_tokens(V) // max(1, int(rows.numel())))
            for t0 in range(0, T - c, step):
                t1 = min(T - c, t0 + step)
                logp = torch.log_softmax(logits_of(t0, t1), dim=-1) + w[:, :, None]
                out[rows, c + t0:c + t1] = torch.logaddexp(out[rows, c + t0:c + t1], logp)
    return target, out


@torch.no_grad()
def forward_logprobs(ens, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The combined log-probabilities [B, T, V] of the sparse mode; a padded batch (``mask`` with zeros, left or
    right padding) is routed row by row on each row's real tokens (padded positions get zeros)."""
    if mask is None or bool((mask != 0).all()):
        return score(ens, ids, full=True)[1]
    out = torch.zeros(*ids.shape, ens.vocab_size, device=ids.device)
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b] != 0).flatten()
        if real.numel():
            out[b, real] = score(ens, ids[b, real][None], full=True)[1][0]
    return out


class _Decoder:
    """One chosen student decoding its rows: through the fast path as a stack of one (its weights are views of the
    ensemble's stack; a lean decode step) when the ensemble has one, else through its own Hugging Face forward."""

    def __init__(self, student, stack: StackedStudents | None, cache: Any):
        self.student, self.stack, self.cache = student, stack, cache

    def run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, padded: bool):
        """Read ``ids`` [R, q] after the cache (``mask`` [R, past + q] when the batch has padding); returns a
        function t0, t1 -> fp32 logits [R, t1 - t0, V] of those new positions."""
        if self.stack is None:
            logits_of, self.cache = _run(self.student, ids, positions, mask if padded else None, self.cache)
            return logits_of
        if self.cache is None:
            self.cache = StackedKV(len(self.stack.layers))
        h = self.stack.hidden(ids, positions, padded_causal_mask(mask, ids.shape[1]) if padded else None, self.cache)
        R = ids.shape[0]
        return lambda t0, t1: self.stack.logits(h[:, :, t0:t1].reshape(1, R * (t1 - t0), -1)).view(R, t1 - t0, -1
                                                                                                   ).float()


def _bayes_prompt_fast(ens, stack: StackedStudents, ids: torch.Tensor, positions: torch.Tensor,
                       mask: torch.Tensor, padded: bool) -> tuple[torch.Tensor, torch.Tensor, StackedKV]:
    """Every student reads the prompt as one stacked computation: (the evidence log p_i(prompt) [n, B] float64
    over real tokens predicted from real ones, each student's last logits [n, B, V] fp32, the stacked cache)."""
    n, (B, T), V = ens.n, ids.shape, ens.vocab_size
    kv = StackedKV(len(stack.layers))
    h = stack.hidden(ids, positions, padded_causal_mask(mask, T) if padded else None, kv)  # [n, B, T, d]
    evidence = torch.zeros(n, B, dtype=torch.float64, device=ids.device)
    seen = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)  # a real token predicted from a real one
    step = max(1, nll_chunk_tokens(V) // max(1, n * B))
    for t0 in range(0, T - 1, step):
        t1 = min(T - 1, t0 + step)
        z = stack.logits(h[:, :, t0:t1].reshape(n, B * (t1 - t0), -1)).view(n, B, t1 - t0, V).float()
        lp = z.gather(-1, ids[None, :, t0 + 1:t1 + 1, None].expand(n, B, t1 - t0, 1)).squeeze(-1)
        lp = lp - torch.logsumexp(z, dim=-1)
        evidence += torch.where(seen[None, :, t0:t1], lp, torch.zeros_like(lp)).double().sum(-1)
    last = stack.logits(h[:, :, T - 1].contiguous()).float()  # [n, B, V]
    return evidence, last, kv


@torch.no_grad()
def generate(ens, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pick, eos: list[int],
             pad: int) -> torch.Tensor:
    """Decode with the sparse mode (see the module docs): route on the prompt ``input_ids`` [B, T] (left-padded
    with ``mask``), then only the chosen students decode from their own KV caches. ``pick(scores [B, V]) ->
    [B]`` chooses each next token (greedy or sampling). Returns [B, T + new].

    On the fast path the prompt is read by the students stacked, and each chosen student decodes as a stack of
    one (its weights are views, its cache its rows of the prompt's). With top-1 a row's scores are its student's
    logits (the log-softmax, a shift per row, changes neither the argmax nor the sampling distribution)."""
    n, (B, T), V = ens.n, input_ids.shape, ens.vocab_size
    dev, k = input_ids.device, min(ens.sparse_top_k, ens.n)
    stats = ens.sparse_stats
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    padded = bool((mask == 0).any())
    real = int(mask.sum())
    stats.positions += real
    stack = ens._stacked() if ens.uses_fast_path else None
    prompt_kv: StackedKV | None = None
    caches: list[Any] = [None] * n
    last: torch.Tensor | list[torch.Tensor] = []  # per student, its logits at the prompt's last position [B, V]
    if ens.router == "cluster":  # the prompt's text decides: no student runs for it
        log_w = cluster_router(ens, None).log_weights(input_ids, mask, positions, start=T - 1)[:, :, -1].double()
    else:  # every student scores the prompt; its posterior decides
        if stack is not None:
            evidence, last, prompt_kv = _bayes_prompt_fast(ens, stack, input_ids, positions, mask, padded)
        else:
            evidence = torch.zeros(n, B, dtype=torch.float64, device=dev)
            for i, student in enumerate(ens.students):
                logits_of, caches[i] = _run(student, input_ids, positions, mask if padded else None, None)
                if T > 1:
                    lp = _target_logprobs(logits_of, input_ids[:, 1:], B, V)  # [B, T-1]
                    seen = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)  # a real token predicted from a real one
                    evidence[i] = torch.where(seen, lp, torch.zeros_like(lp)).double().sum(-1)
                last.append(logits_of(T - 1, T)[:, 0])
        for i in range(n):
            stats.student_positions[i] += real
        log_w = routing.bayes_log_weights(evidence, _log_prior(ens, dev), ens.router_temperature)
    decision = routing.normalise_log_weights(log_w, k).float()  # [n, B]
    chosen: list[tuple[int, torch.Tensor, _Decoder]] = []  # (student, its rows, its decoder)
    pending: list[torch.Tensor] = []  # per chosen student: its logits for the next token [R, V]
    for i, student in enumerate(ens.students):
        rows = torch.nonzero(torch.isfinite(decision[i])).flatten()
        if rows.numel() == 0:
            continue
        stats.sequences[i] += int(rows.numel())
        one = stack.select(i) if stack is not None else None
        everyone = rows.numel() == B
        if ens.router == "cluster":
            dec = _Decoder(student, one, None)
            logits_of = dec.run(input_ids if everyone else input_ids[rows], positions if everyone else positions[rows],
                                mask if everyone else mask[rows], padded)
            stats.student_positions[i] += int(mask[rows].sum())
            pending.append(logits_of(T - 1, T)[:, 0])
        else:
            if stack is not None:
                cache = prompt_kv.select(i, n, rows)
            else:
                cache = caches[i]
                if not everyone:
                    cache.batch_select_indices(rows)
            dec = _Decoder(student, one, cache)
            pending.append(last[i] if everyone else last[i][rows])
        chosen.append((i, rows, dec))
    del prompt_kv, caches, last
    ids, done = input_ids, torch.zeros(B, dtype=torch.bool, device=dev)
    pos = positions[:, -1]
    single = k == 1 and len(chosen) == 1  # one student decodes every row: its logits are the scores
    for _step in range(max_new_tokens):
        if single:
            scores = pending[0]
        else:
            scores = torch.full((B, V), -math.inf, device=dev)
            for (i, rows, _), z in zip(chosen, pending, strict=True):
                if k == 1:
                    scores[rows] = z
                else:
                    lp = decision[i, rows][:, None] + torch.log_softmax(z, dim=-1)
                    scores[rows] = torch.logaddexp(scores[rows], lp)
        nxt = pick(scores)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if padded:
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
        pos = pos + 1
        if eos:
            done |= torch.isin(nxt, torch.tensor(eos, device=dev))
            if bool(done.all()):
                break
        if _step == max_new_tokens - 1:
            break
        stats.positions += B  # the new token goes in: the chosen students run on it
        for c, (i, rows, dec) in enumerate(chosen):
            everyone = rows.numel() == B
            logits_of = dec.run(nxt[:, None] if everyone else nxt[rows, None],
                                pos[:, None] if everyone else pos[rows, None],
                                (mask if everyone else mask[rows]) if padded else None, padded)
            stats.student_positions[i] += int(rows.numel())
            pending[c] = logits_of(0, 1)[:, 0]
    return ids


__all__ = ["SparseStats", "forward_logprobs", "generate", "score"]
