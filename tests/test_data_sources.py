"""Reading sources: local txt / jsonl / parquet, offline datasets, the builtin corpus, and bad input."""

from __future__ import annotations

import ast
import hashlib
import json

import pytest

from downscale.config import DataConfig
from downscale.data.sources import Document, SourceReport, dedupe, read_source
from downscale.pipeline import StageError


def _read(source: dict, **data):
    cfg = DataConfig(sources=[source], min_doc_chars=data.pop("min_doc_chars", 4), **data)
    return read_source(cfg.sources[0], 0, cfg, "exp.yaml")


# --------------------------------------------------------------------------- local files


def test_txt_file_paragraphs_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n  \nsecond one\n\nthird one here\n")
    (tmp_path / "b.md").write_text("another file entirely\n")
    src = {"name": "t", "kind": "local", "paths": [str(tmp_path / "*.txt"), str(tmp_path / "b.md")]}
    docs, report = _read(src)
    assert [d.text for d in docs] == [(tmp_path / "a.txt").read_text(), "another file entirely\n"]
    assert [f["path"] for f in report.files] == [str(tmp_path / "a.txt"), str(tmp_path / "b.md")]
    assert report.files[0]["sha256"] == hashlib.sha256((tmp_path / "a.txt").read_bytes()).hexdigest()
    docs, _ = _read({**src, "txt_document": "paragraphs"})
    assert [d.text.strip() for d in docs] == ["first paragraph\nstill first", "second one", "third one here",
                                              "another file entirely"]
    docs, report = _read({**src, "txt_document": "lines"}, min_doc_chars=11)
    assert [d.text for d in docs] == ["first paragraph", "still first", "third one here", "another file entirely"]
    assert report.skipped["too_short"] == 1  # "second one" has 10 characters


def test_folder_glob_and_max_documents(tmp_path):
    for i in range(5):
        (tmp_path / "d" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "d" / f"{i}.txt").write_text(f"document number {i}")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    docs, _ = _read({"name": "t", "kind": "local", "paths": [str(tmp_path / "d")], "max_documents": 3})
    assert [d.text for d in docs] == ["document number 0", "document number 1", "document number 2"]


def test_jsonl(tmp_path):
    rows = [{"body": "alpha beta gamma", "id": 1}, {"body": None}, {"body": "delta epsilon zeta", "id": 3}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs, report = _read({"name": "j", "kind": "local", "paths": [str(tmp_path / "x.jsonl")], "text_field": "body"})
    assert [d.text for d in docs] == ["alpha beta gamma", "delta epsilon zeta"]
    assert report.skipped["empty"] == 1 and report.documents == 2
    with pytest.raises(StageError) as err:
        _read({"name": "j", "kind": "local", "paths": [str(tmp_path / "x.jsonl")], "text_field": "content"})
    msg = str(err.value)
    assert "x.jsonl:1" in msg and "data.sources.0.text_field" in msg and "'content'" in msg and "\n" not in msg
    (tmp_path / "bad.jsonl").write_text('{"text": "fine text here"}\n{not json\n')
    with pytest.raises(StageError, match=r"bad\.jsonl:2: not valid JSON"):
        _read({"name": "j", "kind": "local", "paths": [str(tmp_path / "bad.jsonl")]})


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one two three", "four five six", None], "n": [1, 2, 3]}),
                   tmp_path / "p.parquet")
    docs, report = _read({"name": "p", "kind": "local", "paths": [str(tmp_path / "p.parquet")],
                          "text_field": "content"})
    assert [d.text for d in docs] == ["one two three", "four five six"] and report.skipped["empty"] == 1
    assert len(report.files) == 1 and len(report.files[0]["sha256"]) == 64
    with pytest.raises(StageError) as err:
        _read({"name": "p", "kind": "local", "paths": [str(tmp_path / "p.parquet")]})
    assert "p.parquet" in str(err.value) and "data.sources.0.text_field" in str(err.value)
    assert "content, n" in str(err.value)


def test_bad_utf8_skip_and_fail(tmp_path):
    (tmp_path / "good.txt").write_text("perfectly good text")
    (tmp_path / "bad.txt").write_bytes(b"latin-1 caf\xe9 bytes")
    (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "good line of text"}\n{"text": "caf\xe9 bad"}\n')
    src = {"name": "u", "kind": "local", "paths": [str(tmp_path / "*.txt"), str(tmp_path / "mixed.jsonl")]}
    docs, report = _read(src)
    assert [d.text for d in docs] == ["perfectly good text", "good line of text"]
    assert report.skipped["bad_utf8"] == 2
    with pytest.raises(StageError) as err:
        _read(src, on_bad_utf8="fail")
    assert str(tmp_path / "bad.txt") in str(err.value) and "data.on_bad_utf8" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(StageError) as err:
        _read({"name": "m", "kind": "local", "paths": [str(tmp_path / "nope*.txt")]})
    assert "data.sources.0.paths.0" in str(err.value) and "nope" in str(err.value)


def test_missing_file_is_a_config_error_at_load(tmp_path):
    from downscale.config import ConfigError, load_config

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"data:\n  sources:\n    - {{name: a, kind: local, paths: ['{tmp_path}/missing.txt']}}\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: data\.sources\.0\.paths\.0"):
        load_config(cfg)


