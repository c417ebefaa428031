"""Near-duplicate removal (downscale.data.neardup): MinHash estimates, LSH candidates, the data stage's use of it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from downscale import pipeline
from downscale.config import ExperimentConfig
from downscale.data import neardup
from downscale.data.blocks import data_meta
from downscale.data.sources import Document, SourceReport

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega river bridge stone light paper window garden engine signal market").split()


def _doc(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _edit(text: str, changes: int, seed: int) -> str:
    """``text`` with ``changes`` words replaced at random places."""
    rng = random.Random(seed)
    w = text.split()
    for i in rng.sample(range(len(w)), changes):
        w[i] = f"changed{i}"
    return " ".join(w)


def test_estimated_jaccard_follows_the_exact_one():
    h = neardup.MinHasher(num_perm=256, ngram=5)
    base = _doc(1)
    for changes in (0, 2, 6, 15, 40):
        other = _edit(base, changes, seed=changes)
        exact = neardup.exact_jaccard(base, other, 5)
        est = neardup.estimated_jaccard(h.signature(base), h.signature(other))
        assert abs(est - exact) < 0.1, (changes, est, exact)
    assert neardup.estimated_jaccard(h.signature(base), h.signature(_doc(2))) < 0.1  # unrelated documents


def test_near_duplicates_keep_the_first_of_each_group_and_nothing_else():
    a, b, c = _doc(10), _doc(11), _doc(12)
    texts = [a, b, _edit(a, 2, 1), c, _edit(b, 1, 2), _edit(a, 60, 3), a.upper()]
    assert neardup.exact_jaccard(a, _edit(a, 60, 3)) < 0.5  # heavily edited: no longer a near-duplicate
    out = neardup.near_duplicates(texts, threshold=0.8)
    assert out == [None, None, 0, None, 1, None, 0]  # case-insensitive shingles: the upper-cased copy is one
    assert neardup.near_duplicates(texts, threshold=0.8) == out  # deterministic


def test_short_documents_and_the_threshold_bounds():
    assert neardup.near_duplicates(["one two", "one two", "three"], threshold=1.0) == [None, 0, None]
    with pytest.raises(ValueError, match="threshold"):
        neardup.near_duplicates(["x"], threshold=0.0)


@pytest.mark.parametrize("num_perm, threshold", [(128, 0.8), (128, 0.5), (64, 0.9), (256, 0.7)])
def test_bands_put_the_steep_point_just_below_the_threshold(num_perm, threshold):
    bands, rows = neardup.choose_bands(num_perm, threshold)
    assert bands * rows == num_perm
    point = (1 / bands) ** (1 / rows)
    assert point <= threshold
    # no other split of num_perm has its point closer below the threshold
    others = [(1 / (num_perm // r)) ** (1 / r) for r in range(1, num_perm + 1) if num_perm % r == 0]
    assert all(p > threshold or p <= point for p in others)


def test_near_dedupe_counts_per_source():
    a = _doc(20)
    docs = [[Document(a, "a0"), Document(_doc(21), "a1")], [Document(_edit(a, 1, 5), "b0"), Document(_doc(22), "b1")]]
    reports = [SourceReport("a", "local"), SourceReport("b", "local")]
    out = neardup.near_dedupe(docs, reports, 0.8, 128, 5)
    assert [[d.origin for d in ds] for ds in out] == [["a0", "a1"], ["b1"]]
    assert reports[1].skipped["near_duplicate"] == 1 and reports[0].skipped["near_duplicate"] == 0
    assert [r.documents for r in reports] == [2, 1]


def _cfg(tmp_path, **near_dup) -> ExperimentConfig:
    tree = {"run": {"name": "t", "dir": str(tmp_path / "run")},
            "data": {"sources": [{"name": "s", "kind": "local", "paths": [str(tmp_path / "s.jsonl")]}],
                     "block_size": 16, "val_fraction": 0.15, "test_fraction": 0.15,
                     "tokenizer": {"vocab_size": 300, "min_frequency": 1}, "near_dup": near_dup}}
    return ExperimentConfig.model_validate(tree)


def test_the_data_stage_drops_near_duplicates_and_records_them(tmp_path):
    originals = [_doc(100 + i, 60) for i in range(30)]
    copies = [_edit(t, 1, i) for i, t in enumerate(originals[:8])]  # 8 near-copies of the first 8
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in originals + copies))
    cfg = _cfg(tmp_path, enabled=True)
    pipeline.run_stage(cfg, "data")
    assert data_meta(tmp_path / "run")["shards"] == ["s"]
    per_shard = json.loads((tmp_path / "run" / "data" / "s" / "meta.json").read_text())
    src = per_shard["sources"][0]
    assert src["skipped"]["near_duplicate"] == 8 and src["documents"] == 30
    assert sum(per_shard["documents"].values()) == 30


def test_near_dup_settings_are_in_the_data_hash_only_when_it_is_on(tmp_path):
    off = pipeline.config_hash(_cfg(tmp_path), "data")
    assert pipeline.config_hash(_cfg(tmp_path, threshold=0.5), "data") == off  # off: its settings change nothing
    on = pipeline.config_hash(_cfg(tmp_path, enabled=True), "data")
    assert on != off and pipeline.config_hash(_cfg(tmp_path, enabled=True, threshold=0.5), "data") != on


def test_signature_of_empty_text_is_constant():
    h = neardup.MinHasher(num_perm=16)
    assert np.array_equal(h.signature(""), h.signature("   "))
