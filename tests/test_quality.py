"""Data pruning by quality (downscale.data.quality and the specialize stage's use of it): the per-document scores
equal an independent per-document NLL, the band keeps what it says, an interrupted scoring pass resumes, and the
stage trains on the kept documents and records what it dropped."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from downscale import pipeline
from downscale.data import quality
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SEP = 0


def _docs(n: int = 11, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 5, 40, 17, 3, 64, 9, 30, 12, 8][:n]
    return [rng.integers(1, 128, size=L).astype(np.uint16) for L in lengths]


def test_documents_survive_packing_and_splitting():
    docs = _docs()
    blocks = quality.repack(docs, SEP, 8, np.dtype(np.uint16))
    back = quality.split_documents(blocks, SEP)
    total = sum(len(d) + 1 for d in docs)
    assert blocks.shape == (total // 8, 8)
    n_whole = next(i for i in range(len(docs)) if sum(len(d) + 1 for d in docs[:i + 1]) > blocks.size)
    for a, b in zip(docs[:n_whole], back[:n_whole], strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(back[n_whole], docs[n_whole][: len(back[n_whole])])  # the last one cut by the end


@torch.no_grad()
def _independent_nll(model, doc: np.ndarray, score_tokens: int) -> float:
    ids = torch.as_tensor(doc[:score_tokens].astype(np.int64))[None]
    if ids.shape[1] < 2:
        return math.nan
    logits = model(input_ids=ids).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))


@pytest.mark.parametrize("score_tokens, batch", [(64, 4), (16, 3), (2, 1)])
def test_scores_equal_each_document_scored_alone(score_tokens, batch):
    model = tiny_model(seed=3).eval()
    docs = _docs()
    got = quality.score_documents(model, docs, score_tokens, batch, torch.device("cpu"), progress=False)
    want = np.array([_independent_nll(model, d, score_tokens) for d in docs])
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=2e-5)


def test_an_interrupted_scoring_pass_resumes(tmp_path):
    model = tiny_model(seed=4).eval()
    docs = _docs()
    full = quality.score_documents(model, docs, 32, 2, torch.device("cpu"), progress=False)

    class Stop(Exception):
        pass

    def stop_after_3(done, total):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        quality.score_documents(model, docs, 32, 2, torch.device("cpu"), cache=tmp_path, key="k", save_every=1,
                                progress=False, on_batch=stop_after_3)
    assert json.loads((tmp_path / "progress.json").read_text())["batches_done"] == 3
    seen = []
    again = quality.score_documents(model, docs, 32, 2, torch.device("cpu"), cache=tmp_path, key="k", save_every=1,
                                    progress=False, on_batch=lambda d, t: seen.append(d))
    assert seen == [4, 5, 6]  # only what was left
    np.testing.assert_array_equal(again, full)
    seen.clear()  # another key (another base, data or setting): scored from the start
    quality.score_documents(model, docs, 32, 2, torch.device("cpu"), cache=tmp_path, key="other", progress=False,
                            on_batch=lambda d, t: seen.append(d))
    assert seen == [1, 2, 3, 4, 5, 6]


def test_the_band_keeps_its_percentiles_and_the_unscored():
    scores = np.array([np.nan, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    keep, lo, hi = quality.select_band(scores, (10, 90))
    assert (lo, hi) == pytest.approx((1.9, 9.1))  # numpy's linear interpolation between ranks
    assert keep.tolist() == [True, False] + [True] * 8 + [False]
    keep, lo, hi = quality.select_band(scores, (0, 50))  # the half the base finds easiest
    assert keep.tolist() == [True] + [True] * 5 + [False] * 5 and hi == 5.5
    assert quality.select_band(scores, (0, 100))[0].all()
    with pytest.raises(ValueError, match="percentiles"):
        quality.select_band(scores, (50, 50))


def test_summary_counts_what_was_dropped():
    docs = [np.ones(n, dtype=np.uint16) for n in (4, 5, 6, 7)]
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    keep = np.array([False, True, True, False])
    s = quality.summary(docs, scores, keep, 1.5, 3.5, (10, 90), 10, 6, bins=4)
    assert s["documents"] == {"scored": 4, "unscored": 0, "kept": 2, "dropped_low": 1, "dropped_high": 1}
    assert s["tokens"] == {"before": 22, "kept": 11, "dropped_low": 4, "dropped_high": 7}
    assert s["blocks"] == {"before": 10, "after": 6} and sum(s["histogram"]["counts"]) == 4


def test_quality_settings_are_in_the_specialize_hash_only_when_on(tmp_path):
    from tiny import fake_data_run

    cfg = fake_data_run(tmp_path)
    tree = cfg.model_dump(mode="json")

    def spec_hash(**q):
        c = type(cfg).model_validate({**tree, "quality": q})
        return pipeline.config_hash(c, "specialize")

    off = spec_hash()
    assert spec_hash(band=[0, 50]) == off
    assert spec_hash(enabled=True) != off and spec_hash(enabled=True, band=[0, 50]) != spec_hash(enabled=True)


def test_specialize_trains_on_the_kept_documents_and_records_them(tmp_path):
    from test_specialize import _pruned_run

    cfg = _pruned_run(tmp_path, quality={"enabled": True, "band": [20, 80], "score_tokens": 16, "batch_size": 4})
    pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    summary = json.loads((cfg.run_dir / "specialized" / "0" / "train_summary.json").read_text())
    q = summary["quality"]
    d = q["documents"]
    assert d["dropped_low"] > 0 and d["dropped_high"] > 0 and d["kept"] > 0
    assert d["kept"] + d["dropped_low"] + d["dropped_high"] == d["scored"] + d["unscored"]
    assert 0 < q["blocks"]["after"] < q["blocks"]["before"]
    assert q["thresholds"][0] < q["thresholds"][1] and sum(q["histogram"]["counts"]) == d["scored"]
    assert (cfg.run_dir / "work" / "specialize" / "quality").is_dir()  # the scores, kept for a resume


def test_the_report_shows_each_shard_and_plots_its_band(tmp_path):
    from downscale.report import quality_md

    docs = [np.ones(n, dtype=np.uint16) for n in (4, 5, 6, 7, 8)]
    scores = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    keep, lo, hi = quality.select_band(scores, (25, 75))
    q = quality.summary(docs, scores, keep, lo, hi, (25, 75), 10, 6, bins=4)
    md = quality_md({"0": {"shard": "code", **q}, "1": {"shard": "legal", **q}}, tmp_path)
    text = "\n".join(md)
    assert "## Data pruned by quality" in text and "| 0 | code | 25-75 |" in text and "| 1 | legal |" in text
    assert "3 of 5" in text and "1 / 1" in text  # kept (the unscored one too), dropped below / above
    assert (tmp_path / "data_quality.png").stat().st_size > 0
    assert quality_md({}, tmp_path) == []


def test_the_ablation_trains_twins_on_unpruned_shards_and_pairs_the_rows(tmp_path):
    """quality.enabled + evaluate.quality_ablation through the whole pipeline: each student's twin, specialized the
    same way on its unpruned shard, is scored beside it; the report shows both and the pruning summary."""
    from test_evaluate import SECTIONS
    from tiny import fake_data_run

    sections = {**SECTIONS, "evaluate": {"control": False, "batch_size": 4, "quality_ablation": True},
                "combine": {"modes": ["logit_mean"], "prior_blocks": 4},
                "quality": {"enabled": True, "band": [20, 80], "score_tokens": 16}}
    cfg = fake_data_run(tmp_path, **sections)
    pipeline.run_all(cfg, log=lambda m: None)
    results = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    twins = [r for r in results["rows"] if r["kind"] == "ablation"]
    assert len(twins) == cfg.num_students
    names = {r["name"] for r in results["rows"]}
    for r in twins:
        assert r["pairs_with"] in names and r["paths"][0].startswith("eval/unpruned/")
        assert (cfg.run_dir / r["paths"][0] / "model.safetensors").is_file()
    pruned = json.loads((cfg.run_dir / "specialized" / "0" / "train_summary.json").read_text())
    twin = json.loads((cfg.run_dir / "eval" / "unpruned" / "0" / "train_summary.json").read_text())
    assert "quality" in pruned and "quality" not in twin
    assert twin["tokens"] == pruned["tokens"] and twin["steps"] == pruned["steps"]  # equal token budgets
    assert set(results["data_quality"]) == {str(i) for i in range(cfg.num_students)}
    report = (cfg.run_dir / "eval" / "report.md").read_text()
    assert "## Data pruned by quality" in report and "| student | pruned data | unpruned data |" in report
    assert all(r["name"] != w["name"] for w in results["winners"].values() for r in twins)


def test_a_band_that_keeps_less_than_a_block_is_one_line_naming_the_key(tmp_path, monkeypatch):
    from downscale.pipeline import StageError
    from test_specialize import _pruned_run

    cfg = _pruned_run(tmp_path, quality={"enabled": True, "band": [0, 0.5], "score_tokens": 8})
    # documents of 5 tokens: the one document the band keeps is shorter than a block of this run
    monkeypatch.setattr(quality, "split_documents", lambda blocks, sep: [np.asarray(blocks).reshape(-1)[i:i + 5]
                                                                         for i in range(0, 100, 5)])
    with pytest.raises(StageError) as err:
        pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    msg = str(err.value)
    assert "quality.band" in msg and "widen the band" in msg and "\n" not in msg
    assert not (cfg.run_dir / "specialized" / "0").exists()  # nothing half-written
