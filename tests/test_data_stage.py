"""The data stage end to end through the pipeline, on tiny local corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from downscale import pipeline
from downscale.config import ExperimentConfig
from downscale.data import packing
from downscale.data.blocks import SPLITS, data_meta, open_split, shard_names
from downscale.data.sources import Document
from downscale.pipeline import StageError
from tiny import domain_text


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _corpus(tmp_path: Path, n: int = 40) -> dict[str, list[str]]:
    code = [f"item {i}: " + t for i, t in enumerate(domain_text("code", n, words_per_doc=20, seed=1))]
    legal = [f"clause {i}: " + t for i, t in enumerate(domain_text("legal", n, words_per_doc=20, seed=2))]
    _write_jsonl(tmp_path / "code.jsonl", code)
    _write_jsonl(tmp_path / "legal.jsonl", legal)
    return {"code": code, "legal": legal}


def _cfg(tmp_path: Path, run: str = "run", seed: int = 0, sources: list | None = None, base: dict | None = None,
         **data) -> ExperimentConfig:
    sources = sources or [{"name": "code", "kind": "local", "paths": [str(tmp_path / "code.jsonl")]},
                          {"name": "legal", "kind": "local", "paths": [str(tmp_path / "legal.jsonl")]}]
    tree = {"run": {"name": "t", "dir": str(tmp_path / run), "seed": seed},
            "data": {"sources": sources, "block_size": 16, "val_fraction": 0.15, "test_fraction": 0.15,
                     "tokenizer": {"vocab_size": 300, "min_frequency": 1}, **data},
            "base": base or {}}
    return ExperimentConfig.model_validate(tree)


def _pieces(run_dir: Path, shard: str, split: str, eos: int) -> list[str]:
    """The complete documents of a packed split (the text between EOS tokens, decoded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    flat = np.asarray(open_split(run_dir, shard, split)).ravel().tolist()
    cut = len(flat) - 1 - flat[::-1].index(eos)  # the text after the last EOS is a cut document
    out, cur = [], []
    for t in flat[: cut + 1]:
        if t == eos:
            out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_source_mode_end_to_end(tmp_path):
    corpus = _corpus(tmp_path)
    cfg = _cfg(tmp_path)
    entry = pipeline.run_stage(cfg, "data", log=lambda m: None)
    assert entry["status"] == "complete" and set(entry["outputs"]) == {"data", "tokenizer"}
    run = cfg.run_dir
    meta = data_meta(run)
    assert shard_names(run) == ["code", "legal"] and meta["block_size"] == 16 and meta["dtype"] == "uint16"
    assert meta["seed"] == 0 and meta["tokenizer"]["kind"] == "bpe" and meta["eos_token_id"] == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert len(tok) == meta["vocab_size"] and tok.eos_token_id == meta["eos_token_id"]
    for shard, docs in corpus.items():
        smeta = json.loads((run / "data" / shard / "meta.json").read_text())
        assigned, _ = packing.assign_splits([Document(t, "") for t in docs], 0, 0.15, 0.15)
        seen: dict[str, set[str]] = {}
        for split in SPLITS:
            blocks = open_split(run, shard, split)
            assert blocks.shape[1] == 16 and blocks.shape[0] == smeta["blocks"][split] > 0
            info = smeta["splits"][split]
            assert smeta["tokens"][split] == blocks.size == info["tokens_read"] - info["dropped_partial_block"]
            assert 0 <= info["dropped_partial_block"] < 16
            pieces = _pieces(run, shard, split, meta["eos_token_id"])
            assert set(pieces) <= set(docs)  # every complete piece is a whole document of this shard
            seen[split] = set(pieces)
            # The stream is the split's documents in packing order, each followed by EOS; tokens read =
            # sum of document lengths + one EOS each; only the final partial block is dropped.
            expected = [d.text for d in assigned[split]]
            assert pieces == expected[: len(pieces)] and len(pieces) >= len(expected) - 2
            assert info["tokens_read"] == sum(len(tok.encode(d, add_special_tokens=False)) + 1 for d in expected)
        assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["val"])
        assert not (seen["val"] & seen["test"])
        assert smeta["unigram_entropy"] > 0 and smeta["sources"][0]["files"][0]["sha256"]
        assert sum(smeta["splits"][s]["documents_available"] for s in SPLITS) == len(docs)
    # A second call skips the stage as complete.
    logs: list[str] = []
    pipeline.run_stage(cfg, "data", log=logs.append)
    assert any("skipped" in m for m in logs)


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    _corpus(tmp_path)
    a, b, c = _cfg(tmp_path, "a", seed=5), _cfg(tmp_path, "b", seed=5), _cfg(tmp_path, "c", seed=6)
    for cfg in (a, b, c):
        pipeline.run_stage(cfg, "data", log=lambda m: None)
    for out in ("data", "tokenizer"):
        fa, fb = _files(a.run_dir / out), _files(b.run_dir / out)
        assert fa.keys() == fb.keys() and fa == fb
    eos = data_meta(a.run_dir)["eos_token_id"]
    assert set(_pieces(a.run_dir, "code", "test", eos)) != set(_pieces(c.run_dir, "code", "test", eos))


