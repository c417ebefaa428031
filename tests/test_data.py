"""The data stage end to end: sharding, splits, determinism, packing, the tokenizer, cluster mode."""

from __future__ import annotations

import json
import re

import numpy as np

from downscale import pipeline
from downscale._io import read_json
from downscale.data import packing
from downscale.data.blocks import data_meta, open_split, shard_names
from downscale.data.sources import Document
from downscale.data.tokenizer import batch_encoder, save_tokenizer, train_bpe
from tiny import WORDS, tiny_experiment

MARK = re.compile(r"doc(\d{4})x")


def _docs(domain: str, n: int, start: int, seed: int, words: int = 30) -> list[str]:
    """Documents with a unique marker at both ends, so a split's decoded text says which documents it holds."""
    rng = np.random.default_rng(seed)
    return [f"doc{start + i:04d}x " + " ".join(rng.choice(WORDS[domain], size=words)) + f" doc{start + i:04d}x"
            for i in range(n)]


def _write_sources(root, n: int = 40) -> dict[str, list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    texts = {"code": _docs("code", n, 0, 1), "legal": _docs("legal", n, 1000, 2)}
    (root / "code.txt").write_text("\n\n".join(texts["code"]) + "\n", encoding="utf-8")
    with open(root / "legal.jsonl", "w", encoding="utf-8") as fh:
        for t in texts["legal"]:
            fh.write(json.dumps({"body": t, "id": 1}) + "\n")
    return texts


def _cfg(tmp_path, run: str = "run", seed: int = 0, **data):
    src = tmp_path / "src"
    sources = [{"name": "code", "kind": "local", "paths": [str(src / "code.txt")], "txt_document": "paragraphs"},
               {"name": "legal", "kind": "local", "paths": [str(src / "legal.jsonl")], "text_field": "body"}]
    tree = {"sources": sources, "block_size": 16, "val_fraction": 0.15, "test_fraction": 0.15,
            "tokenizer": {"vocab_size": 300, "min_frequency": 1, "train_chars": 100_000}, **data}
    cfg = tiny_experiment(tmp_path, data=tree)
    cfg.run.dir = str(tmp_path / run)
    cfg.run.seed = seed
    return cfg


def _split_markers(run_dir, shard: str, split: str) -> set[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    blocks = open_split(run_dir, shard, split)
    return {int(m) for m in MARK.findall(tok.decode(np.asarray(blocks).ravel().tolist()))}


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_end_to_end_deterministic_and_disjoint(tmp_path):
    texts = _write_sources(tmp_path / "src")
    cfg = _cfg(tmp_path)
    entry = pipeline.run_stage(cfg, "data", log=lambda m: None)
    run = cfg.run_dir
    assert entry["status"] == "complete"
    assert pipeline.run_stage(cfg, "data", log=lambda m: None)["ended"] == entry["ended"]  # skipped as complete
    meta = data_meta(run)
    assert shard_names(run) == ["code", "legal"]
    assert meta["dtype"] == "uint16" and meta["block_size"] == 16 and meta["eos_token_id"] == 0
    assert meta["seed"] == 0 and meta["tokenizer"]["kind"] == "bpe" and meta["vocab_size"] <= 300
    for shard, docs in texts.items():
        sm = read_json(run / "data" / shard / "meta.json")
        assert sum(sm["documents"].values()) == len(docs)
        assert 0 < sm["unigram_entropy"] < np.log(meta["vocab_size"])
        for split in ("train", "val", "test"):
            arr = open_split(run, shard, split)
            assert arr.shape == (sm["blocks"][split], 16) and sm["tokens"][split] == arr.size > 0
            assert int(arr.max()) < meta["vocab_size"]
        assert sm["sources"][0]["files"][0]["sha256"]
        # No document in two splits; every document in one (its markers survive packing).
        tr, va, te = (_split_markers(run, shard, s) for s in ("train", "val", "test"))
        assert not (tr & te) and not (tr & va) and not (va & te)
        first = 0 if shard == "code" else 1000
        assert len(tr | va | te) >= len(docs) - 1  # at most the cut tail of the last train document is lost
        assert (tr | va | te) <= set(range(first, first + len(docs)))
    # Same config, other run folder: the same bytes. Other seed: another split.
    cfg2 = _cfg(tmp_path, run="run2")
    pipeline.run_stage(cfg2, "data", log=lambda m: None)
    for part in ("data", "tokenizer"):
        assert _files(run / part) == _files(cfg2.run_dir / part)
    cfg3 = _cfg(tmp_path, run="run3", seed=1)
    pipeline.run_stage(cfg3, "data", log=lambda m: None)
    assert _split_markers(run, "code", "test") != _split_markers(cfg3.run_dir, "code", "test")


def test_budgets_and_dtype(tmp_path):
    _write_sources(tmp_path / "src", n=60)
    cfg = _cfg(tmp_path, max_tokens_per_shard=200, max_eval_tokens_per_shard=40)
    cfg.data.sources[1].max_tokens = 100
    pipeline.run_stage(cfg, "data", log=lambda m: None)
    code = read_json(cfg.run_dir / "data" / "code" / "meta.json")
    legal = read_json(cfg.run_dir / "data" / "legal" / "meta.json")
    assert code["tokens"]["train"] == 192 and code["splits"]["train"]["dropped_over_budget"] > 0
    assert legal["tokens"]["train"] == 96 and legal["budget"]["train"] == 100
    for m in (code, legal):
        assert m["tokens"]["val"] == m["tokens"]["test"] == 32
        assert m["splits"]["train"]["documents"] < m["splits"]["train"]["documents_available"]
    assert packing.token_dtype(65535) == np.uint16 and packing.token_dtype(65536) == np.uint32


def test_pack_eos_placement_counts_and_partial_block():
    docs = [Document("a", "x"), Document("bb", "x"), Document("ccc", "x"), Document("dddd", "x")]

    def encode(texts):  # one id per character: ord - 96
        return [[ord(c) - 96 for c in t] for t in texts]

    p = packing.pack(docs, encode, eos_id=0, block_size=4, dtype=np.dtype(np.uint16), batch_docs=3)
    assert p.tokens_read == sum(len(d.text) for d in docs) + len(docs) == 14
    assert p.blocks.tolist() == [[1, 0, 2, 2], [0, 3, 3, 3], [0, 4, 4, 4]]  # EOS after every document
    assert p.partial_block == 2 and p.over_budget == 0 and p.documents == 4 and p.tokens == 12
    b = packing.pack(docs, encode, eos_id=0, block_size=4, dtype=np.dtype(np.uint16), budget=6)
    assert b.blocks.tolist() == [[1, 0, 2, 2]] and b.documents == 3 and b.over_budget == 3 and b.partial_block == 2


def test_splits_are_hash_stable_and_follow_split_keys():
    docs = [Document(f"document number {i}", "x") for i in range(400)]
    splits, borrowed = packing.assign_splits(docs, seed=0, val_fraction=0.1, test_fraction=0.1)
    assert not borrowed and sum(len(v) for v in splits.values()) == 400
    assert 20 < len(splits["test"]) < 60 and 20 < len(splits["val"]) < 60
    more, _ = packing.assign_splits(docs + [Document(f"new {i}", "x") for i in range(100)], 0, 0.1, 0.1)
    for s in splits:  # adding documents moves none of the old ones
        assert {d.text for d in splits[s]} <= {d.text for d in more[s]}
    pair = [Document(f"code {i}", "x", split_key=f"m{i}") for i in range(50)] + \
           [Document(f"docstring {i}", "x", split_key=f"m{i}") for i in range(50)]
    sp, _ = packing.assign_splits(pair, 3, 0.2, 0.2)
    where = {d.text: s for s, ds in sp.items() for d in ds}
    assert all(where[f"code {i}"] == where[f"docstring {i}"] for i in range(50))
    tiny, borrowed = packing.assign_splits([Document(f"only {i}", "x") for i in range(3)], 0, 0.01, 0.01)
    assert [len(tiny[s]) for s in ("train", "val", "test")] == [1, 1, 1] and borrowed == {"val": 1, "test": 1}


def test_bpe_round_trip(tmp_path):
    from transformers import AutoTokenizer

    corpus = ["def f(x):\n    return x + 1\n", "The licence shall apply.", "naïve café — déjà vu", "日本語のテキスト",
              "emoji 🙂🚀 and tabs\tand  double  spaces"] * 20
    tok = train_bpe(corpus, vocab_size=320, min_frequency=1)
    save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == "<|endoftext|>" and loaded.eos_token_id == 0
    probes = ["  leading spaces\n\n\ttabs\r\nand CRLF ", "ünïcödé ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 中文 🙂", "x <|endoftext|> y", "",
              "a" * 500, "class A:\n    def __init__(self) -> None:\n        pass\n"]
    for text in probes:
        assert loaded.decode(loaded(text)["input_ids"]) == text
    encode = batch_encoder(loaded)
    ids = encode(probes)
    assert all(loaded.decode(i) == t for i, t in zip(ids, probes, strict=True))
    assert 0 not in ids[2]  # a literal "<|endoftext|>" in a document is text, not EOS
    assert ids[0] == loaded(probes[0])["input_ids"]


def test_cluster_mode_recovers_topics(tmp_path):
    _write_sources(tmp_path / "src", n=40)
    cfg = _cfg(tmp_path, shard_by="cluster", cluster={"k": 2, "svd_dim": 8, "max_features": 200})
    pipeline.run_stage(cfg, "data", log=lambda m: None)
    run = cfg.run_dir
    assert shard_names(run) == ["cluster0", "cluster1"]
    purity_hits = 0
    for name in ("cluster0", "cluster1"):
        by_source = read_json(run / "data" / name / "meta.json")["source_documents"]
        purity_hits += max(by_source.values())
    assert purity_hits / 80 >= 0.95
    assert (run / "data" / "sources.json").is_file()
    from downscale.data.cluster import Clusterer

    c = Clusterer.load(run / "data" / "cluster")
    code_cluster = int(c.predict([" ".join(WORDS["code"])])[0])
    shard = f"cluster{code_cluster}"
    assert read_json(run / "data" / shard / "meta.json")["source_documents"].get("code", 0) >= 38


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    """A bad input found by the stage itself (not by the config check): exit 2, one line, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "some text that is long enough"}) + "\n", encoding="utf-8")
    config = {"run": {"dir": str(tmp_path / "run")},
              "data": {"sources": [{"name": "d", "kind": "local", "paths": [str(tmp_path / "d.jsonl")]}]}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "downscale.cli", "data", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[data]")]
    assert len(lines) == 1, proc.stderr
    assert f"{tmp_path / 'd.jsonl'}:1: no field 'text' (data.sources.0.text_field)" in lines[0]
    assert not (tmp_path / "run" / "data").exists()
