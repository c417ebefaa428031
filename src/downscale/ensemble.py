"""The ensemble of specialized students, usable like one Hugging Face causal LM.

``EnsembleModel(students, mode=...)`` wraps n causal LMs that share one vocabulary and returns
combined next-token scores. Modes (``logits`` is what ``forward`` returns, [B, T, V]):

- ``logit_mean``: the mean of the students' logits (a product of experts); ``logits`` are those
  mean logits (log_softmax them for log-probabilities).
- ``prob_mean``: the mixture log((1/n) sum_i p_i), what BTM / c-BTM use; ``logits`` are log-probs.
- ``routed``: the mixture log sum_i w_i(t) p_i with per-position weights from a router
  (``downscale.routing``): ``bayes`` (causal Bayesian posterior over students from the tokens seen
  so far, with a prior estimated on validation data) or ``cluster`` (c-BTM: softmax of minus the
  distance of the prefix text to each cluster centroid); optional top-k and frozen-after-prefix.
- ``weighted``: the mixture log sum_i w_i p_i with fixed weights.
- ``sparse``: the routed mixture, routed once per sequence from its first ``sparse_prefix`` tokens, after which
  only the ``sparse_top_k`` chosen students run (``downscale.sparse``): what makes an ensemble cheaper than the
  base at inference. ``sparse_stats`` counts what ran.

``forward(input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=False)``
returns a ``CausalLMOutputWithPast`` (``.loss`` is the HF-shifted mean next-token NLL of the
combined distribution); ``generate(...)`` decodes greedily or by sampling with a KV cache per
student (or one stacked cache). With an attention mask, position ids are derived from it (as
``generate`` does in transformers), so left-padded batches score like unpadded ones.

Fast path: students of one shape run as one stacked, batched computation
(``downscale.fastpath``); the combination runs over chunks of positions so that the n students'
[B, T, V] logits are never all held at once. Otherwise the students' decoders run one after another
and their output heads are applied chunk by chunk in the same way. Both paths share the combination
code and agree to fp32 rounding.

Saved form: ``<run>/ensemble/ensemble.json`` (see ``downscale.ensemble_io``), loaded with
``load_ensemble(path, mode=None, device="cpu", dtype=torch.float32)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from downscale import routing, sparse
from downscale.fastpath import StackedKV, StackedStudents, padded_causal_mask, stack_incompatibility
from downscale.models import split_head
from downscale.pipeline import StageError
from downscale.sparse import SparseStats

MODES = ("logit_mean", "prob_mean", "routed", "weighted", "sparse")
# Per chunk of positions the combination holds about this many bytes of per-student fp32 scores.
DEFAULT_CHUNK_BYTES = 16 * 2**20  # measured best of 1-512 MiB on CPU (n=8, V=8192)
# On a GPU: 16 MiB would be 1 position per chunk for 8 students x 4 rows at a 128k vocabulary, each chunk a
# few-row matmul reading every student's whole head (launch- and bandwidth-bound); 1 GiB gives ~64 positions.
DEFAULT_CHUNK_BYTES_GPU = 2**30
# With the default budget a chunk has at least this many rows (batch x positions): each chunk reads every student's
# whole head, and at a real vocabulary the 16 MiB budget left 3 positions per chunk (SmolLM2, V = 49,152, n = 3,
# batch 8: prob_mean scored 8 x 256 tokens in 29.7 s at 16 MiB, 17.9 s at 64 MiB, 15.5 s at 256 MiB).
MIN_CHUNK_ROWS = 256


class EnsembleError(StageError, ValueError):
    """Bad ensemble input (unknown mode, bad weights, missing student, mismatched vocabularies).
    ``str(err)`` is one line naming the file or field; a StageError, so the CLI prints just that line."""


@dataclass
class EnsembleCache:
    """What ``forward(use_cache=True)`` returns as ``past_key_values``: the students' KV caches
    (one HF cache per student, or one stacked cache) and the router's running state."""

    student_caches: list[Any] | None
    stacked: StackedKV | None
    ids: torch.Tensor  # [B, S] every token so far
    mask: torch.Tensor  # [B, S] 1 = real token
    positions: torch.Tensor  # [B, S] position ids
    evidence: torch.Tensor | None = None  # [n, B] float64: bayes evidence up to the last token
    pending: torch.Tensor | None = None  # [n, B, V]: per-student log-probs at the last position

    def get_seq_length(self) -> int:
        return int(self.ids.shape[1])


