"""The offline teacher: the base's top-k next-token log-probs over a shard, computed once and memory-mapped.

Specializing a student on shard i with ``specialize.teacher: cache`` reads the teacher from here
instead of running the base every step; the cache is reused across epochs and re-runs.

Layout of one cache folder (one per shard)::

    meta.json       provenance and shape (below); "complete": true only once every block is written
    ids.npy         [n_blocks, block_size - 1, top_k] uint16 (vocab <= 65536) or uint32: the teacher's top-k
                    token ids per position, most probable first
    logprobs.npy    [n_blocks, block_size - 1, top_k] float16 (default) or float32: their log-probs at the
                    cache's temperature T, i.e. log_softmax(teacher_logits / T)
    tail.npy        [n_blocks, block_size - 1] float32: log of the probability outside the top k,
                    log(1 - sum exp(logprobs)), computed as a masked logsumexp; -inf when top_k = V

Positions: the model at position t of a block predicts token t + 1, so a block of T tokens gives T - 1
stored positions, 0..T-2, whose labels are the block's tokens 1..T-1 (the same rows the training loss
uses). Position T - 1 predicts a token outside the block and is not stored.

Tail: the loss (``downscale.kd``) collapses the student's distribution onto the teacher's k ids plus
one rest bin (logsumexp of the student's other logits) and compares the two (k + 1)-bin distributions;
with top_k = V that is exactly online KD. The cache is tied to its temperature: a loss at another T
is refused.

meta.json: ``fingerprints`` (what the caller passes, by convention ``teacher`` = dir_fingerprint of the
base folder, ``data`` = fingerprint of the shard's train.bin, ``tokenizer`` = kd.tokenizer_hash; see
``cache_fingerprints``), ``top_k``, ``temperature``, ``vocab_size``, ``n_blocks``, ``block_size``,
``positions``, ``ids_dtype``, ``logprob_dtype``, ``format``, ``blocks_done`` and ``complete``.
``TeacherCache.open(dir, expect)`` refuses a cache whose fingerprints or settings differ from
``expect`` ("... was made from another base ...") and an incomplete one.

Building is resumable: the arrays are written into ``<dir>.partial/`` batch by batch, and its meta.json
records how many blocks are done after each batch (arrays flushed first). A re-run with the same
settings continues from there; only a finished build is renamed to ``<dir>`` with ``complete: true``.
The fp16 default for log-probs was chosen by measurement (benchmarks/bench_kd_memory.py prints the
KD error of an fp16 vs an fp32 cache).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downscale._io import dir_fingerprint, read_json, write_json_atomic
from downscale.integrity import file_problem, file_record

FORMAT = 1
_ARRAYS = ("ids", "logprobs", "tail")


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used: made from another base/data/setting, or incomplete."""


def _damage(path: Path, meta: dict) -> str | None:
    """What changed in a complete cache's arrays since it was built (``meta["checksums"]``), or None. Caches built
    before checksums were recorded are taken as they are."""
    for k, record in (meta.get("checksums") or {}).items():
        what = file_problem(path / f"{k}.npy", record)
        if what is not None:
            return f"{k}.npy: {what}"
    return None


