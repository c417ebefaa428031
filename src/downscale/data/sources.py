"""Reading documents from the sources a config names: local files, a datasets dataset, the builtin corpus.

What one document is:

- ``local`` ``.txt`` (also ``.text``, ``.md``): by ``txt_document``: the whole file (``file``, the
  default), each blank-line-separated block (``paragraphs``), or each non-empty line (``lines``).
- ``local`` ``.jsonl`` / ``.ndjson``: one JSON object per line; its ``text_field`` is the document.
- ``local`` ``.parquet``: one row; its ``text_field`` column is the document.
- ``local`` folder: every file of those kinds below it, in sorted order.
- ``hf``: one row of a ``datasets`` dataset (a hub id, read from the local cache when offline, a
  folder written by ``save_to_disk``, or a folder of data files); its ``text_field`` is the document.
- ``builtin``: see ``downscale.data.builtin``.

Every reader records the files it read with their sha256, and counts what it skipped:
``bad_utf8`` (with ``data.on_bad_utf8: skip``), ``too_short`` (under ``data.min_doc_chars``
characters once stripped), ``empty`` (a null field). Exact duplicates across the whole corpus are
dropped later (``dedupe``). Bad input raises ``StageError`` with one line naming the file and the
config field.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from downscale.config import DataConfig, SourceConfig
from downscale.pipeline import StageError

TXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_PARAGRAPH_BREAK = re.compile(rb"\r?\n[ \t\r]*\n")


@dataclass
class Document:
    """One document. Documents with the same ``split_key`` always land in the same split (default:
    the text itself), e.g. a stdlib module's code and its docstrings."""

    text: str
    origin: str  # where it came from: a file, file:line, dataset[row]
    split_key: str | None = None


@dataclass
class SourceReport:
    """Provenance of one source: the files read (with hashes), documents kept and skipped."""

    name: str
    kind: str
    files: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    documents: int = 0
    info: dict = field(default_factory=dict)

    def add_file(self, path: str | Path, data: bytes | None = None, root: str | Path | None = None) -> None:
        """Record one input file with its size and sha256 (relative to ``root`` when given)."""
        path = Path(path)
        if data is None:
            h, size = _sha256_file(path)
        else:
            h, size = hashlib.sha256(data).hexdigest(), len(data)
        name = str(path.relative_to(root)) if root is not None else str(path)
        self.files.append({"path": name, "bytes": size, "sha256": h})

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "documents": self.documents,
                "skipped": dict(sorted(self.skipped.items())), **self.info, "files": self.files}


class DocumentFilter:
    """Decodes, filters and counts documents of one source; stops at ``max_documents``."""

    def __init__(self, report: SourceReport, data_cfg: DataConfig, max_documents: int | None):
        self.report, self.cfg, self.max_documents = report, data_cfg, max_documents
        self.docs: list[Document] = []

    @property
    def full(self) -> bool:
        return self.max_documents is not None and len(self.docs) >= self.max_documents

    def add(self, data: str | bytes | None, origin: str, split_key: str | None = None) -> None:
        """Take one raw document (bytes are decoded as UTF-8 under ``data.on_bad_utf8``)."""
        if self.full:
            return
        if data is None:
            self.report.skipped["empty"] += 1
            return
        if isinstance(data, bytes):
            text = decode_utf8(data, origin, self.cfg.on_bad_utf8)
            if text is None:
                self.report.skipped["bad_utf8"] += 1
                return
        else:
            text = data
        if len(text.strip()) < self.cfg.min_doc_chars:
            self.report.skipped["too_short"] += 1
            return
        self.docs.append(Document(text, origin, split_key))
        self.report.documents += 1


