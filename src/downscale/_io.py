"""Small file helpers: atomic writes, directory fingerprints, provenance.

Every artifact is written to a temporary name and renamed, so an interrupted stage never
leaves something that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Files at most this big are hashed whole; bigger ones by size plus sampled chunks.
_FULL_HASH_LIMIT = 64 * 2**20
_CHUNK = 2**20


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an older ``dst`` without a gap
    in which a half-written ``dst`` could be seen."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file; files over 64 MiB are hashed by size plus 16 evenly spaced 1 MiB chunks
    (fast on multi-GB safetensors, still sensitive to any rewrite in practice)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                h.update(block)
        else:
            for i in range(16):
                fh.seek((size - _CHUNK) * i // 15)
                h.update(fh.read(_CHUNK))
    return h.hexdigest()[:16]


def dir_fingerprint(path: str | Path) -> str:
    """Fingerprint of a file or of every file below a folder (names and contents)."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_fingerprint(f).encode())
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes the artifacts."""
    from importlib import metadata

    out = {}
    for name in ("downscale", "torch", "transformers", "tokenizers", "accelerate", "torch-pruning", "datasets",
                 "numpy", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
