"""Small file helpers: atomic writes, directory fingerprints, provenance.

Every artifact is written to a temporary name and renamed, so an interrupted stage never
leaves something that looks complete. The temporary file gets the mode a plain ``open()`` would
give it (0666 less the umask), not ``mkstemp``'s 0600: run directories are shared (SLURM jobs,
other users of a group), and a renamed artifact must read like any other file written there.
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


def current_umask() -> int:
    """The process's umask, read without changing it where the OS shows it (Linux: /proc/self/status); elsewhere
    set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file_for(path: str | Path, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, name) of a new temporary file next to ``path`` (``.<name>.<random><suffix>``), to be renamed onto
    ``path`` once written. Its mode is what ``open(path, "w")`` would give (0666 less the umask), not the 0600
    of ``mkstemp``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def with_filename(exc: BaseException, path: str | Path) -> BaseException:
    """``exc`` itself, or for an OSError that names no file (a full disk seen by ``write`` or ``fsync``) the same
    error naming ``path``: what the CLI's one line shows."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    return exc


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        named = with_filename(exc, path)
        if named is not exc:
            raise named from exc
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