def test_budgets(tmp_path):
    _corpus(tmp_path, n=60)
    cfg = _cfg(tmp_path, max_tokens_per_shard=160, max_eval_tokens_per_shard=32,
               sources=[{"name": "code", "kind": "local", "paths": [str(tmp_path / "code.jsonl")], "max_tokens": 96},
                        {"name": "legal", "kind": "local", "paths": [str(tmp_path / "legal.jsonl")]}])
    pipeline.run_stage(cfg, "data", log=lambda m: None)
    assert open_split(cfg.run_dir, "code", "train").shape == (6, 16)  # the source's own budget wins
    assert open_split(cfg.run_dir, "legal", "train").shape == (10, 16)
    for shard in ("code", "legal"):
        for split in ("val", "test"):
            assert open_split(cfg.run_dir, shard, split).shape == (2, 16)
    smeta = json.loads((cfg.run_dir / "data" / "code" / "meta.json").read_text())
    train = smeta["splits"]["train"]
    assert smeta["budget"]["train"] == 96 and train["tokens_read"] - train["dropped_over_budget"] == 96
    # One document gives at most 1/16 of the budget (at least one block): 16 tokens here, so >= 6 documents.
    assert train["documents"] >= 6 and train["documents_capped"] >= 1 and train["dropped_by_cap"] > 0


def test_cluster_mode_recovers_topics(tmp_path):
    corpus = _corpus(tmp_path, n=50)
    mixed = [t for pair in zip(corpus["code"], corpus["legal"], strict=True) for t in pair]
    _write_jsonl(tmp_path / "mixed.jsonl", mixed)
    cfg = _cfg(tmp_path, sources=[{"name": "all", "kind": "local", "paths": [str(tmp_path / "mixed.jsonl")]}],
               shard_by="cluster", cluster={"k": 2, "svd_dim": 8, "max_features": 200})
    pipeline.run_stage(cfg, "data", log=lambda m: None)
    run = cfg.run_dir
    assert shard_names(run) == ["cluster0", "cluster1"]
    from downscale.data.cluster import Clusterer

    clusterer = Clusterer.load(run / "data" / "cluster")
    eos = data_meta(run)["eos_token_id"]
    hits = total = 0
    for i, shard in enumerate(shard_names(run)):
        docs = [p for s in SPLITS for p in _pieces(run, shard, s, eos)]
        assert docs and (clusterer.predict(docs) == i).all()  # the saved clusterer routes them back
        topics = [d.startswith("item") for d in docs]
        hits += max(sum(topics), len(topics) - sum(topics))
        total += len(topics)
    assert hits / total >= 0.95
    smeta = json.loads((run / "data" / "cluster0" / "meta.json").read_text())
    assert smeta["cluster"]["index"] == 0 and smeta["source_documents"] == {"all": smeta["cluster"]["documents"]}


def test_base_tokenizer(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tiny import make_tokenizer

    corpus = _corpus(tmp_path)
    make_tokenizer(tmp_path / "basemodel", corpus["code"] + corpus["legal"], vocab_size=280)
    cfg = _cfg(tmp_path, tokenizer={"kind": "base"}, base={"name_or_path": str(tmp_path / "basemodel")})
    pipeline.run_stage(cfg, "data", log=lambda m: None)
    meta = data_meta(cfg.run_dir)
    base = AutoTokenizer.from_pretrained(tmp_path / "basemodel")
    assert meta["tokenizer"]["kind"] == "base" and meta["vocab_size"] == len(base)
    assert AutoTokenizer.from_pretrained(cfg.run_dir / "tokenizer").get_vocab() == base.get_vocab()
    # A base tokenizer without EOS is refused with one line naming it.
    no_eos = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    no_eos.save_pretrained(tmp_path / "noeos")
    cfg2 = _cfg(tmp_path, "run2", tokenizer={"kind": "base"}, base={"name_or_path": str(tmp_path / "noeos")})
    with pytest.raises(StageError) as err:
        pipeline.run_stage(cfg2, "data", log=lambda m: None)
    assert "noeos" in str(err.value) and "no EOS" in str(err.value) and "base.name_or_path" in str(err.value)


def test_empty_shard_and_too_little_data(tmp_path):
    _corpus(tmp_path)
    (tmp_path / "tiny.txt").write_text("short\n")
    cfg = _cfg(tmp_path, sources=[{"name": "code", "kind": "local", "paths": [str(tmp_path / "code.jsonl")]},
                                  {"name": "empty", "kind": "local", "paths": [str(tmp_path / "tiny.txt")]}])
    with pytest.raises(StageError) as err:
        pipeline.run_stage(cfg, "data", log=lambda m: None)
    msg = str(err.value)
    assert "data.sources.1" in msg and "empty" in msg and "no documents" in msg and "too_short" in msg
    assert not (cfg.run_dir / "data").exists()  # nothing that looks complete
    assert pipeline.load_manifest(cfg.run_dir)["stages"]["data"]["status"] == "failed"
    # Documents but not one val block of 64 tokens.
    cfg = _cfg(tmp_path, "run2", sources=[{"name": "code", "kind": "local", "paths": [str(tmp_path / "code.jsonl")],
                                           "max_documents": 8}], block_size=64)
    with pytest.raises(StageError, match=r"data\.(val|test)_fraction: shard code has"):
        pipeline.run_stage(cfg, "data", log=lambda m: None)
