"""Splitting documents into train/val/test, and packing token ids into fixed-length blocks.

Splits are by document and by hash: a document goes to ``test`` when
``h(seed, split key) < test_fraction``, to ``val`` when below ``test_fraction + val_fraction``,
else to ``train``, where ``h`` maps a string to [0, 1) through blake2b. The assignment of a
document never depends on the other documents, so adding documents to a corpus moves none of the
old ones, and documents that share a split key (a module's code and its docstrings) share a split.
A split that would be empty borrows the train document closest to its hash range (recorded).

Within a split, documents are packed in the order of a second hash, ``h(seed, "order", text)``: a
deterministic shuffle, so that a token budget takes a random sample of the documents rather than
the first files in alphabetical order. Packing concatenates each document's ids followed by one
EOS, stops once the budget is reached (the last document may be cut), and drops the final partial
block. When a budget binds, no document gives more than 1/16 of it (``MAX_DOC_SHARE``; at least one
block; raised just enough when the capped documents could not fill the budget): a budgeted sample,
a test set above all, then spans at least 16 documents instead of the first one or two long files.
A split that fits in its budget is never capped. Everything dropped or cut is counted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from downscale._io import temp_file_for, with_filename
from downscale.data.blocks import SPLITS
from downscale.data.sources import Document

_SCALE = float(2**64)
# Under a token budget, one document contributes at most this share of it (see the module docstring).
MAX_DOC_SHARE = 1 / 16


def unit_hash(seed: int, tag: str, key: str) -> float:
    """A deterministic number in [0, 1) from (seed, tag, key)."""
    h = hashlib.blake2b(f"{seed}\x00{tag}\x00".encode() + key.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "big") / _SCALE


def split_of(u: float, val_fraction: float, test_fraction: float) -> str:
    """The split of a document whose split hash is ``u``."""
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(docs: Sequence[Document], seed: int, val_fraction: float, test_fraction: float
                  ) -> tuple[dict[str, list[Document]], dict[str, int]]:
    """Split ``docs`` into train/val/test (each list in packing order) and say how many documents
    were borrowed from train to fill an otherwise empty val or test split."""
    scored = []
    for doc in docs:
        u = unit_hash(seed, "split", doc.split_key if doc.split_key is not None else doc.text)
        scored.append((u, unit_hash(seed, "order", doc.text), doc))
    parts: dict[str, list[tuple[float, float, Document]]] = {s: [] for s in SPLITS}
    for item in scored:
        parts[split_of(item[0], val_fraction, test_fraction)].append(item)
    borrowed = {}
    for split in ("val", "test"):
        if not parts[split] and len(parts["train"]) >= 2:
            # The train document with the smallest split hash is the nearest to the held-out range.
            i = min(range(len(parts["train"])), key=lambda j: parts["train"][j][0])
            parts[split].append(parts["train"].pop(i))
            borrowed[split] = 1
    out = {s: [doc for _, _, doc in sorted(parts[s], key=lambda t: (t[1], t[0]))] for s in SPLITS}
    return out, borrowed


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass
class Packed:
    """One packed split: blocks [n_blocks, block_size] and what went into them."""

    blocks: np.ndarray
    documents: int  # documents that contributed tokens (the last one possibly cut by the budget)
    documents_available: int
    tokens_read: int  # ids of those documents plus one EOS each (after the per-document cap)
    over_budget: int  # tokens cut because the budget was reached
    partial_block: int  # tokens of the final partial block, dropped
    documents_capped: int = 0  # documents cut to the per-document cap
    capped_tokens: int = 0  # tokens those cuts left out

    @property
    def tokens(self) -> int:
        return int(self.blocks.size)

    def to_json(self) -> dict:
        return {"documents": self.documents, "documents_available": self.documents_available,
                "tokens": self.tokens, "blocks": int(self.blocks.shape[0]), "tokens_read": self.tokens_read,
                "dropped_over_budget": self.over_budget, "dropped_partial_block": self.partial_block,
                "documents_capped": self.documents_capped, "dropped_by_cap": self.capped_tokens}


def max_doc_tokens(budget: int | None, block_size: int) -> int | None:
    """The per-document cap under ``budget`` (None: no budget, no cap), EOS included."""
    if budget is None:
        return None
    return max(block_size, int(np.ceil(budget * MAX_DOC_SHARE)))


def pack(docs: Sequence[Document], encode: Callable[[list[str]], list[list[int]]], eos_id: int, block_size: int,
         dtype: np.dtype, budget: int | None = None, desc: str = "pack", batch_docs: int = 64,
         batch_chars: int = 2_000_000, doc_cap: int | None = None) -> Packed:
    """Tokenize ``docs`` in order (batched), put EOS after each, stop at ``budget`` tokens, and cut the
    stream into blocks of ``block_size`` (the final partial block is dropped).

    ``doc_cap`` (EOS included; the first ids of a document are kept) applies only when the budget
    binds: if the whole split fits in the budget, nothing is capped; if the capped documents cannot
    fill the budget, the cap is raised to the smallest value that can."""
    from downscale import progress

    encoded: list[list[int]] = []
    raw_total = capped_total = 0
    bar = progress.bar(total=len(docs), desc=desc, unit="doc", leave=False, mininterval=1.0, disable=None)
    i, done = 0, False
    while i < len(docs) and not done:
        batch, chars = [], 0
        while i < len(docs) and len(batch) < batch_docs and (not batch or chars < batch_chars):
            batch.append(docs[i].text)
            chars += len(docs[i].text)
            i += 1
        for ids in encode(batch):
            encoded.append(ids)
            raw_total += len(ids) + 1
            capped_total += min(len(ids) + 1, doc_cap) if doc_cap is not None else len(ids) + 1
            if budget is not None and capped_total >= budget:
                done = True
                break
        bar.update(len(batch))
    bar.close()
    lengths = np.asarray([len(ids) + 1 for ids in encoded], dtype=np.int64)  # with EOS
    cap = None
    if budget is not None and doc_cap is not None and raw_total > budget:
        cap = doc_cap if capped_total >= budget else _fill_cap(lengths, budget, doc_cap)
    kept = np.minimum(lengths, cap) if cap is not None else lengths
    total = int(kept.sum())
    limit = min(total, budget) if budget is not None else total
    stream = np.empty(total, dtype=dtype)
    pos = 0
    for ids, n in zip(encoded, kept.tolist(), strict=True):
        stream[pos:pos + n - 1] = ids[: n - 1]
        stream[pos + n - 1] = eos_id
        pos += n
    n_blocks = limit // block_size
    blocks = np.ascontiguousarray(stream[: n_blocks * block_size]).reshape(n_blocks, block_size)
    starts = np.cumsum(kept) - kept
    return Packed(blocks=blocks, documents=int((starts < limit).sum()), documents_available=len(docs),
                  tokens_read=total, over_budget=total - limit, partial_block=limit - n_blocks * block_size,
                  documents_capped=int((lengths > kept).sum()), capped_tokens=int((lengths - kept).sum()))


def _fill_cap(lengths: np.ndarray, budget: int, low: int) -> int:
    """The smallest cap >= ``low`` with sum(min(lengths, cap)) >= budget (given sum(lengths) > budget)."""
    lo, hi = low, int(lengths.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if int(np.minimum(lengths, mid).sum()) >= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float | None:
    """Entropy (nats) of the token frequencies: the loss of a model that knows only unigram counts."""
    flat = np.asarray(tokens).ravel()
    if flat.size == 0:
        return None
    counts = np.bincount(flat.astype(np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / flat.size
    return float(-(p * np.log(p)).sum())


def write_blocks(path: str | Path, blocks: np.ndarray) -> None:
    """Write blocks as a raw C-order array through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.ascontiguousarray(blocks).tofile(fh)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        named = with_filename(exc, path)
        if named is not exc:
            raise named from exc
        raise


def bpe_training_texts(shard_train_docs: Sequence[Sequence[Document]], train_chars: int):
    """At most ``train_chars`` characters of training text for the BPE, an equal share from each
    shard, each shard's documents in packing order (the last one cut to fit). Returns (texts, chars)."""
    share = max(1, train_chars // max(1, len(shard_train_docs)))
    texts: list[str] = []
    total = 0
    for docs in shard_train_docs:
        left = share
        for doc in docs:
            if left <= 0:
                break
            piece = doc.text[:left]
            texts.append(piece)
            left -= len(piece)
        total += share - left
    return texts, total