def decode_utf8(data: bytes, origin: str, on_bad_utf8: str) -> str | None:
    """``data`` as UTF-8 text; ``None`` when it is not valid and ``on_bad_utf8`` is ``skip``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if on_bad_utf8 == "skip":
            return None
        raise StageError(f"{origin}: not valid UTF-8 (byte {exc.start}: {exc.reason}); data.on_bad_utf8 is "
                         f"'fail' (set it to 'skip' to skip and count such documents)") from None


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


# --------------------------------------------------------------------------- dispatch


def read_source(src: SourceConfig, index: int, data_cfg: DataConfig, config_file: str) -> tuple[list[Document],
                                                                                                 SourceReport]:
    """All documents of one source (after decoding and filtering) and its provenance report."""
    report = SourceReport(src.name, src.kind)
    flt = DocumentFilter(report, data_cfg, src.max_documents)
    key = f"data.sources.{index}"
    if src.kind == "builtin":
        from downscale.data.builtin import read_builtin

        read_builtin(src.builtin, flt)
    elif src.kind == "local":
        for path in expand_paths(src, index, config_file):
            if flt.full:
                break
            _read_local_file(path, src, key, flt)
    elif src.kind == "hf":
        _read_hf(src, key, config_file, flt)
    else:  # pragma: no cover - the schema allows no other kind
        raise StageError(f"{config_file}: {key}.kind: unknown kind {src.kind!r}")
    return flt.docs, report


def expand_paths(src: SourceConfig, index: int, config_file: str) -> list[Path]:
    """The files of a local source: each pattern's matches in sorted order (folders expanded to the
    supported files below them), each file once."""
    out: list[Path] = []
    seen: set[Path] = set()
    for j, pattern in enumerate(src.paths):
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise StageError(f"{config_file}: data.sources.{index}.paths.{j}: no file matches {pattern!r}")
        for m in matches:
            path = Path(m)
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES) \
                if path.is_dir() else [path]
            if path.is_dir() and not files:
                raise StageError(f"{config_file}: data.sources.{index}.paths.{j}: folder {path} holds no "
                                 f"{'/'.join(SUPPORTED_SUFFIXES)} files")
            for f in files:
                if f.suffix.lower() not in SUPPORTED_SUFFIXES:
                    raise StageError(f"{f}: unsupported file type {f.suffix!r} (data.sources.{index}.paths.{j}); "
                                     f"expected one of {', '.join(SUPPORTED_SUFFIXES)}")
                if f.resolve() not in seen:
                    seen.add(f.resolve())
                    out.append(f)
    return out


# --------------------------------------------------------------------------- local files


def _read_local_file(path: Path, src: SourceConfig, key: str, flt: DocumentFilter) -> None:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        _read_parquet(path, src, key, flt)
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StageError(f"{path}: cannot read ({exc.strerror}) ({key}.paths)") from None
    flt.report.add_file(path, data)
    if suffix in TXT_SUFFIXES:
        for i, chunk in enumerate(_txt_chunks(data, src.txt_document)):
            flt.add(chunk, f"{path}#{i}" if src.txt_document != "file" else str(path))
    else:
        _read_jsonl(path, data, src, key, flt)


def _txt_chunks(data: bytes, unit: str) -> Iterator[bytes]:
    """The documents of a text file by ``txt_document``, still as bytes (each decoded on its own)."""
    if unit == "file":
        yield data
    elif unit == "paragraphs":
        yield from (c.strip(b"\r\n") for c in _PARAGRAPH_BREAK.split(data) if c.strip())
    else:
        yield from (line.rstrip(b"\r") for line in data.split(b"\n") if line.strip())


def _read_jsonl(path: Path, data: bytes, src: SourceConfig, key: str, flt: DocumentFilter) -> None:
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if flt.full:
            return
        if not line.strip():
            continue
        text = decode_utf8(line, f"{path}:{lineno}", flt.cfg.on_bad_utf8)
        if text is None:
            flt.report.skipped["bad_utf8"] += 1
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StageError(f"{path}:{lineno}: not valid JSON ({exc.msg}) ({key}.paths)") from None
        if not isinstance(record, dict):
            raise StageError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__} "
                             f"({key}.paths)")
        if src.text_field not in record:
            raise StageError(f"{path}:{lineno}: no field {src.text_field!r} ({key}.text_field); fields: "
                             f"{', '.join(sorted(record)) or 'none'}")
        flt.add(_as_text(record[src.text_field], f"{path}:{lineno}", key), f"{path}:{lineno}")


def _as_text(value: Any, origin: str, key: str) -> str | bytes | None:
    if value is None or isinstance(value, (str, bytes)):
        return value
    raise StageError(f"{origin}: field is a {type(value).__name__}, not text ({key}.text_field)")


def _read_parquet(path: Path, src: SourceConfig, key: str, flt: DocumentFilter) -> None:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise StageError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]}) ({key}.paths)") from None
    names = pf.schema_arrow.names
    if src.text_field not in names:
        raise StageError(f"{path}: no column {src.text_field!r} ({key}.text_field); columns: {', '.join(names)}")
    flt.report.add_file(path)
    row = 0
    for batch in pf.iter_batches(columns=[src.text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if flt.full:
                return
            flt.add(_as_text(value, f"{path}[{row}]", key), f"{path}[{row}]")
            row += 1


# --------------------------------------------------------------------------- datasets


def _read_hf(src: SourceConfig, key: str, config_file: str, flt: DocumentFilter) -> None:
    ds = load_hf_dataset(src, key, config_file)
    if src.text_field not in ds.column_names:
        raise StageError(f"{src.dataset}: no column {src.text_field!r} ({key}.text_field); columns: "
                         f"{', '.join(ds.column_names)}")
    files = sorted({f["filename"] for f in ds.cache_files})
    for f in files:
        flt.report.add_file(f)
    flt.report.info.update(dataset=src.dataset, subset=src.subset, split=src.split, rows=len(ds),
                           fingerprint=getattr(ds, "_fingerprint", None))
    col = ds.select_columns([src.text_field])
    row = 0
    for batch in _hf_batches(col, src.text_field):
        for value in batch:
            if flt.full:
                return
            flt.add(_as_text(value, f"{src.dataset}[{row}]", key), f"{src.dataset}[{row}]")
            row += 1


def _hf_batches(ds: Any, column: str, size: int = 1000) -> Iterable[list]:
    for start in range(0, len(ds), size):
        yield ds[start:start + size][column]


def load_hf_dataset(src: SourceConfig, key: str, config_file: str) -> Any:
    """One split of a ``datasets`` dataset: a ``save_to_disk`` folder, or anything ``load_dataset``
    reads (a hub id, from the local cache when ``HF_DATASETS_OFFLINE=1``; a folder of data files)."""
    import datasets

    path = Path(src.dataset).expanduser()
    saved = path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise StageError(f"{config_file}: {key}.split: {src.dataset} has no split {src.split!r}; "
                                     f"splits: {', '.join(ds)}")
                ds = ds[src.split]
            return ds
        return datasets.load_dataset(src.dataset, src.subset, split=src.split)
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"{config_file}: {key}.dataset: cannot load {src.dataset!r} (subset {src.subset!r}, "
                         f"split {src.split!r}): {first[:300]}") from None


# --------------------------------------------------------------------------- de-duplication


def dedupe(per_source: list[list[Document]], reports: list[SourceReport]) -> list[list[Document]]:
    """Drop exact duplicate documents across the whole corpus (the first occurrence, in source order,
    is kept); each source's report counts its dropped duplicates."""
    seen: set[bytes] = set()
    out = []
    for docs, report in zip(per_source, reports, strict=True):
        kept = []
        for doc in docs:
            h = hashlib.blake2b(doc.text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if h in seen:
                report.skipped["duplicate"] += 1
                continue
            seen.add(h)
            kept.append(doc)
        report.documents = len(kept)
        out.append(kept)
    return out
