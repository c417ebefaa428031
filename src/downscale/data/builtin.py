"""The builtin corpus: three clearly distinct domains made from text every Python install carries.

Nothing is downloaded and nothing is executed. Files are selected deterministically (sorted
paths) and recorded with their sha256; what is found depends on the interpreter and the installed
packages, so the Python version and the folders read are recorded too.

- ``python_code``: the standard library's ``.py`` files, one document per file. Left out: the
  ``test`` package and every other test suite inside the stdlib (folders named ``test``, ``tests``,
  ``idle_test``), ``site-packages``, and ``pydoc_data`` (prose, used by ``english_docs``).
- ``english_docs``: English technical prose: the language reference in ``pydoc_data/topics.py``
  (one document per topic, read with ``ast.literal_eval``), and the docstrings of each stdlib
  module of ``python_code`` (module, class and function docstrings in source order, one document
  per module, extracted with ``ast``). A module's docstrings share the split of that module's code
  (same split key), so no test-split docstring is trained on inside its module's code.
- ``legal``: license texts shipped by installed packages: under each site-packages folder of the
  running interpreter, ``*.dist-info/licenses/**``, and every ``LICENSE*``, ``LICENCE*`` and
  ``COPYING*`` file; then ``/usr/share/common-licenses/*`` and the Debian ``/usr/share/doc/*/copyright``
  files where they exist. License texts repeat with small changes (the same Apache text under a
  different copyright line), so paragraphs already seen in an earlier legal document are dropped
  (whitespace and case normalised): what is left of a near-duplicate is its few unique lines,
  usually too short to keep. Exact duplicates across the whole corpus are dropped as well. No
  license text is longer than ~40K characters (the GPL-3 has 35K); longer files are lists of
  per-file copyright notices (a Debian copyright file of boost is 2M characters), so each legal
  document is cut to its first ``LEGAL_MAX_CHARS`` characters, at a paragraph break where there is
  one (counted as ``cut_documents``); otherwise one such file would be half the domain.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import re
import site
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from downscale.data.sources import DocumentFilter

DOMAINS = ("python_code", "english_docs", "legal")
# Folder names inside the stdlib that hold test suites.
_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_TOP = {"site-packages", "dist-packages", "pydoc_data", "__pycache__"}
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING")
COMMON_LICENSES = Path("/usr/share/common-licenses")
DEBIAN_DOC = Path("/usr/share/doc")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
LEGAL_MAX_CHARS = 64_000


def read_builtin(domain: str, flt: DocumentFilter) -> None:
    """Feed every document of one builtin domain into ``flt`` (which records provenance)."""
    flt.report.info.update(python=sys.version.split()[0], implementation=platform.python_implementation(),
                           platform=sys.platform)
    if domain == "python_code":
        _python_code(flt)
    elif domain == "english_docs":
        _english_docs(flt)
    elif domain == "legal":
        _legal(flt)
    else:
        raise ValueError(f"unknown builtin domain {domain!r}; expected one of {DOMAINS}")


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib ``.py`` files of ``python_code``, in sorted order (see the module docstring)."""
    root = stdlib_root()
    out = []
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirs[:] = sorted(d for d in dirs if d not in _TEST_DIRS and d != "__pycache__"
                         and not (rel == Path(".") and d in _SKIP_TOP))
        out.extend(Path(dirpath) / f for f in sorted(files) if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_sources(flt: DocumentFilter) -> Iterator[tuple[Path, bytes, str, str]]:
    """(path, bytes, path relative to the stdlib, split key) of every ``stdlib_files()`` entry, recorded in the
    source report, until the filter is full. The split key is the module's: its code (``python_code``) and its
    docstrings (``english_docs``) land in the same split, so no test-split docstring is ever trained on."""
    root = stdlib_root()
    flt.report.info["roots"] = [str(root)]
    for path in stdlib_files():
        if flt.full:
            return
        data = path.read_bytes()
        rel = path.relative_to(root).as_posix()
        flt.report.add_file(path, data, root=root)
        yield path, data, rel, f"stdlib:{rel}"


def _python_code(flt: DocumentFilter) -> None:
    for _path, data, rel, split_key in _stdlib_sources(flt):
        flt.add(data, f"stdlib:{rel}", split_key=split_key)


def _english_docs(flt: DocumentFilter) -> None:
    root = stdlib_root()
    topics_path = root / "pydoc_data" / "topics.py"
    flt.report.info["roots"] = [str(root)]
    if topics_path.is_file():
        data = topics_path.read_bytes()
        flt.report.add_file(topics_path, data, root=root)
        for name, text in sorted(_topics(data).items()):
            flt.add(text, f"pydoc_data/topics.py:{name}", split_key=f"topics:{name}")
    unparsable = 0
    for path, data, rel, split_key in _stdlib_sources(flt):
        try:
            tree = ast.parse(data, filename=str(path))
        except (SyntaxError, ValueError):
            unparsable += 1
            continue
        flt.add("\n\n".join(_docstrings(tree)), f"docstrings:{rel}", split_key=split_key)
    if unparsable:
        flt.report.skipped["unparsable"] += unparsable


def _topics(data: bytes) -> dict[str, str]:
    """The ``topics`` dict of ``pydoc_data/topics.py``, read without executing the file."""
    tree = ast.parse(data)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            value = ast.literal_eval(node.value)
            return {str(k): str(v) for k, v in value.items()}
    return {}


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order (cleaned by ``ast.get_docstring``)."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings(child)


# --------------------------------------------------------------------------- legal


def site_package_dirs() -> list[Path]:
    """The running interpreter's site-packages folders (global and user), each once, sorted."""
    dirs = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    dirs |= {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user:
        dirs.add(user)
    return sorted({Path(d).resolve() for d in dirs if Path(d).is_dir()})


def license_files() -> list[tuple[Path, Path]]:
    """(root, file) for every license file the ``legal`` domain reads, in a fixed order."""
    out: list[tuple[Path, Path]] = []
    for root in site_package_dirs():
        found = []
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            here = Path(dirpath)
            rel = here.relative_to(root)
            in_licenses = bool(rel.parts) and rel.parts[0].endswith(".dist-info") and "licenses" in rel.parts
            for f in sorted(files):
                if in_licenses or f.upper().startswith(_LICENSE_PREFIXES):
                    found.append(here / f)
        out.extend((root, p) for p in sorted(found, key=lambda p: p.relative_to(root).as_posix()))
    if COMMON_LICENSES.is_dir():
        out.extend((COMMON_LICENSES, p) for p in sorted(COMMON_LICENSES.iterdir()) if p.is_file())
    if DEBIAN_DOC.is_dir():
        out.extend((DEBIAN_DOC, p) for p in sorted(DEBIAN_DOC.glob("*/copyright")) if p.is_file())
    return out


def _legal(flt: DocumentFilter) -> None:
    files = license_files()
    roots = sorted({str(r) for r, _ in files})
    flt.report.info["roots"] = roots
    seen: set[bytes] = set()
    dropped_paragraphs = cut_docs = 0
    for root, path in files:
        if flt.full:
            return
        try:
            data = path.read_bytes()
        except OSError:
            flt.report.skipped["unreadable"] += 1
            continue
        flt.report.add_file(path, data, root=root)
        text = _decode_or_skip(data, f"{path}", flt)
        if text is None:
            continue
        kept = []
        for para in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")):
            norm = " ".join(para.split()).lower()
            if not norm:
                continue
            h = hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if h in seen:
                dropped_paragraphs += 1
                continue
            seen.add(h)
            kept.append(para.strip("\n"))
        if not kept:  # nothing in it that an earlier license did not already say
            flt.report.skipped["duplicate_text"] += 1
            continue
        rel = path.relative_to(root).as_posix()
        doc = "\n\n".join(kept) + "\n"
        if len(doc) > LEGAL_MAX_CHARS:
            cut = doc.rfind("\n\n", 0, LEGAL_MAX_CHARS)
            doc = doc[: cut if cut > LEGAL_MAX_CHARS // 2 else LEGAL_MAX_CHARS] + "\n"
            cut_docs += 1
        flt.add(doc, f"{root.name}:{rel}")
    flt.report.info.update(duplicate_paragraphs_dropped=dropped_paragraphs, cut_documents=cut_docs,
                           max_document_chars=LEGAL_MAX_CHARS)


def _decode_or_skip(data: bytes, origin: str, flt: DocumentFilter) -> str | None:
    from downscale.data.sources import decode_utf8

    text = decode_utf8(data, origin, flt.cfg.on_bad_utf8)
    if text is None:
        flt.report.skipped["bad_utf8"] += 1
    return text
