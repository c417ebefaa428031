"""Reading the data stage's packed token blocks: the one interface every later stage uses.

Layout written by the data stage, under ``<run>/data/``::

    meta.json                      {"shards": [names...], "block_size": int, "dtype": "uint16"|"uint32",
                                    "vocab_size": int, "eos_token_id": int,
                                    "doc_separator": {"token": str, "id": int} (between packed documents), ...}
    <shard>/meta.json              per-shard: documents, tokens per split, sources and hashes, unigram entropy
    <shard>/{train,val,test}.bin   raw numpy array of dtype, shape [n_blocks, block_size] (C order)
    cluster/                       shard_by: cluster only: the fitted clusterer (downscale.data.cluster.Clusterer.load)
    sources.json                   shard_by: cluster only: every source's files with their hashes

Top-level meta.json also holds ``seed``, ``shard_by``, ``tokenizer`` (kind, source, ids, BPE training
characters), ``split_method`` and per-source counts (documents kept, skipped by reason). A shard's
meta.json holds per split ``documents``/``tokens``/``blocks`` and ``splits`` (documents available,
tokens read, dropped over budget / by the per-document cap / in the final partial block),
``budget``, ``unigram_entropy`` (nats, of the train tokens), and its ``sources`` with their files
(or, in cluster mode, ``cluster`` and ``source_documents``). Each block is a window of the stream
``doc, EOS, doc, EOS, ...`` of that split's documents in a seeded hash order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from downscale._io import read_json

SPLITS = ("train", "val", "test")


def data_meta(run_dir: str | Path) -> dict:
    """The top-level ``data/meta.json`` of a run."""
    return read_json(Path(run_dir) / "data" / "meta.json")


def shard_names(run_dir: str | Path) -> list[str]:
    return list(data_meta(run_dir)["shards"])


def open_split(run_dir: str | Path, shard: str, split: str) -> np.ndarray:
    """Memory-map one split of one shard: an array of shape [n_blocks, block_size]."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    meta = data_meta(run_dir)
    path = Path(run_dir) / "data" / shard / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    block = int(meta["block_size"])
    n = path.stat().st_size // (dtype.itemsize * block)
    if n == 0:
        return np.zeros((0, block), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n, block))
