"""Reading the data stage's packed token blocks: the one interface every later stage uses.

Layout written by the data stage, under ``<run>/data/``::

    meta.json                      {"shards": [names...], "block_size": int, "dtype": "uint16"|"uint32",
                                    "vocab_size": int, "eos_token_id": int, ...}
    <shard>/meta.json              per-shard: documents, tokens per split, sources and hashes, unigram entropy
    <shard>/{train,val,test}.bin   raw numpy array of dtype, shape [n_blocks, block_size] (C order)
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
