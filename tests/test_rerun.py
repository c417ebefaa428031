"""Re-runs: a stage re-runs exactly when a config key it reads or the content it reads changed, the cascade
follows content (not end times), and ``plan`` / ``downscale status`` predict what ``run_all`` executes.

The table tests replace every stage's ``run`` by a fast fake that writes deterministic content from what the
stage reads (its content keys and input fingerprints) plus report files with timings where the real stage
has them; one test runs the real tiny pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from downscale import cli, pipeline
from downscale._io import write_json_atomic
from downscale.config import ExperimentConfig, load_config
from tiny import fake_data_run, tiny_experiment

ALL = set(pipeline.STAGE_NAMES)
DOWN_FROM_BASE = ALL - {"data"}

# --------------------------------------------------------------------------- fake stages


def _fake_run(name: str, calls: list[str]):
    """A stage ``run`` that writes its outputs at once: content from the config keys it reads and the
    fingerprints of what it reads upstream (deterministic, as the real stages on a CPU), report files from
    everything it reads plus the time (the real base, compress and specialize record seconds in them)."""
    stage = pipeline.get_stage(name)

    def run(ctx, **_):
        calls.append(name)
        cfg = ctx.cfg
        content, report = pipeline.stage_keys(cfg, stage)
        inputs = pipeline._inputs(ctx.run_dir, stage, pipeline.load_manifest(ctx.run_dir), cfg)
        body = {"stage": name, "keys": content, "inputs": inputs}
        notes = {**body, "report_keys": report, "ns": time.time_ns()}
        root = ctx.run_dir if stage.incremental else ctx.staging
        if name == "data":
            write_json_atomic(root / "data" / "meta.json", body)
            write_json_atomic(root / "tokenizer" / "tokenizer.json", body)
        elif name == "base":
            write_json_atomic(root / "base" / "model.json", body)
            # an imported base's summary has no timings; a pretrained one's has
            write_json_atomic(root / "base" / "train_summary.json",
                              {**notes, "ns": None} if cfg.base.name_or_path else notes)
        elif name == "compress":
            write_json_atomic(root / "students" / "0" / "model.json", body)
            write_json_atomic(root / "students" / "0" / "compress_student.json", notes)
            write_json_atomic(root / "students" / "compress.json", notes)
        elif name == "specialize":
            write_json_atomic(root / "specialized" / "0" / "model.json", body)
            write_json_atomic(root / "specialized" / "0" / "train_summary.json", notes)
        elif name == "combine":
            write_json_atomic(root / "ensemble" / "ensemble.json", body)
        else:
            write_json_atomic(root / "eval" / "results.json", notes)
        return {}

    return run


@pytest.fixture
def fakes(monkeypatch) -> list[str]:
    """Every stage's ``run`` replaced by a fake; returns the list of stage names run, in order."""
    import importlib

    calls: list[str] = []
    for stage in pipeline.STAGES:
        monkeypatch.setattr(importlib.import_module(stage.module), "run", _fake_run(stage.name, calls))
    return calls


def _imported(tmp_path: Path) -> ExperimentConfig:
    return tiny_experiment(tmp_path, base={"name_or_path": str(tmp_path / "hf-model"), "init": {}, "train": {}},
                           data={"tokenizer": {"kind": "base"}})


def _pretrained(tmp_path: Path) -> ExperimentConfig:
    return tiny_experiment(tmp_path)


def with_override(cfg: ExperimentConfig, tmp_path: Path, *overrides: str) -> ExperimentConfig:
    """``cfg`` with ``key=value`` overrides, through the CLI's loader."""
    path = tmp_path / "experiment.yaml"
    path.write_text(cfg.to_yaml())
    return load_config(path, list(overrides), check_paths=False)


def _stale(cfg: ExperimentConfig) -> set[str]:
    return {name for name, (status, _) in pipeline.plan(cfg).items() if status != "complete"}


