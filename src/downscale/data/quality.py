"""Data pruning by quality: each training document scored by the base's mean NLL per token, a band of it kept.

Marion et al. 2023 ("When Less is More") and Ankner et al. 2024 ("Perplexed by Perplexity") select pretraining data
by a reference model's perplexity per document; here the reference is the base, which the specialize stage loads
anyway as the teacher. They disagree on which end of the distribution helps, so the kept band is a choice
(``quality.band``: percentiles of the per-document mean NLL, low = text the base finds easy).

- ``split_documents``: a packed split back into its documents (the packer writes each document's ids and then the
  separator; the piece after the last separator is a document cut by the split's end).
- ``score_documents``: each document alone, from its start (its first ``score_tokens`` tokens), batched longest
  first with right padding (causal attention: a real token never sees padding), the LM head applied in fp32 chunk
  by chunk; resumable through a scores file written every few batches.
- ``select_band`` and ``repack``: the kept documents packed again into blocks, each followed by the separator.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downscale._io import write_json_atomic

SCORE_FORMAT = 1


def split_documents(blocks: np.ndarray, sep: int) -> list[np.ndarray]:
    """The documents of a packed split [n_blocks, block] (separators removed, empty pieces dropped), in order."""
    flat = np.asarray(blocks).reshape(-1)
    cuts = np.flatnonzero(flat == sep)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [flat.size]])
    return [flat[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True) if e > s]


def repack(docs: list[np.ndarray], sep: int, block: int, dtype: np.dtype) -> np.ndarray:
    """Documents packed into [n, block] blocks, each followed by the separator; the final partial block dropped."""
    if not docs:
        return np.zeros((0, block), dtype=dtype)
    stream = np.concatenate([np.append(d, sep) for d in docs]).astype(dtype, copy=False)
    n = stream.size // block
    return np.ascontiguousarray(stream[: n * block]).reshape(n, block)


def check_band(band: tuple[float, float]) -> None:
    lo, hi = band
    if not (0.0 <= lo < hi <= 100.0):
        raise ValueError(f"the band must be percentiles 0 <= low < high <= 100; got [{lo}, {hi}]")


def select_band(scores: np.ndarray, band: tuple[float, float]) -> tuple[np.ndarray, float, float]:
    """(keep mask, low threshold, high threshold): documents whose score lies within the band's percentiles of the
    scored documents, inclusive; unscored documents (NaN: under two tokens) are kept."""
    check_band(band)
    finite = np.isfinite(scores)
    if not finite.any():
        return np.ones(scores.shape, dtype=bool), math.nan, math.nan
    lo, hi = (float(np.percentile(scores[finite], p)) for p in band)
    keep = ~finite | ((scores >= lo) & (scores <= hi))
    return keep, lo, hi


@torch.no_grad()
def score_documents(model, docs: list[np.ndarray], score_tokens: int, batch_size: int, device, amp=None,
                    cache: str | Path | None = None, key: str = "", save_every: int = 4, progress: bool = True,
                    on_batch=None) -> np.ndarray:
    """Mean next-token NLL (nats) of each document under ``model``, from its first ``score_tokens`` tokens, each
    document alone [n_docs] (NaN for a document of fewer than two tokens). With ``cache`` (a folder), the scores
    so far are kept there with ``key`` every ``save_every`` batches and a matching file resumes the pass;
    ``on_batch(done, total)`` after each batch (tests interrupt from it)."""
    from downscale import models
    from downscale.progress import bar as progress_bar

    n = len(docs)
    lengths = np.array([min(len(d), score_tokens) for d in docs], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: padding stays small within a batch
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    scores = np.full(n, np.nan, dtype=np.float64)
    done = 0
    cache = Path(cache) if cache is not None else None
    if cache is not None and (cache / "progress.json").is_file():
        try:
            prog = json.loads((cache / "progress.json").read_text())
            if prog.get("key") == key and prog.get("format") == SCORE_FORMAT and prog.get("documents") == n:
                saved = np.load(cache / "scores.npy", allow_pickle=False)
                if saved.shape == (n,):
                    scores, done = saved.astype(np.float64), int(prog["batches_done"])
        except (OSError, ValueError, KeyError):
            done = 0
    split = models.split_head(model)
    if split is None:
        raise ValueError("quality scoring needs a LLaMA / Qwen2 / Mistral causal LM (its head split off)")
    body, head = split
    w = head.weight.detach().float()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    bar = progress_bar(total=len(batches), initial=done, desc="quality: documents scored", unit="batch", leave=False,
                       disable=not progress)
    for bi in range(done, len(batches)):
        idx = batches[bi]
        width = int(lengths[idx].max())
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        for r, j in enumerate(idx.tolist()):
            ids[r, :lengths[j]] = torch.as_tensor(docs[j][: lengths[j]].astype(np.int64))
        ids = ids.to(device)
        lens = torch.as_tensor(lengths[idx], device=device)
        if width >= 2:
            mask = (torch.arange(width, device=device)[None, :] < lens[:, None]).long()
            with models.autocast(device, amp):
                h = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            valid = (torch.arange(width - 1, device=device)[None, :] < (lens - 1)[:, None])  # [b, width-1]
            rows = valid.nonzero()
            hv = h[rows[:, 0], rows[:, 1]]
            labels = ids[rows[:, 0], rows[:, 1] + 1]
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device)
            step = models.nll_chunk_tokens(w.shape[0])
            with models.no_autocast(device):
                for c in range(0, labels.shape[0], step):
                    ce = torch.nn.functional.cross_entropy(hv[c:c + step].float() @ w.T, labels[c:c + step],
                                                           reduction="none")
                    sums.index_add_(0, rows[c:c + step, 0], ce.double())
            counts = (lens - 1).clamp_min(0)
            mean = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, math.nan))
            scores[idx] = mean.cpu().numpy()
        bar.update(1)
        last = bi + 1 == len(batches)
        if cache is not None and rank0 and ((bi + 1 - done) % save_every == 0 or last):
            _save(cache, scores, key, bi + 1, n)
        if on_batch is not None:
            on_batch(bi + 1, len(batches))
    bar.close()
    return scores


def _save(cache: Path, scores: np.ndarray, key: str, batches_done: int, n: int) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".scores.{os.getpid()}.npy"
    np.save(tmp, scores, allow_pickle=False)
    os.replace(tmp, cache / "scores.npy")
    write_json_atomic(cache / "progress.json", {"format": SCORE_FORMAT, "key": key, "batches_done": batches_done,
                                                "documents": n})


def summary(docs: list[np.ndarray], scores: np.ndarray, keep: np.ndarray, lo: float, hi: float,
            band: tuple[float, float], blocks_before: int, blocks_after: int, bins: int = 20) -> dict[str, Any]:
    """What a pruned shard records: counts, tokens, the thresholds and a histogram of the scores."""
    tokens = np.array([len(d) for d in docs], dtype=np.int64)
    finite = scores[np.isfinite(scores)]
    counts, edges = (np.histogram(finite, bins=bins) if finite.size else (np.zeros(0), np.zeros(0)))
    low = np.isfinite(scores) & (scores < lo)
    high = np.isfinite(scores) & (scores > hi)
    return {
        "band": list(band), "thresholds": [lo, hi],
        "documents": {"scored": int(np.isfinite(scores).sum()), "unscored": int((~np.isfinite(scores)).sum()),
                      "kept": int(keep.sum()), "dropped_low": int(low.sum()), "dropped_high": int(high.sum())},
        "tokens": {"before": int(tokens.sum()), "kept": int(tokens[keep].sum()),
                   "dropped_low": int(tokens[low].sum()), "dropped_high": int(tokens[high].sum())},
        "blocks": {"before": int(blocks_before), "after": int(blocks_after)},
        "score_mean": {"all": float(finite.mean()) if finite.size else None,
                       "kept": float(np.nanmean(scores[keep])) if np.isfinite(scores[keep]).any() else None},
        "histogram": {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]},
    }


__all__ = ["check_band", "repack", "score_documents", "select_band", "split_documents", "summary"]