def _partial(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def cache_fingerprints(run_dir: str | Path, shard: str, *, top_k: int, temperature: float) -> dict[str, Any]:
    """The conventional ``fingerprints`` / ``expect`` dict of shard ``shard``'s cache in a run: the base
    folder, the shard's train blocks and the run's tokenizer (by hash), plus top_k and temperature."""
    from downscale.kd import tokenizer_hash

    run_dir = Path(run_dir)
    return {"teacher": dir_fingerprint(run_dir / "base"),
            "data": dir_fingerprint(run_dir / "data" / shard / "train.bin"),
            "tokenizer": tokenizer_hash(run_dir / "tokenizer"),
            "top_k": int(top_k), "temperature": float(temperature)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


_WHAT = {"teacher": "base", "data": "data", "tokenizer": "tokenizer"}


def _mismatch(meta: dict, expect: dict) -> tuple[str, Any, Any] | None:
    """The first expected key whose value in ``meta`` (its fingerprints first, then its top level) differs."""
    fps = meta.get("fingerprints", {})
    for key, want in expect.items():
        have = fps[key] if key in fps else meta.get(key, "<missing>")
        if not _same(have, want):
            return key, have, want
    return None


def _settings(fingerprints: dict, top_k: int, temperature: float, vocab: int, n_blocks: int, block_size: int,
              logprob_dtype: str) -> dict[str, Any]:
    return {"format": FORMAT, "fingerprints": dict(fingerprints), "top_k": int(top_k),
            "temperature": float(temperature), "vocab_size": int(vocab), "n_blocks": int(n_blocks),
            "block_size": int(block_size), "positions": int(block_size) - 1,
            "ids_dtype": "uint16" if vocab <= 2**16 else "uint32", "logprob_dtype": logprob_dtype}


def build_teacher_cache(teacher_model: torch.nn.Module, blocks: np.ndarray, out_dir: str | Path, *, top_k: int = 64,
                        temperature: float = 1.0, batch_size: int = 8, device: torch.device | str = "cpu",
                        amp_dtype: torch.dtype | None = None, fingerprints: dict[str, Any] | None = None,
                        logprob_dtype: str = "float16", chunk_tokens: int | None = None, progress: bool = True,
                        on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run ``teacher_model`` over ``blocks`` [n, T] and store its top-k log-probs per position in ``out_dir``.

    Resumable: an interrupted build leaves ``<out_dir>.partial`` whose meta records the blocks done; a
    call with the same settings continues after the last complete batch (the result is byte-for-byte
    that of an uninterrupted build with the same ``batch_size``). A complete ``out_dir`` with the same
    settings is returned as it is; one with other settings is replaced when the new build finishes.

    Args:
        teacher_model: an HF causal LM (``get_decoder()``, ``get_output_embeddings()``), frozen.
        blocks: token ids [n_blocks, block_size] (e.g. ``downscale.data.blocks.open_split(run, shard, "train")``).
        out_dir: the cache folder.
        top_k: ids kept per position (1..V); temperature: T > 0 of the stored log-probs.
        batch_size: blocks per teacher forward; device / amp_dtype: where and under which autocast it runs.
        fingerprints: provenance checked by ``TeacherCache.open(expect=...)`` (see ``cache_fingerprints``).
        logprob_dtype: "float16" or "float32" storage of the log-probs.
        chunk_tokens: positions per head matmul + top-k (bounds the [chunk, V] fp32 temporaries); None:
            ``kd.auto_chunk_tokens(V)``.
        progress: a tqdm bar on stderr.  on_batch: called as ``on_batch(blocks_done, n_blocks)`` after
            each committed batch (progress hooks; tests interrupt a build from it).

    Returns:
        The meta dict of the complete cache.
    """
    from downscale import kd, models
    from downscale.progress import bar as progress_bar

    out_dir = Path(out_dir)
    if logprob_dtype not in ("float16", "float32"):
        raise ValueError(f"logprob_dtype must be float16 or float32; got {logprob_dtype!r}")
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n_blocks, block_size >= 2]; got shape {blocks.shape}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    device = torch.device(device)
    head = teacher_model.get_output_embeddings().weight.detach()
    vocab = head.shape[0]
    if not (1 <= top_k <= vocab):
        raise ValueError(f"top_k must be in [1, vocab size {vocab}]; got {top_k}")
    chunk_tokens = kd.auto_chunk_tokens(vocab, chunk_tokens, device)
    n_blocks, block = int(blocks.shape[0]), int(blocks.shape[1])
    settings = _settings(fingerprints or {}, top_k, temperature, vocab, n_blocks, block, logprob_dtype)
    keys = [k for k in settings if k != "format"]

    if (out_dir / "meta.json").is_file():
        meta = read_json(out_dir / "meta.json")
        if meta.get("complete") and all(_same(meta.get(k), settings[k]) for k in keys) and not _damage(out_dir, meta):
            return meta

    part = _partial(out_dir)
    done = 0
    if (part / "meta.json").is_file():
        old = read_json(part / "meta.json")
        if all(_same(old.get(k), settings[k]) for k in keys) and old.get("format") == FORMAT:
            done = int(old.get("blocks_done", 0))
    if done == 0 and part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    positions = block - 1
    shapes = {"ids": (n_blocks, positions, top_k), "logprobs": (n_blocks, positions, top_k),
              "tail": (n_blocks, positions)}
    dtypes = {"ids": settings["ids_dtype"], "logprobs": logprob_dtype, "tail": "float32"}
    mode = "r+" if done else "w+"
    arrays = {k: np.lib.format.open_memmap(part / f"{k}.npy", mode=mode, dtype=np.dtype(dtypes[k]), shape=shapes[k])
              for k in _ARRAYS}
    if done == 0:
        write_json_atomic(part / "meta.json", {**settings, "blocks_done": 0, "complete": False})

    was_training = teacher_model.training
    teacher_model.eval()
    decoder = teacher_model.get_decoder()
    bar = progress_bar(total=n_blocks, initial=done, desc="teacher cache", unit="block", disable=not progress,
                       dynamic_ncols=True)
    try:
        for start in range(done, n_blocks, batch_size):
            end = min(n_blocks, start + batch_size)
            ids = torch.as_tensor(np.asarray(blocks[start:end], dtype=np.int64), device=device)
            # Under the same autocast as the online teacher, so that the head matmul has the same precision.
            with torch.no_grad(), models.autocast(device, amp_dtype):
                hidden = decoder(input_ids=ids).last_hidden_state[:, :-1]  # [b, T-1, H]
                h = hidden.reshape(-1, hidden.shape[-1])
                top_ids, top_lp, tail = [], [], []
                for c in range(0, h.shape[0], chunk_tokens):
                    logp = kd.head_logprobs(h[c:c + chunk_tokens], head, temperature)  # [C, V] fp32
                    vals, idx = torch.topk(logp, top_k, dim=-1)  # most probable first
                    if top_k < vocab:
                        rest = torch.logsumexp(logp.scatter_(1, idx, float("-inf")), dim=-1)
                    else:
                        rest = torch.full((logp.shape[0],), float("-inf"), device=logp.device)
                    top_ids.append(idx)  # kept on the device: one copy to the host per batch, not per chunk
                    top_lp.append(vals)
                    tail.append(rest)
            b = end - start
            arrays["ids"][start:end] = torch.cat(top_ids).cpu().numpy().astype(dtypes["ids"]).reshape(
                b, positions, top_k)
            arrays["logprobs"][start:end] = torch.cat(top_lp).cpu().numpy().astype(logprob_dtype).reshape(
                b, positions, top_k)
            arrays["tail"][start:end] = torch.cat(tail).cpu().numpy().reshape(b, positions)
            for arr in arrays.values():
                arr.flush()
            write_json_atomic(part / "meta.json", {**settings, "blocks_done": end, "complete": False})
            bar.update(b)
            if on_batch is not None:
                on_batch(end, n_blocks)
    finally:
        bar.close()
        del arrays
        if was_training:
            teacher_model.train()
    # size, modification time and sha256 of each array: ``open`` refuses a cache changed since (garbled,
    # truncated, overwritten)
    meta = {**settings, "blocks_done": n_blocks, "complete": True,
            "checksums": {k: file_record(part / f"{k}.npy") for k in _ARRAYS}}
    write_json_atomic(part / "meta.json", meta)
    from downscale._io import replace_dir

    replace_dir(part, out_dir)
    return meta


class TeacherCache:
    """A complete teacher cache, memory-mapped read-only. Use ``TeacherCache.open``."""

    def __init__(self, path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.path = path
        self.meta = meta
        self.ids, self.logprobs, self.tail = arrays["ids"], arrays["logprobs"], arrays["tail"]

    @classmethod
    def open(cls, path: str | Path, expect: dict[str, Any] | None = None) -> TeacherCache:
        """Open the cache in ``path``. Raises ``FileNotFoundError`` when there is none, and
        ``TeacherCacheError`` (a ValueError, one line) when it is incomplete or when a key of ``expect``
        differs from the cache's fingerprints or settings (top_k, temperature, n_blocks, ...)."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            hint = " (an interrupted build exists: building again resumes it)" if _partial(path).exists() else ""
            raise FileNotFoundError(f"teacher cache {path} not found{hint}")
        meta = read_json(path / "meta.json")
        if not meta.get("complete"):
            raise TeacherCacheError(f"teacher cache {path} is incomplete ({meta.get('blocks_done', 0)} of "
                                    f"{meta.get('n_blocks', '?')} blocks); build it again")
        if meta.get("format") != FORMAT:
            raise TeacherCacheError(f"teacher cache {path} has format {meta.get('format')!r}, expected {FORMAT}; "
                                    f"build it again")
        bad = _mismatch(meta, expect or {})
        if bad is not None:
            key, have, want = bad
            raise TeacherCacheError(f"teacher cache {path} was made from another {_WHAT.get(key, key)} "
                                    f"({key}: {have!r} in the cache, {want!r} expected); build it again or "
                                    f"point specialize.cache_dir elsewhere")
        damage = _damage(path, meta)
        if damage:
            raise TeacherCacheError(f"teacher cache {path}: {damage} (a garbled or overwritten cache); build it again")
        shapes = {"ids": (meta["n_blocks"], meta["positions"], meta["top_k"]),
                  "logprobs": (meta["n_blocks"], meta["positions"], meta["top_k"]),
                  "tail": (meta["n_blocks"], meta["positions"])}
        arrays = {}
        for k in _ARRAYS:
            try:
                arr = np.load(path / f"{k}.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise TeacherCacheError(f"teacher cache {path}: {k}.npy unreadable ({exc}); build it again") from None
            if arr.shape != tuple(shapes[k]):
                raise TeacherCacheError(f"teacher cache {path}: {k}.npy has shape {arr.shape}, meta says "
                                        f"{tuple(shapes[k])}; build it again")
            arrays[k] = arr
        return cls(path, meta, arrays)

    @property
    def n_blocks(self) -> int:
        return int(self.meta["n_blocks"])

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def sparse_teacher(self, block_indices: np.ndarray | list[int] | torch.Tensor) -> Any:
        """Targets of the listed blocks (rows of the shard's train split), in that order, flattened to
        ``[len(block_indices) * (block_size - 1), top_k]``: the rows ``hidden[:, :-1].reshape(-1, H)`` of
        those blocks. ids are int64, log-probs keep the stored dtype (upcast in the loss), tail is fp32.
        Returns a ``downscale.kd.SparseTeacher`` on the CPU."""
        from downscale.kd import SparseTeacher

        idx = np.asarray(block_indices.cpu() if isinstance(block_indices, torch.Tensor) else block_indices,
                         dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_blocks):
            raise IndexError(f"teacher cache {self.path}: block index out of range [0, {self.n_blocks})")
        k = self.top_k
        ids = torch.from_numpy(self.ids[idx].reshape(-1, k).astype(np.int64))
        lp = torch.from_numpy(np.ascontiguousarray(self.logprobs[idx]).reshape(-1, k))
        tail = torch.from_numpy(np.ascontiguousarray(self.tail[idx]).reshape(-1))
        # what the checksum cannot see (a garble with its modification time put back) must not reach the loss
        bad_ids = bool(ids.numel()) and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0)
        if bad_ids or bool(torch.isnan(lp).any()) or bool((lp > 1e-2).any()) or bool(torch.isnan(tail).any()):
            raise TeacherCacheError(f"teacher cache {self.path}: blocks {idx[:4].tolist()}... hold impossible "
                                    f"values (ids >= vocab, NaN or positive log-probs): the cache is garbled; "
                                    f"remove it and build it again")
        return SparseTeacher(ids, lp, tail, self.temperature)