# (override, base kind, the stages that must re-run)
CASES = [
    ("compress.val_blocks=3", "pretrained", {"compress", "evaluate"}),
    ("specialize.train.log_every=1", "pretrained", set()),
    ("specialize.train.report_to=tensorboard", "pretrained", set()),
    ("specialize.train.save_every=7", "pretrained", set()),
    ("specialize.train.keep_checkpoints=5", "pretrained", set()),
    ("specialize.train.eval_every=3", "pretrained", set()),
    ("specialize.kd_chunk_tokens=64", "pretrained", set()),
    ("specialize.compile=true", "pretrained", set()),
    ("specialize.jsd_beta=0.3", "pretrained", set()),  # kd_loss is forward_kl: jsd_beta is not read
    ("specialize.train.lr=0.01", "pretrained", {"specialize", "combine", "evaluate"}),
    ("specialize.train.eval_batches=3", "pretrained", {"specialize", "combine", "evaluate"}),
    ("evaluate.device_watts=300", "pretrained", {"evaluate"}),
    ("evaluate.control_lr=0.01", "pretrained", {"evaluate"}),
    ("base.train.max_steps=7", "pretrained", DOWN_FROM_BASE),
    ("base.train.max_steps=7", "imported", set()),
    ("base.train.lr=0.01", "imported", set()),
    ("base.train.log_every=3", "pretrained", set()),
    ("base.train.eval_batches=3", "pretrained", {"base", "evaluate"}),
    ("base.import_eval_batches=3", "imported", {"base", "evaluate"}),
    ("base.import_eval_batches=3", "pretrained", set()),
    ("base.gguf_file=model.gguf", "imported", ALL),  # the data stage takes the tokenizer from it
    ("base.dtype=bfloat16", "imported", DOWN_FROM_BASE),
    ("base.dtype=bfloat16", "pretrained", {"compress", "specialize", "combine", "evaluate"}),
    ("run.precision=bf16", "pretrained", DOWN_FROM_BASE),
    ("run.precision=bf16", "imported", DOWN_FROM_BASE),
    ("run.device=cpu", "pretrained", set()),
    ("run.threads=1", "pretrained", set()),
    ("run.seed=1", "pretrained", ALL),
    ("combine.modes=[logit_mean]", "pretrained", {"combine", "evaluate"}),
    ("data.block_size=16", "pretrained", ALL),
    ("data.cluster.k=3", "pretrained", set()),  # shard_by is source: no clustering
    ("data.tokenizer.vocab_size=512", "imported", set()),  # the base's tokenizer: no BPE is trained
    ("compress.recover_steps=4", "pretrained", {"compress", "specialize", "combine", "evaluate"}),
]