def test_dedupe_across_sources():
    a = [Document("same text", "a0"), Document("only in a", "a1"), Document("same text", "a2")]
    b = [Document("same text", "b0"), Document("only in b", "b1")]
    reports = [SourceReport("a", "local"), SourceReport("b", "local")]
    out = dedupe([a, b], reports)
    assert [[d.origin for d in docs] for docs in out] == [["a0", "a1"], ["b1"]]
    assert reports[0].skipped["duplicate"] == 1 and reports[1].skipped["duplicate"] == 1
    assert reports[0].documents == 2 and reports[1].documents == 1


# --------------------------------------------------------------------------- datasets, offline


def test_hf_save_to_disk_and_data_folder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    texts = [f"row {i} of the offline dataset" for i in range(6)]
    datasets.Dataset.from_dict({"text": texts, "label": list(range(6))}).save_to_disk(tmp_path / "single")
    docs, report = _read({"name": "h", "kind": "hf", "dataset": str(tmp_path / "single")})
    assert [d.text for d in docs] == texts and report.info["rows"] == 6 and report.files
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts[:4]}),
                          "validation": datasets.Dataset.from_dict({"body": texts[4:]})}
                         ).save_to_disk(tmp_path / "dict")
    docs, _ = _read({"name": "h", "kind": "hf", "dataset": str(tmp_path / "dict"), "split": "validation",
                     "text_field": "body"})
    assert [d.text for d in docs] == texts[4:]
    with pytest.raises(StageError, match=r"data\.sources\.0\.split: .* no split 'test'"):
        _read({"name": "h", "kind": "hf", "dataset": str(tmp_path / "dict"), "split": "test", "text_field": "body"})
    with pytest.raises(StageError) as err:
        _read({"name": "h", "kind": "hf", "dataset": str(tmp_path / "single"), "text_field": "content"})
    assert "data.sources.0.text_field" in str(err.value) and "text, label" in str(err.value)
    # A folder of data files, read through load_dataset (no network: conftest forbids it).
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "part.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    docs, _ = _read({"name": "h", "kind": "hf", "dataset": str(tmp_path / "files")})
    assert [d.text for d in docs] == texts


def test_hf_unknown_dataset_is_one_line(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(StageError) as err:
        _read({"name": "h", "kind": "hf", "dataset": "nobody/no-such-dataset-xyz"})
    assert "data.sources.0.dataset" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- builtin corpus


def test_builtin_code_and_docstrings_of_one_module_share_its_split():
    """A stdlib module's code (python_code) and its docstrings (english_docs) carry one split key, so a module
    whose code is test data never has its docstrings trained on (and the reverse)."""
    from downscale.data.packing import assign_splits

    code, _ = _read({"name": "c", "kind": "builtin", "builtin": "python_code", "max_documents": 400})
    docs, _ = _read({"name": "d", "kind": "builtin", "builtin": "english_docs", "max_documents": 400})
    code_keys = {d.origin.removeprefix("stdlib:"): d.split_key for d in code}
    doc_keys = {d.origin.removeprefix("docstrings:"): d.split_key for d in docs if d.origin.startswith("docstrings:")}
    shared = sorted(set(code_keys) & set(doc_keys))
    assert len(shared) >= 20, (len(code_keys), len(doc_keys))
    assert all(code_keys[rel] == doc_keys[rel] == f"stdlib:{rel}" for rel in shared)
    pairs = [d for d in code if d.origin.removeprefix("stdlib:") in shared] + \
        [d for d in docs if d.origin.removeprefix("docstrings:") in shared]
    split, borrowed = assign_splits(pairs, seed=0, val_fraction=0.3, test_fraction=0.3)
    assert borrowed == {} and all(split.values())
    where = {}
    for name, part in split.items():
        for d in part:
            where.setdefault(d.split_key, set()).add(name)
    assert all(len(names) == 1 for names in where.values()) and len(where) == len(shared)


def test_builtin_domains_are_distinct_and_recorded():
    code, rep_code = _read({"name": "c", "kind": "builtin", "builtin": "python_code", "max_documents": 25})
    docs, rep_docs = _read({"name": "d", "kind": "builtin", "builtin": "english_docs", "max_documents": 25})
    legal, rep_legal = _read({"name": "l", "kind": "builtin", "builtin": "legal", "max_documents": 25})
    assert len(code) == len(docs) == len(legal) == 25
    for d in code:  # real Python source, outside any test suite
        ast.parse(d.text)
        assert "/test/" not in d.origin and "/tests/" not in d.origin and "site-packages" not in d.origin
    assert all("pydoc_data" not in d.origin for d in code)
    assert sum("def " in d.text or "class " in d.text for d in code) >= 20
    # Prose: mostly letters and spaces, few code characters.
    prose = " ".join(d.text for d in docs)
    letters = sum(c.isalpha() or c.isspace() for c in prose) / len(prose)
    assert letters > 0.85
    legal_text = " ".join(d.text for d in legal).lower()
    assert sum(legal_text.count(w) for w in ("license", "copyright", "warrant", "permission")) > 50
    for rep in (rep_code, rep_docs, rep_legal):
        assert rep.info["python"] and rep.files and all(len(f["sha256"]) == 64 for f in rep.files)
        assert rep.info["roots"]
    # Deterministic selection.
    again, _ = _read({"name": "c", "kind": "builtin", "builtin": "python_code", "max_documents": 25})
    assert [d.origin for d in again] == [d.origin for d in code]
