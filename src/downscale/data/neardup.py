"""Near-duplicate documents: MinHash signatures of word n-gram shingles, LSH banding, and a Jaccard check.

The data stage drops exact duplicates (``sources.dedupe``); a copy with a changed header, a re-wrapped paragraph or
a different licence year is still a duplicate for training purposes, and the papers on data pruning remove those too
(Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better": MinHash over 5-grams at Jaccard 0.8).

How: a document's shingles are its lower-cased word n-grams (the whole text when it has fewer than n words), each
hashed to 32 bits (blake2b); its signature holds, for each of ``num_perm`` hash functions (a 64-bit mixer of the
shingle hash XOR a salt per function), the minimum over its shingles. Two documents agree on one signature entry with
probability equal to the Jaccard similarity of their shingle sets, so the fraction of equal entries estimates it.
Candidates come from LSH: the signature is cut into ``bands`` bands of ``rows`` entries and two documents that agree
on a whole band are compared (bands x rows = num_perm, chosen so that (1/bands)^(1/rows), where the candidate
probability curve is steepest, sits just below the threshold: few true near-duplicates are missed). A candidate
whose estimated Jaccard is at least ``threshold`` is a near-duplicate of the earlier document; documents are visited
in corpus order and the first of each group is kept. Deterministic: fixed hash parameters from a seed, no
randomness in the order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def choose_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows), bands x rows = num_perm: the largest threshold point (1/bands)^(1/rows) that is still at
    most ``threshold`` (so near-duplicates at the threshold are candidates with probability above ~1/2)."""
    best = (num_perm, 1)
    best_point = -1.0
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        point = (1.0 / bands) ** (1.0 / rows)
        if point <= threshold and point > best_point:
            best, best_point = (bands, rows), point
    return best


class MinHasher:
    """MinHash signatures of documents (see the module docs)."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        if num_perm < 1 or ngram < 1:
            raise ValueError(f"num_perm and ngram must be >= 1; got {num_perm}, {ngram}")
        self.num_perm, self.ngram = int(num_perm), int(ngram)
        # hash function i: the 64-bit murmur3 finalizer of (shingle hash XOR salt_i). A linear (a x + b) mod p with
        # 64-bit arithmetic is nearly monotone in x between its few wraps, so its minima agree across functions and
        # the estimate strays (0.94 for an exact 0.73, measured); the finalizer mixes every bit.
        self.salt = np.random.default_rng(seed).integers(0, 2**63, size=self.num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """The 32-bit hashes of the text's distinct lower-cased word n-grams [S] (uint64)."""
        words = text.lower().split()
        n = self.ngram
        grams: Iterable[str] = ([" ".join(words)] if len(words) < n else
                                {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)})
        return np.fromiter((int.from_bytes(hashlib.blake2b(g.encode("utf-8", "surrogatepass"), digest_size=4)
                                           .digest(), "little") for g in grams), dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """The document's MinHash signature [num_perm] (uint64)."""
        x = self.shingles(text)
        if x.size == 0:
            return np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        out = np.empty(self.num_perm, dtype=np.uint64)
        step = max(1, (1 << 22) // max(1, x.size))  # hash functions per block: at most ~4M values at once
        for p0 in range(0, self.num_perm, step):
            out[p0:p0 + step] = _mix64(x[None, :] ^ self.salt[p0:p0 + step, None]).min(axis=1)
        return out


def _mix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer, element-wise (uint64 products wrap modulo 2^64, as intended)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of equal signature entries: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def exact_jaccard(a: str, b: str, ngram: int = 5) -> float:
    """The Jaccard similarity of two texts' word n-gram sets (as ``MinHasher.shingles`` forms them, unhashed)."""
    def grams(t: str) -> set[str]:
        w = t.lower().split()
        return {" ".join(w)} if len(w) < ngram else {" ".join(w[i:i + ngram]) for i in range(len(w) - ngram + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / max(1, len(ga | gb))


def near_duplicates(texts: list[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                    seed: int = 0) -> list[int | None]:
    """For each text in order: None if it is kept, else the index of the earlier kept text it near-duplicates
    (estimated Jaccard >= ``threshold`` on an LSH candidate)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    hasher = MinHasher(num_perm, ngram, seed)
    bands, rows = choose_bands(num_perm, threshold)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    kept: dict[int, np.ndarray] = {}
    out: list[int | None] = []
    for i, text in enumerate(texts):
        sig = hasher.signature(text)
        keys = [sig[j * rows:(j + 1) * rows].tobytes() for j in range(bands)]
        match = None
        seen: set[int] = set()
        for j, key in enumerate(keys):
            for c in buckets[j].get(key, ()):
                if c in seen:
                    continue
                seen.add(c)
                if estimated_jaccard(sig, kept[c]) >= threshold and (match is None or c < match):
                    match = c
        out.append(match)
        if match is None:
            kept[i] = sig
            for j, key in enumerate(keys):
                buckets[j].setdefault(key, []).append(i)
    return out


def near_dedupe(per_source: list[list], reports: list, threshold: float, num_perm: int, ngram: int,
                seed: int = 0) -> list[list]:
    """Drop near-duplicate documents across the whole corpus (``near_duplicates`` over every source's documents in
    source order; the first of each group is kept); each source's report counts its dropped documents as
    ``near_duplicate``."""
    flat = [(si, d) for si, docs in enumerate(per_source) for d in docs]
    dup = near_duplicates([d.text for _, d in flat], threshold, num_perm, ngram, seed)
    out: list[list] = [[] for _ in per_source]
    for (si, doc), match in zip(flat, dup, strict=True):
        if match is None:
            out[si].append(doc)
        else:
            reports[si].skipped["near_duplicate"] += 1
    for report, docs in zip(reports, out, strict=True):
        report.documents = len(docs)
    return out


__all__ = ["MinHasher", "near_dedupe", "choose_bands", "estimated_jaccard", "exact_jaccard", "near_duplicates"]