@pytest.mark.parametrize(("override", "kind", "expected"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_status_predicts_what_run_executes(tmp_path, fakes, override, kind, expected) -> None:
    cfg = (_imported if kind == "imported" else _pretrained)(tmp_path)
    pipeline.run_all(cfg, log=lambda m: None)
    assert fakes == list(pipeline.STAGE_NAMES)
    assert _stale(cfg) == set()
    changed = with_override(cfg, tmp_path, override)
    predicted = _stale(changed)
    fakes.clear()
    pipeline.run_all(changed, log=lambda m: None)
    assert predicted == set(fakes) == expected, (predicted, fakes)
    assert _stale(changed) == set()


def test_cross_section_keys(tmp_path, fakes) -> None:
    """Keys a stage reads from another section: compress's recovery uses specialize's KD and optimizer
    settings; evaluate's control uses specialize's loop settings (not its step count)."""
    cfg = with_override(_pretrained(tmp_path), tmp_path, "compress.recover_steps=4")
    pipeline.run_all(cfg, log=lambda m: None)
    for override, expected in [
        ("specialize.train.lr=0.02", {"compress", "specialize", "combine", "evaluate"}),
        ("specialize.temperature=2.0", {"compress", "specialize", "combine", "evaluate"}),
        ("specialize.train.max_steps=9", {"specialize", "combine", "evaluate"}),
        ("specialize.train.grad_accum=2", {"specialize", "combine", "evaluate"}),  # the recovery does not use it
        ("specialize.teacher_quant=8bit", {"specialize", "combine", "evaluate"}),
        ("evaluate.control=false", {"evaluate"}),
    ]:
        changed = with_override(cfg, tmp_path, override)
        predicted = _stale(changed)
        fakes.clear()
        pipeline.run_all(changed, log=lambda m: None)
        assert predicted == set(fakes) == expected, (override, predicted, fakes)
        cfg = changed


def test_evaluate_reads_the_control_settings_only_with_a_control(tmp_path) -> None:
    cfg = _pretrained(tmp_path)
    keys = set(pipeline.stage_keys(cfg, "evaluate")[0])
    assert {"specialize.train.lr", "specialize.train.batch_size", "evaluate.control_lr"} <= keys
    assert "specialize.train.max_steps" not in keys and "specialize.train.log_every" not in keys
    keys = set(pipeline.stage_keys(with_override(cfg, tmp_path, "evaluate.control_lr=0.1"), "evaluate")[0])
    assert "specialize.train.lr" not in keys and "specialize.train.batch_size" in keys
    keys = set(pipeline.stage_keys(with_override(cfg, tmp_path, "evaluate.control=false"), "evaluate")[0])
    assert not any(k.startswith("specialize.") for k in keys) and "evaluate.control_lr" not in keys
    # device_watts and grid_gco2_per_kwh stay: the ledger that uses them is made inside the stage
    assert {"evaluate.device_watts", "evaluate.grid_gco2_per_kwh", "run.precision"} <= keys


def test_status_names_the_key_and_the_upstream_that_will_rerun(tmp_path, fakes, capsys) -> None:
    cfg = _pretrained(tmp_path)
    pipeline.run_all(cfg, log=lambda m: None)
    path = tmp_path / "experiment.yaml"
    path.write_text(cfg.to_yaml())
    assert cli.main(["status", str(path), "compress.val_blocks=3"]) == 0
    out = capsys.readouterr().out
    assert "compress    stale     config changed: compress.val_blocks (32 -> 3)" in out
    assert "specialize  complete" in out and "combine     complete" in out
    assert "evaluate    stale     upstream compress will re-run" in out
    assert "`downscale run` would run: compress, evaluate" in out
    assert cli.main(["status", str(path), "--json"]) == 0
    assert {v["status"] for v in json.loads(capsys.readouterr().out).values()} == {"complete"}


def test_a_rerun_with_the_same_outputs_does_not_cascade(tmp_path, fakes) -> None:
    """--force redoes the named stages only; the stages after them follow the content they read."""
    cfg = _pretrained(tmp_path)
    pipeline.run_all(cfg, log=lambda m: None)
    fakes.clear()
    pipeline.run_all(cfg, stages=("data", "combine"), force=True, log=lambda m: None)
    assert fakes == ["data", "combine"]
    fakes.clear()
    pipeline.run_all(cfg, log=lambda m: None)
    assert fakes == []  # data and the ensemble came out the same: nothing after them re-runs
    # compress re-run: its students' content is the same, its report (timings) is not: only evaluate reads that
    pipeline.run_all(cfg, stages=("compress",), force=True, log=lambda m: None)
    assert pipeline.plan(cfg)["evaluate"] == ("stale", "inputs changed: compress re-ran since")
    assert _stale(cfg) == {"evaluate"}
    fakes.clear()
    pipeline.run_all(cfg, log=lambda m: None)
    assert fakes == ["evaluate"]
    # a deleted student folder: specialize re-runs, and its new summaries re-run combine and evaluate
    import shutil

    shutil.rmtree(cfg.run_dir / "specialized" / "0")
    assert pipeline.plan(cfg)["specialize"] == ("stale", "output specialized changed on disk")
    assert _stale(cfg) == {"specialize", "combine", "evaluate"}
    fakes.clear()
    pipeline.run_all(cfg, log=lambda m: None)
    assert fakes == ["specialize", "combine", "evaluate"]


def test_an_older_manifest_is_stale_once_and_says_why(tmp_path, fakes) -> None:
    cfg = _pretrained(tmp_path)
    pipeline.run_all(cfg, log=lambda m: None)
    manifest = pipeline.load_manifest(cfg.run_dir)
    for entry in manifest["stages"].values():  # as downscale wrote it before per-stage keys
        entry["config_hash"] = "0123456789abcdef"
        entry["inputs"] = {up: {"x": "0"} for up in entry["inputs"]}
        for key in ("content_hash", "config_keys", "products", "config_file"):
            entry.pop(key)
    write_json_atomic(cfg.run_dir / "manifest.json", manifest)
    rows = pipeline.plan(cfg)
    assert all(status == "stale" and "config hash v1" in why and "re-runs once" in why
               for status, why in rows.values()), rows
    fakes.clear()
    pipeline.run_all(cfg, log=lambda m: None)
    assert fakes == list(pipeline.STAGE_NAMES)
    assert _stale(cfg) == set()


def test_each_stage_keeps_the_config_it_ran_with(tmp_path, fakes) -> None:
    cfg = _pretrained(tmp_path)
    pipeline.run_all(cfg, log=lambda m: None)
    changed = with_override(cfg, tmp_path, "specialize.train.lr=0.02")
    pipeline.run_stage(changed, "specialize", log=lambda m: None)
    run = cfg.run_dir

    def lr(path: Path) -> float:
        return yaml.safe_load(path.read_text())["specialize"]["train"]["lr"]

    assert lr(run / "config.yaml") == 0.02  # the latest
    assert lr(run / "configs" / "specialize.yaml") == 0.02
    assert lr(run / "configs" / "compress.yaml") == lr(run / "configs" / "combine.yaml") == cfg.specialize.train.lr
    entry = pipeline.load_manifest(run)["stages"]["specialize"]
    assert entry["config_file"] == "configs/specialize.yaml"
    assert entry["config_keys"]["specialize.train.lr"] == 0.02
    assert "specialize.train.log_every" not in entry["config_keys"]
    assert not list((run / "configs").glob(".*"))  # written atomically: no temporary left


def test_missing_keys_are_skipped(tmp_path) -> None:
    """A key that the schema does not have (yet) is skipped, not an error."""
    cfg = _pretrained(tmp_path)
    keys = pipeline.Keys(("run.seed", "base.no_such_key", "nope"), report=("run.nope",))
    assert pipeline._select(cfg.model_dump(mode="json"), keys.content, ()) == {"run.seed": 0}


# --------------------------------------------------------------------------- the real tiny pipeline

REAL = {
    "base": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                      "num_kv_heads": 2},
             "train": {"max_steps": 8, "batch_size": 4, "lr": 5e-3, "warmup_steps": 2, "eval_every": 8,
                       "eval_batches": 1, "save_every": 8, "log_every": 4}},
    "compress": {"target_params": 0.6, "importance": "activation", "calibration_sequences": 8, "val_blocks": 4},
    "specialize": {"train": {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 4,
                             "eval_batches": 1, "save_every": 4, "log_every": 2}},
    "combine": {"prior_blocks": 2},
    "evaluate": {"control": False, "batch_size": 4, "max_test_tokens_per_shard": 256},
}


@pytest.mark.usefixtures("one_thread")
def test_real_pipeline_status_matches_run(tmp_path) -> None:
    cfg = fake_data_run(tmp_path, **REAL)
    pipeline.run_all(cfg, log=lambda m: None)

    def run(c: ExperimentConfig) -> list[str]:
        logs: list[str] = []
        pipeline.run_all(c, log=logs.append)
        return [m[1:m.index("]")] for m in logs if m.startswith("[") and "] running (" in m]

    for override, expected in [
        ("compress.val_blocks=2", {"compress", "evaluate"}),  # the students' weights are the same
        ("specialize.train.log_every=1", set()),
        ("base.train.eval_batches=2", {"base", "evaluate"}),  # the base retrains to the same weights
        ("evaluate.device_watts=350", {"evaluate"}),
    ]:
        changed = with_override(cfg, tmp_path, override)
        predicted = _stale(changed)
        ran = run(changed)
        assert predicted == set(ran) == expected, (override, predicted, ran)
        cfg = changed