def check_weights(weights: Any, n: int, where: str = "weights") -> list[float]:
    """Fixed weights: n non-negative numbers summing to 1 (within 1e-6). Raises EnsembleError."""
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise EnsembleError(f"{where}: expected a list of {n} numbers; got {weights!r}") from None
    if len(w) != n:
        raise EnsembleError(f"{where}: expected {n} weights (one per student); got {len(w)}")
    if any(x < 0 or not math.isfinite(x) for x in w):
        raise EnsembleError(f"{where}: weights must be finite and non-negative; got {w}")
    if abs(sum(w) - 1.0) > 1e-6:
        raise EnsembleError(f"{where}: weights must sum to 1; they sum to {sum(w):.6g}")
    return w


def check_mode(mode: str, where: str = "mode") -> str:
    if mode not in MODES:
        raise EnsembleError(f"{where}: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


class EnsembleModel(torch.nn.Module):
    """n causal LMs with one vocabulary, combined into one next-token distribution (see module docs).

    Args:
        students: HF causal LMs (``.students`` keeps them, in order; student i <-> shard i).
        mode: one of MODES.
        weights: fixed weights for ``weighted`` (n non-negative numbers summing to 1).
        prior: the Bayes router's prior over students (default uniform).
        router: ``bayes`` or ``cluster``; router_prefix: tokens the router sees (None: all so far);
        router_temperature: divides the evidence (bayes) or the distances (cluster);
        router_top_k: keep the k largest weights per position.
        sparse_top_k, sparse_prefix: mode ``sparse``: students kept per sequence, tokens the router reads.
        cluster_dir: the data stage's clusterer folder (router ``cluster``), or ``clusterer``: an object
        with ``distances(texts) -> [N, n]``; tokenizer: decodes prefixes for the cluster router and
        text for ``generate_text``.
        fast: use the stacked fast path when the students share one shape.
        chunk_bytes: size of the per-chunk score buffer of the combination; None: ``DEFAULT_CHUNK_BYTES`` on a
        CPU, ``DEFAULT_CHUNK_BYTES_GPU`` elsewhere.
    """

    def __init__(self, students: list, mode: str = "logit_mean", weights: list[float] | None = None,
                 prior: list[float] | None = None, router: str = "bayes", router_prefix: int | None = None,
                 router_temperature: float = 1.0, router_top_k: int | None = None,
                 cluster_dir: str | Path | None = None, clusterer: Any = None, tokenizer: Any = None,
                 fast: bool = True,
                 chunk_bytes: int | None = None, sparse_top_k: int = 1, sparse_prefix: int = 16):
        super().__init__()
        if not students:
            raise EnsembleError("an ensemble needs at least one student")
        vocab = {int(s.config.vocab_size) for s in students}
        if len(vocab) > 1:
            raise EnsembleError(f"students have different vocabulary sizes {sorted(vocab)}; an ensemble needs one "
                                f"shared vocabulary")
        self.students = torch.nn.ModuleList(students)
        self.n, self.vocab_size = len(students), vocab.pop()
        self.weights = check_weights(weights, self.n) if weights is not None else None
        if prior is not None:
            prior = check_weights(prior, self.n, "prior")
        self.prior = prior
        if router not in routing.ROUTERS:
            raise EnsembleError(f"router: unknown router {router!r}; expected one of {', '.join(routing.ROUTERS)}")
        if router_prefix is not None and router_prefix < 1:
            raise EnsembleError(f"router_prefix: expected at least 1 token; got {router_prefix}")
        if router_temperature <= 0:
            raise EnsembleError(f"router_temperature: expected > 0; got {router_temperature}")
        self.router, self.router_prefix = router, router_prefix
        if not 1 <= int(sparse_top_k) <= self.n:
            raise EnsembleError(f"sparse_top_k: expected 1 to {self.n} (the number of students); got {sparse_top_k}")
        if int(sparse_prefix) < 1:
            raise EnsembleError(f"sparse_prefix: expected at least 1 token; got {sparse_prefix}")
        self.sparse_top_k, self.sparse_prefix = int(sparse_top_k), int(sparse_prefix)
        self.sparse_stats = SparseStats(self.n)
        self.router_temperature, self.top_k = float(router_temperature), router_top_k
        self.cluster_dir, self.clusterer, self.tokenizer = cluster_dir, clusterer, tokenizer
        self._cluster: routing.ClusterRouter | None = None
        self._chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)
        self.fast = bool(fast)
        self.stack_reason = stack_incompatibility(list(students))  # None: the students can be stacked
        self._stack: StackedStudents | None = None
        self._stack_key: tuple | None = None
        self._capture: list[torch.Tensor] | None = None
        self.mode = mode
        self.eval()

    # ------------------------------------------------------------------ properties

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        check_mode(mode)
        if mode == "weighted" and self.weights is None:
            raise EnsembleError("mode 'weighted' needs weights (combine.weights)")
        if mode in ("routed", "sparse") and self.router == "cluster" and self.cluster_dir is None and \
                self.clusterer is None:
            raise EnsembleError("router 'cluster' needs the clusterer (cluster_dir)")
        self._mode = mode

    @property
    def chunk_bytes(self) -> int:
        """Bytes of per-student fp32 scores per chunk of positions (see ``__init__``)."""
        if self._chunk_bytes is not None:
            return self._chunk_bytes
        return DEFAULT_CHUNK_BYTES if self.device.type == "cpu" else DEFAULT_CHUNK_BYTES_GPU

    @chunk_bytes.setter
    def chunk_bytes(self, value: int | None) -> None:
        self._chunk_bytes = None if value is None else int(value)

    @property
    def device(self) -> torch.device:
        return next(self.students[0].parameters()).device

    @property
    def uses_fast_path(self) -> bool:
        """True when forward runs the students as one stacked computation."""
        return self.fast and self.stack_reason is None

    @property
    def fallback_reason(self) -> str | None:
        """Why the students run one by one (None on the fast path)."""
        if self.uses_fast_path:
            return None
        return self.stack_reason or "fast path switched off"

    def _stacked(self) -> StackedStudents:
        """The stacked students, rebuilt if the students moved (``.to``) since they were stacked."""
        p = next(self.students[0].parameters())
        key = (p.data_ptr(), p.device, p.dtype)
        if self._stack is None or key != self._stack_key:
            self._stack = StackedStudents(list(self.students))
            p = next(self.students[0].parameters())
            self._stack_key = (p.data_ptr(), p.device, p.dtype)
        return self._stack

    def _router(self) -> routing.ClusterRouter:
        if self._cluster is None:
            if self.tokenizer is None:
                raise EnsembleError("router 'cluster' needs the tokenizer to decode prefixes")
            if self.clusterer is None:
                self.clusterer = routing.load_clusterer(self.cluster_dir)
            self._cluster = routing.ClusterRouter(
                self.clusterer, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), self.n,
                prefix=self.router_prefix, temperature=self.router_temperature, top_k=self.top_k)
        return self._cluster

    # ------------------------------------------------------------------ per-student scores

    def _prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cache: EnsembleCache | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Full ids, mask and position ids (past + new) [B, S], and whether any position is padding."""
        B, q = input_ids.shape
        past_ids = cache.ids if cache is not None else input_ids[:, :0]
        ids = torch.cat([past_ids, input_ids], dim=1)
        S = ids.shape[1]
        if attention_mask is None:
            mask = torch.ones(B, S, dtype=torch.long, device=ids.device)
            if cache is not None:
                mask[:, :cache.mask.shape[1]] = cache.mask
        else:
            mask = attention_mask.to(device=ids.device, dtype=torch.long)
            if mask.shape[1] == q and cache is not None:
                mask = torch.cat([cache.mask, mask], dim=1)
            if mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {(B, S)} (past + new)")
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return ids, mask, positions, bool((mask == 0).any())

    def _score_chunks(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, padded: bool, q: int,
                      cache: EnsembleCache | None, new_cache: EnsembleCache | None, keep_from: int,
                      want_mean: bool = False) -> Iterator[tuple[int, int, torch.Tensor, bool]]:
        """Yield (t0, t1, Z, is_mean) for new positions [t0, t1) from ``keep_from`` on, in order: the
        students' logits Z [n, B, t1 - t0, V], or with ``want_mean`` their mean [1, B, t1 - t0, V]
        (is_mean True). Updates the KV caches of ``new_cache``."""
        n, (B, S) = self.n, ids.shape
        past = S - q
        new_ids, new_pos = ids[:, past:], positions[:, past:]
        tc = max(1, self.chunk_bytes // max(1, 4 * n * B * self.vocab_size))
        if self._chunk_bytes is None:  # the default budget: enough rows that reading the heads is not the cost
            tc = max(tc, -(-MIN_CHUNK_ROWS // B))
        if self.uses_fast_path:
            stack = self._stacked()
            kv = (cache.stacked if cache is not None else None) or (StackedKV(len(stack.layers))
                                                                    if new_cache is not None else None)
            attn = None
            if padded or (past and q > 1):
                attn = padded_causal_mask(mask, q)  # [B, 1, q, S]
            h = stack.hidden(new_ids, new_pos, attn, kv)  # [n, B, q, d]
            if new_cache is not None:
                new_cache.stacked = kv
            if want_mean:
                tc *= n  # one [B, tc, V] block per chunk instead of n
            for t0 in range(keep_from, q, tc):
                t1 = min(q, t0 + tc)
                hc = h[:, :, t0:t1].reshape(n, B * (t1 - t0), -1)
                if want_mean:
                    yield t0, t1, stack.mean_logits(hc).view(1, B, t1 - t0, -1), True
                else:
                    yield t0, t1, stack.logits(hc).view(n, B, t1 - t0, -1), False
            return
        # Sequential path: each student's decoder runs on its own; the output heads are applied chunk by
        # chunk, like the fast path's, so the students' [B, T, V] logits never exist at once (at a 128k
        # vocabulary they would be n x 4 B T V bytes). Students whose head cannot be split off run whole.
        hs, caches = [], []
        for i, student in enumerate(self.students):
            kwargs: dict[str, Any] = {"input_ids": new_ids, "position_ids": new_pos,
                                      "attention_mask": mask if padded else None}
            if new_cache is not None:
                kwargs.update(use_cache=True, past_key_values=cache.student_caches[i] if cache is not None else None)
            else:
                kwargs["use_cache"] = False
            split = split_head(student)
            if split is None:
                out = student(**kwargs, logits_to_keep=q - keep_from if keep_from else 0)
                hs.append((None, out.logits))  # [B, q - keep_from, V]
            else:
                body, head = split
                out = body(**kwargs)
                hs.append((head, out.last_hidden_state[:, keep_from:]))  # [B, q - keep_from, d]
            caches.append(out.past_key_values)
        if new_cache is not None:
            new_cache.student_caches = caches

        def scores(i: int, t0: int, t1: int) -> torch.Tensor:
            head, h = hs[i]
            part = h[:, t0 - keep_from:t1 - keep_from]
            return part if head is None else head(part)

        if want_mean:  # accumulate in place: no [n, B, tc, V] stack
            tc *= n
        for t0 in range(keep_from, q, tc):
            t1 = min(q, t0 + tc)
            if want_mean:
                total = scores(0, t0, t1).float()
                for i in range(1, n):
                    total += scores(i, t0, t1)
                yield t0, t1, total.div_(n)[None], True
            else:
                yield t0, t1, torch.stack([scores(i, t0, t1) for i in range(n)]), False

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values: EnsembleCache | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, **_: Any):
        """Combined scores ``.logits`` [B, T, V] (the last ``logits_to_keep`` positions if > 0), ``.loss``
        when ``labels`` are given (-100 ignored, HF-shifted), ``.past_key_values`` with ``use_cache``."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        with torch.no_grad():
            if self.mode == "sparse":
                if past_key_values is not None or use_cache:
                    raise EnsembleError("mode 'sparse' decodes through generate(); forward with a KV cache is not "
                                        "supported")
                input_ids = input_ids.to(self.device)
                mask = None if attention_mask is None else attention_mask.to(self.device)
                logits = sparse.forward_logprobs(self, input_ids, mask)
                logits, new_cache = (logits[:, -logits_to_keep:] if logits_to_keep else logits), None
            else:
                logits, new_cache = self._forward(input_ids, attention_mask, past_key_values, use_cache,
                                                  logits_to_keep)
        loss = None
        if labels is not None:
            V = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=new_cache)

    def _forward(self, input_ids, attention_mask, cache, use_cache, logits_to_keep):
        B, q = input_ids.shape
        keep_from = max(0, q - logits_to_keep) if logits_to_keep else 0
        out = None
        chunks, new_cache = self._combined_chunks(input_ids, attention_mask, cache, use_cache, keep_from)
        for t0, t1, combined in chunks:
            if t1 <= keep_from:
                continue
            if out is None:
                out = combined.new_empty(B, q - keep_from, combined.shape[-1])
            lo = max(t0, keep_from)
            out[:, lo - keep_from:t1 - keep_from] = combined[:, lo - t0:]
        return out, new_cache

    @torch.no_grad()
    def sum_nll(self, input_ids: torch.Tensor) -> tuple[float, int]:
        """Total next-token NLL of ``input_ids`` [B, T] (unpadded) under the combined model, and the number of
        tokens predicted, computed chunk by chunk: the [B, T, V] scores never exist at once (what evaluation
        needs at a 128k vocabulary)."""
        input_ids = input_ids.to(self.device)
        if self.mode == "sparse":
            target, _ = sparse.score(self, input_ids)
            return -float(target.double().sum()), int(target.numel())
        total, count = torch.zeros((), dtype=torch.float64, device=input_ids.device), 0  # read once, at the end
        chunks, _ = self._combined_chunks(input_ids, None, None, False, 0)
        for t0, t1, combined in chunks:
            stop = min(t1, input_ids.shape[1] - 1)  # position t predicts token t + 1
            if stop <= t0:
                continue
            logp = torch.log_softmax(combined[:, :stop - t0].float(), dim=-1)
            total -= logp.gather(-1, input_ids[:, t0 + 1:stop + 1, None]).sum().double()
            count += input_ids.shape[0] * (stop - t0)
        return float(total), count

    def _combined_chunks(self, input_ids, attention_mask, cache, use_cache, keep_from):
        """(chunk generator of (t0, t1, combined scores [B, t1 - t0, V]), the new cache, filled as the
        generator runs)."""
        input_ids = input_ids.to(self.device)
        B, q = input_ids.shape
        ids, mask, positions, padded = self._prepare(input_ids, attention_mask, cache)
        past = ids.shape[1] - q
        mode = self.mode
        bayes = mode == "routed" and self.router == "bayes"
        new_cache = EnsembleCache(None, None, ids, mask, positions) if use_cache else None

        def gen():
            log_w = None
            if mode == "routed" and self.router == "cluster":
                log_w = self._router().log_weights(ids, mask, positions, start=past)  # [n, B, q]
            elif mode == "weighted":
                log_w = torch.tensor(self.weights, device=ids.device).log()[:, None, None].expand(self.n, B, q)
            if bayes:
                log_prior = torch.tensor(self.prior or [1.0 / self.n] * self.n,
                                         dtype=torch.float64).log().to(ids.device)
                limit = math.inf if self.router_prefix is None else self.router_prefix - 1
                new_pos = positions[:, past:]
                valid = (mask[:, past:] == 1) & (new_pos >= 1) & (new_pos <= limit)  # [B, q]: token is evidence
                evidence = cache.evidence if cache is not None and cache.evidence is not None else \
                    torch.zeros(self.n, B, dtype=torch.float64, device=ids.device)
                pending = cache.pending if cache is not None else None
            chunks = self._score_chunks(ids, mask, positions, padded, q, cache, new_cache, 0 if bayes else keep_from,
                                        want_mean=mode == "logit_mean")
            for t0, t1, z, is_mean in chunks:
                z = z.float()
                if mode == "logit_mean":
                    combined = z[0] if is_mean else z.mean(0)
                elif mode == "prob_mean":
                    combined, _ = routing.mixture_from_logits(z)
                elif bayes:
                    lse = torch.logsumexp(z, dim=-1)  # [n, B, c]
                    tgt = input_ids[:, t0:t1]
                    first = pending.gather(-1, tgt[None, :, :1].expand(self.n, B, 1)) if pending is not None \
                        else torch.zeros(self.n, B, 1, device=z.device)
                    inner = z[:, :, :-1].gather(-1, tgt[None, :, 1:, None].expand(self.n, B, -1, 1)).squeeze(-1)
                    inner = inner - lse[:, :, :-1]  # log p_i(x_{t+1} | x_<=t)
                    scores = torch.cat([first, inner], dim=-1).double()  # [n, B, c]
                    scores = torch.where(valid[None, :, t0:t1], scores, torch.zeros_like(scores))
                    cum = evidence[..., None] + scores.cumsum(-1)  # [n, B, c]
                    evidence, pending = cum[..., -1], z[:, :, -1] - lse[:, :, -1, None]
                    lw = routing.bayes_log_weights(cum, log_prior, self.router_temperature, self.top_k).float()
                    combined, _ = routing.mixture_from_logits(z, lw, lse)
                    if self._capture is not None:
                        self._capture.append(lw)
                else:
                    combined, _ = routing.mixture_from_logits(z, log_w[:, :, t0:t1])
                yield t0, t1, combined
            if bayes and new_cache is not None:
                new_cache.evidence, new_cache.pending = evidence, pending

        return gen(), new_cache

    @torch.no_grad()
    def router_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The weights [n, B, T] of the students at each position (for predicting the next token) in the
        current mode: the router's for ``routed``, the fixed or uniform ones for the mixtures.
        (``logit_mean`` is not a mixture: it reports the uniform 1/n it averages logits with.)"""
        input_ids = input_ids.to(self.device)
        B, q = input_ids.shape
        if self.mode == "sparse":
            raise EnsembleError("router_weights: mode 'sparse' routes once per sequence (sparse_stats counts where "
                                "its sequences went)")
        if self.mode != "routed":
            w = torch.tensor(self.weights if self.mode == "weighted" else [1.0 / self.n] * self.n)
            return w[:, None, None].expand(self.n, B, q).to(input_ids.device).clone()
        if self.router == "cluster":
            ids, mask, positions, _ = self._prepare(input_ids, attention_mask, None)
            return self._router().log_weights(ids, mask, positions, start=0).exp()
        self._capture = []
        try:
            self._forward(input_ids, attention_mask, None, False, 1)
            return torch.cat(self._capture, dim=-1).exp()
        finally:
            self._capture = None

    @torch.no_grad()
    def student_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each student's log-probability of each next token: [n, B, T-1] (memory-light: no [B, T, V])."""
        input_ids = input_ids.to(self.device)
        B, q = input_ids.shape
        ids, mask, positions, padded = self._prepare(input_ids, None, None)
        out = torch.empty(self.n, B, q - 1, device=ids.device)
        for t0, t1, z, _ in self._score_chunks(ids, mask, positions, padded, q, None, None, 0):
            t1x = min(t1, q - 1)
            if t1x > t0:
                z = z[:, :, :t1x - t0].float()
                tgt = input_ids[None, :, t0 + 1:t1x + 1, None].expand(self.n, B, -1, 1)
                out[:, :, t0:t1x] = z.gather(-1, tgt).squeeze(-1) - torch.logsumexp(z, dim=-1)
        return out

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        """Decode up to ``max_new_tokens`` tokens after ``input_ids`` [B, T] (left-padded with
        ``attention_mask`` if rows differ in length). Greedy, or sampling with temperature / top-k /
        top-p. Rows that produced ``eos_token_id`` continue with ``pad_token_id``. Returns [B, T + new]."""
        input_ids = input_ids.to(self.device)
        eos = self._eos(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        mask = attention_mask.to(self.device) if attention_mask is not None else torch.ones_like(input_ids)
        if self.mode == "sparse":  # route on the prompt, then only the chosen students decode
            return sparse.generate(self, input_ids, mask.long(), max_new_tokens,
                                   lambda sc: _pick(sc, do_sample, temperature, top_k, top_p, generator), eos, pad)
        ids, cache = input_ids, None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        step_ids = ids
        for _step in range(max_new_tokens):
            if use_cache:
                logits, cache = self._forward(step_ids, mask, cache, True, 1)
            else:
                logits, _ = self._forward(ids, mask, None, False, 1)
            scores = logits[:, -1].float()  # [B, V]
            nxt = _pick(scores, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            step_ids = nxt[:, None]
            if eos:
                done |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
                if bool(done.all()):
                    break
        return ids

    def _eos(self, eos_token_id: int | list[int] | None) -> list[int]:
        if eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(self.students[0].generation_config, "eos_token_id", None)
        if eos_token_id is None:
            return []
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]

    def generate_text(self, prompts: list[str], max_new_tokens: int = 20, **kwargs: Any) -> list[str]:
        """Generate continuations of ``prompts`` (left-padded as one batch); returns the decoded new text."""
        if self.tokenizer is None:
            raise EnsembleError("generate_text needs the ensemble's tokenizer")
        tok = self.tokenizer
        encoded = [tok(p)["input_ids"] or [tok.eos_token_id] for p in prompts]
        width = max(len(e) for e in encoded)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        out = self.generate(ids, max_new_tokens=max_new_tokens, attention_mask=mask, pad_token_id=pad, **kwargs)
        return tok.batch_decode(out[:, width:], skip_special_tokens=True)


def _pick(scores: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from scores [B, V] (logits or log-probs)."""
    if not do_sample:
        return scores.argmax(-1)
    scores = scores / max(temperature, 1e-6)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def load_ensemble(path: str | Path, mode: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, fast: bool | None = None,
                  loaded: dict[Path, torch.nn.Module] | None = None) -> EnsembleModel:
    """Load ``<run>/ensemble`` (or its ``ensemble.json``) as an EnsembleModel in ``mode`` (default: the
    saved default mode), with the students in ``dtype`` on ``device`` (``loaded``: folder -> a student already
    in memory, used as it is). Raises EnsembleError (one line)."""
    from downscale.ensemble_io import load_ensemble as _load

    return _load(path, mode=mode, device=device, dtype=dtype, fast=fast, loaded=loaded)
