"""Evaluate stage and the whole pipeline at tiny scale: every row of the report is measured, the numbers
in results.json are consistent with each other and with independent re-computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from downscale import pipeline
from tiny import fake_data_run

SECTIONS = {
    "base": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                      "num_kv_heads": 2},
             "train": {"max_steps": 120, "batch_size": 8, "lr": 5e-3, "warmup_steps": 10, "eval_every": 120,
                       "eval_batches": 1, "save_every": 120, "log_every": 40}},
    "compress": {"target_params": 0.6, "importance": "activation", "calibration_sequences": 8, "val_blocks": 4},
    "specialize": {"kd_ratio": 0.5, "train": {"max_steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                                              "eval_every": 20, "eval_batches": 1, "save_every": 20,
                                              "log_every": 5}},
    "combine": {"modes": ["logit_mean", "prob_mean", "routed", "weighted", "sparse"], "weights": [0.5, 0.25, 0.25],
                "prior_blocks": 4, "sparse_prefix": 8},
    "evaluate": {"control": True, "batch_size": 4},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = fake_data_run(tmp, **SECTIONS)
    results = pipeline.run_all(cfg, log=lambda m: None)
    return cfg, results


def test_whole_pipeline_writes_every_row_and_the_report(finished_run) -> None:
    cfg, entries = finished_run
    assert all(e["status"] == "complete" for e in entries.values()), {k: e["status"] for k, e in entries.items()}
    out = cfg.run_dir / "eval"
    res = json.loads((out / "results.json").read_text())
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds.count("base") == 1 and kinds.count("pruned") == 3 and kinds.count("specialized") == 3
    assert sorted(r["mode"] for r in res["rows"] if r["kind"] == "ensemble") == sorted(SECTIONS["combine"]["modes"])
    assert kinds.count("oracle") == 1 and kinds.count("control") == 1
    for r in res["rows"]:
        for shard in [*res["shards"], "pooled"]:
            assert math.isfinite(r["loss"][shard]) and r["loss"][shard] > 0, (r["name"], shard)
    # the oracle is the per-domain minimum over the specialized students
    spec = [r for r in res["rows"] if r["kind"] == "specialized"]
    oracle = next(r for r in res["rows"] if r["kind"] == "oracle")
    for shard in res["shards"]:
        assert oracle["loss"][shard] == min(r["loss"][shard] for r in spec)
    # the ensemble-size curve at m = n is the full ensemble of that mode
    for mode in ("logit_mean", "prob_mean", "routed", "sparse"):
        full = next(r for r in res["rows"] if r["kind"] == "ensemble" and r["mode"] == mode)
        assert res["ensemble_size_curves"][mode][-1]["loss"] == pytest.approx(full["loss"]["pooled"], rel=1e-4)
        # m = 1 averages the three single students
        singles = np.mean([r["loss"]["pooled"] for r in spec])
        assert res["ensemble_size_curves"][mode][0]["loss"] == pytest.approx(singles, rel=1e-4)
    # control trained on as many tokens as the students together (rounded up to whole steps)
    student_tokens = sum(json.loads((cfg.run_dir / "specialized" / str(i) / "train_summary.json").read_text())
                         ["tokens"] for i in range(3))
    assert res["control"]["student_tokens"] == student_tokens
    assert student_tokens <= res["control"]["tokens"] < student_tokens + 4 * 32 * 4 + 1
    # verdict consistent with the rows
    base = next(r for r in res["rows"] if r["kind"] == "base")
    best = min((r for r in res["rows"] if r["kind"] == "ensemble"), key=lambda r: r["loss"]["pooled"])
    assert res["verdict"]["best_ensemble"] == best["name"]
    assert res["verdict"]["ensemble_beats_base"] == (best["loss"]["pooled"] < base["loss"]["pooled"])
    # ledger: a row per stage with FLOPs; report and plots exist and carry the verdict
    stages = [r["stage"] for r in res["ledger"]["stages"]]
    assert stages[0].startswith("base") and "compress" in stages
    assert sum(s.startswith("specialize student") for s in stages) == 3
    assert all(r["flops"] > 0 for r in res["ledger"]["stages"])
    report = (out / "report.md").read_text()
    assert ("BEATS" in report) or ("does NOT beat" in report)
    for name in ("control", "oracle", "ensemble (routed)", "ensemble (weighted)", "downscaling guarantee"):
        assert name in report, name
    assert (out / "loss_vs_ensemble_size.png").stat().st_size > 1000
    assert (out / "loss_vs_params.png").stat().st_size > 1000
    assert (out / "loss_vs_inference_flops.png").stat().st_size > 1000
    assert (out / "loss_vs_training_flops.png").stat().st_size > 1000
    assert res["curve_mode"] == "routed" and res["ensemble_size_curve"] == res["ensemble_size_curves"]["routed"]
    assert "uses mode **routed**" in report


def test_sparse_row_counts_what_ran_and_the_verdict_speaks_of_inference_cost(finished_run) -> None:
    cfg, _ = finished_run
    res = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    base, routed, sparse = rows["base"], rows["ensemble (routed)"], rows["ensemble (sparse)"]
    spec = [r for r in res["rows"] if r["kind"] == "specialized"]
    # every test block is one sequence: all three students read its first 7 tokens, then one student the rest
    T, blocks = res["context"], sum(res["test_tokens"].values()) // (res["context"] - 1)
    info = sparse["sparse"]
    assert info["top_k"] == 1 and info["prefix"] == 8 and sum(info["sequences_routed"]) == blocks
    assert info["positions"] == blocks * T
    for i in range(3):
        assert info["student_positions"][i] == blocks * 7 + info["sequences_routed"][i] * (T - 7)
    want = sum(s["params"] * info["student_positions"][i] / info["positions"] for i, s in enumerate(spec))
    assert sparse["active_params"] == round(want)
    # (the context here is 32 tokens, so the 7-token prefix is a large share; the demo's is 256)
    assert min(s["params"] for s in spec) <= sparse["active_params"] < 0.75 * routed["active_params"]
    assert sparse["flops_per_token"] == pytest.approx(
        sum(s["flops_per_token"] * info["student_positions"][i] / info["positions"] for i, s in enumerate(spec)))
    # the verdict at inference cost, for every ensemble
    v = res["verdict"]
    by = {e["name"]: e for e in v["at_inference_cost"]}
    assert set(by) == {r["name"] for r in res["rows"] if r["kind"] == "ensemble"}
    for name, e in by.items():
        assert e["flops_ratio"] == pytest.approx(rows[name]["flops_per_token"] / base["flops_per_token"])
        assert e["beats_base"] == (rows[name]["loss"]["pooled"] < base["loss"]["pooled"])
        assert ("beats" if e["beats_base"] else "loses") in e["statement"] and f"{e['flops_ratio']:.2f}x" in \
            e["statement"]
    cheap = [e for e in by.values() if e["flops_ratio"] <= 1]
    assert v["best_at_most_base_cost"] == min(cheap, key=lambda e: e["loss"])
    report = (cfg.run_dir / "eval" / "report.md").read_text()
    assert "## Inference cost" in report and "At equal inference cost" in report
    assert by["ensemble (sparse)"]["statement"] in report


def test_base_row_matches_an_independent_computation(finished_run) -> None:
    from transformers import AutoModelForCausalLM

    from downscale.data.blocks import open_split

    cfg, _ = finished_run
    res = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "base").eval()
    nll, count = 0.0, 0
    for shard in res["shards"]:
        ids = torch.as_tensor(np.asarray(open_split(cfg.run_dir, shard, "test"), dtype=np.int64))
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    base = next(r for r in res["rows"] if r["kind"] == "base")
    assert base["loss"]["pooled"] == pytest.approx(nll / count, rel=1e-5)
    assert base["tokens"] == count


def test_rerun_skips_everything_and_a_changed_stage_reruns_downstream(finished_run) -> None:
    cfg, _ = finished_run
    before = {k: v.get("ended") for k, v in pipeline.load_manifest(cfg.run_dir)["stages"].items()}
    entries = pipeline.run_all(cfg, log=lambda m: None)
    assert {k: e.get("ended") for k, e in entries.items()} == {k: before[k] for k in entries}
    changed = cfg.model_copy(deep=True)
    changed.evaluate.curve_max_subsets = 2
    assert pipeline.stage_status(changed, pipeline.get_stage("evaluate"))[0] == "stale"
    assert pipeline.stage_status(changed, pipeline.get_stage("combine"))[0] == "complete"
