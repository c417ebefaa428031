"""Nothing corrupt is ever used: the files a stage wrote are checked before a later stage reads them.

When a stage completes, the manifest records a table of every file it wrote (``file_table``): its size, its
modification time and the sha256 of the whole file (one read of each file when its stage completes). Before a stage
runs, every file it reads of its upstream stages is checked against that table (``upstream_problems``, called by
``pipeline.check_inputs``): cheap first (a missing file, another size), and the hash is computed again only for a
file whose modification time moved. A changed, truncated or missing file is refused with one line naming the file
and the stage that writes it again (``pipeline.CorruptInput``, exit 2).

Two further checks cover files changed with their modification time put back, and models loaded outside a run:
``check_weights`` refuses a model whose weights hold NaN or inf (a garbled safetensors file that still parses), and
``safetensors_error`` turns the loader's error on a truncated or garbled header into the same one line.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from downscale._io import dir_fingerprint
from downscale.errors import StageError

_CHUNK = 8 * 2**20


class CorruptArtifact(StageError):
    """A file the project wrote (or a model it loads) is unreadable or holds non-finite values. The CLI prints its
    one line and exits 2."""


def files_below(path: Path) -> list[Path]:
    """The file ``path``, or every file below the folder ``path`` (sorted as ``_io.dir_fingerprint`` walks them)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.is_file())
    return []


def full_sha256(path: Path) -> str:
    """sha256 of the whole file (first 16 hex digits): unlike ``file_fingerprint``, no sample of a big file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_record(path: Path) -> list:
    """``[size, mtime_ns, sha256 of the whole file]`` of one file (read once, when its stage completes; read again
    only if its modification time moves)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, full_sha256(path)]


def file_table(run_dir: Path, outputs: Iterable[str]) -> dict[str, list]:
    """``{path relative to the run directory: [size, mtime_ns, fingerprint]}`` for every file below ``outputs``."""
    table = {}
    for name in outputs:
        for f in files_below(run_dir / name):
            table[f.relative_to(run_dir).as_posix()] = file_record(f)
    return table


def file_problem(path: Path, record: list, cheap: bool = False) -> str | None:
    """What is wrong with ``path`` against its ``record`` (``file_record``), or None. A file whose size and
    modification time are as recorded is taken as unchanged; otherwise it is fingerprinted again (unless
    ``cheap``: then a moved modification time alone counts as a change)."""
    size, mtime_ns, fingerprint = record
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if st.st_size < size:
        return f"truncated ({st.st_size:,} of {size:,} bytes)"
    if st.st_size != size:
        return f"another size ({st.st_size:,} bytes, {size:,} when written)"
    if st.st_mtime_ns == mtime_ns:
        return None
    if cheap or full_sha256(path) != fingerprint:
        return "changed since it was written (same size: garbled or overwritten)"
    return None


def _reads(rel: str, reports: tuple[str, ...], with_reports: bool) -> bool:
    return with_reports or not any(fnmatch.fnmatch(rel, pattern) for pattern in reports)


def upstream_problems(run_dir: Path, entry: dict, outputs: tuple[str, ...], reports: tuple[str, ...],
                      with_reports: bool, cheap: bool = False) -> list[tuple[Path, str]]:
    """``[(path, problem)]`` for the files of one upstream stage's manifest ``entry`` that a stage reads (its
    outputs less the report files unless ``with_reports``). New files below the outputs count as a change too
    (a stage reads whole folders). An entry recorded before file tables existed is checked folder by folder
    against its recorded fingerprints."""
    table = entry.get("files")
    if table is None:
        if cheap:  # a folder fingerprint reads every byte: not for a note
            return []
        out = []
        for name, fp in (entry.get("outputs") or {}).items():
            path = run_dir / name
            if not path.exists():
                out.append((path, "missing"))
            elif dir_fingerprint(path) != fp:
                out.append((path, "changed since it was written"))
        return out
    problems = []
    for rel, record in table.items():
        if _reads(rel, reports, with_reports):
            why = file_problem(run_dir / rel, record, cheap=cheap)
            if why is not None:
                problems.append((run_dir / rel, why))
    for name in outputs:
        for f in files_below(run_dir / name):
            rel = f.relative_to(run_dir).as_posix()
            hidden = any(part.startswith(".") for part in Path(rel).parts)
            if rel not in table and _reads(rel, reports, with_reports) and not hidden:
                problems.append((f, "not written by the stage (a file added since)"))
    return problems


# --------------------------------------------------------------------------- models


def safetensors_error(exc: BaseException, path: str | Path) -> CorruptArtifact | None:
    """The one-line error for a safetensors file that cannot be read (truncated, garbled header), or None when
    ``exc`` is something else."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if name == "SafetensorError" or "deserializing header" in text or "incomplete metadata" in text.lower():
        return CorruptArtifact(f"{path}: unreadable safetensors ({text[:160]}): the file is truncated or garbled")
    return None


def check_weights(model: Any, path: str | Path) -> None:
    """Refuse a loaded model whose floating-point weights or buffers hold NaN or inf (``CorruptArtifact`` naming
    the folder and the first such tensor)."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise CorruptArtifact(f"{path}: weight {name} holds NaN or inf values: the file is garbled (or the "
                                  f"model diverged before it was saved); rewrite it with the stage that made it")
