"""The compress stage end to end on fake runs: artifacts, manifest, cache reuse, the recover hook,
``--plan``, and every bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from downscale import models, pipeline
from downscale.cli import main
from tiny import fake_data_run, mark_complete

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
COMPRESS = {"target_params": 0.6, "calibration_sequences": 8, "calibration_batch_size": 4, "val_blocks": 4}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("DOWNSCALE_NO_PROGRESS", "1")


def _run_with_base(tmp_path, arch="llama", tied=True, **compress):
    cfg = fake_data_run(tmp_path, compress={**COMPRESS, **compress},
                        base={"init": {"arch": arch, "hidden_size": 32, "intermediate_size": 64, "num_layers": 3,
                                       "num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": tied}})
    meta = json.loads((cfg.run_dir / "data" / "meta.json").read_text())
    base = models.build_model(cfg.base.init, vocab_size=meta["vocab_size"], max_positions=32)
    models.save_causal_lm(base, cfg.run_dir / "base", tokenizer_dir=cfg.run_dir / "tokenizer")
    mark_complete(cfg, "base")
    return cfg


def _yaml(cfg, tmp_path) -> str:
    path = Path(tmp_path) / "exp.yaml"
    path.write_text(cfg.to_yaml())
    return str(path)


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_compress_stage_end_to_end(tmp_path, arch, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _run_with_base(tmp_path, arch, tied)
    entry = pipeline.run_stage(cfg, "compress")
    assert entry["status"] == "complete"
    manifest = pipeline.load_manifest(cfg.run_dir)
    assert manifest["stages"]["compress"]["outputs"]["students"]
    assert pipeline.stage_status(cfg, pipeline.get_stage("compress"))[0] == "complete"
    report = json.loads((cfg.run_dir / "students" / "compress.json").read_text())
    shards = ["code", "legal", "prose"]
    base_total = report["base"]["params"]["total"]
    assert set(report["base"]["val_loss"]) == {*shards, "pooled"}
    assert len(report["students"]) == 3
    for i, st in enumerate(report["students"]):
        assert st["shard"] == shards[i] and st["calibration_shards"] == [shards[i]]
        assert st["importance"] == "activation" and st["calibration_blocks"] == 8
        assert set(st["params"]) == {"embedding", "attention", "mlp", "norms", "head", "total"}
        assert (st["params"]["head"] == 0) == tied
        assert st["params"]["total"] <= 0.6 * base_total
        assert set(st["val_loss"]) == {*shards, "pooled"} and st["peak_memory_mb"] > 0
        assert "rss" in st["peak_memory_kind"] and st["seconds"] >= 0
        folder = cfg.run_dir / "students" / str(i)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert models.count_params(model) == st["params"]["total"]
        assert model.config.hidden_size == st["shape"]["hidden_size"]
        assert AutoTokenizer.from_pretrained(folder).vocab_size > 0
        assert json.loads((folder / "compress_student.json").read_text())["shard"] == shards[i]
        # the refit (compress.reconstruct, on by default) ran and its effect is recorded beside the student
        assert st["rounds"][0]["refit_projections"] > 0
        assert set(st["without_reconstruct"]["val_loss"]) == {*shards, "pooled"}
    assert report["settings"]["reconstruct"] is True
    assert len(list((cfg.run_dir / "work" / "compress" / "scores").glob("*.safetensors"))) == 3
    assert not (cfg.run_dir / ".staging" / "compress").exists()
    # re-pruning to another shape reuses the cached importance scores: no new calibration pass
    cfg.compress.target_params = 0.45
    pipeline.run_stage(cfg, "compress")
    report = json.loads((cfg.run_dir / "students" / "compress.json").read_text())
    assert all(st["rounds"][0]["scores"] == "cached" for st in report["students"])
    assert all(st["params"]["total"] <= 0.45 * base_total for st in report["students"])


def test_iterative_rounds_call_recover_between_rounds(tmp_path):
    cfg = _run_with_base(tmp_path, calibration="all_shards", rounds=2, importance="taylor")
    calls = []

    def recover(model, round_index, student_index):
        calls.append((round_index, student_index, models.count_params(model)))
        return model

    pipeline.run_stage(cfg, "compress", recover=recover)
    report = json.loads((cfg.run_dir / "students" / "compress.json").read_text())
    first = report["plan"]["chosen"]["rounds"][0]["params"]
    assert [(r, s) for r, s, _ in calls] == [(0, 0), (0, 1), (0, 2)]
    assert all(n == first for _, _, n in calls)  # recover saw the round-1 student
    for st in report["students"]:
        assert [r["round"] for r in st["rounds"]] == [1, 2] and st["recovered_between_rounds"]
        assert st["rounds"][0]["params"] > st["rounds"][1]["params"] == st["params"]["total"]
        assert st["calibration_shards"] == ["code", "legal", "prose"]
    # all shards calibrate every student: one cached score file serves all three
    assert len(list((cfg.run_dir / "work" / "compress" / "scores").glob("*.safetensors"))) == 1
    # without a recover hook the rounds still happen (scores recomputed on the round-1 student)
    pipeline.run_stage(cfg, "compress", force=True)
    report = json.loads((cfg.run_dir / "students" / "compress.json").read_text())
    for st in report["students"]:
        assert not st["recovered_between_rounds"]
    # student 0 computes its round-2 scores; with all shards calibrating, students 1 and 2 are the same model
    # after round 1 and reuse them (the later rounds' scores are cached too, without a hook the config does
    # not describe)
    assert [[r["scores"] for r in st["rounds"]] for st in report["students"]] == [
        ["cached", "computed"], ["cached", "cached"], ["cached", "cached"]]
    pipeline.run_stage(cfg, "compress", force=True)
    report = json.loads((cfg.run_dir / "students" / "compress.json").read_text())
    for st in report["students"]:
        assert [r["scores"] for r in st["rounds"]] == ["cached", "cached"]


def test_plan_json_for_published_config(tmp_path, capsys):
    cfg = fake_data_run(tmp_path)
    tree = json.loads(json.dumps(cfg.model_dump(mode="json")))
    tree["base"]["name_or_path"] = str(FIXTURES / "llama3-8b")
    tree["data"]["tokenizer"]["kind"] = "base"
    tree["compress"]["target_params"] = 950_000_000
    tree["compress"]["prune_depth"] = True
    path = tmp_path / "big.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tree))
    assert main(["compress", str(path), "--plan", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base"]["params"]["total"] == 8_030_261_248
    assert out["student"]["params"]["total"] < 1_000_000_000
    assert out["student"]["shape"]["num_layers"] < 32 and out["num_students"] == 3
    assert 0.11 < out["student"]["fraction_of_base"] < 0.125
    assert not (cfg.run_dir / "students").exists()
    assert main(["compress", str(path), "--plan"]) == 0
    assert "students of" in capsys.readouterr().out


def test_plan_from_init_and_from_run_base(tmp_path, capsys):
    cfg = fake_data_run(tmp_path)  # no base yet: the plan comes from base.init and the data vocabulary
    assert main(["compress", _yaml(cfg, tmp_path), "--plan", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "base.init" in out["source"] and out["student"]["fraction_of_base"] <= 0.5
    cfg = _run_with_base(tmp_path / "b")
    assert main(["compress", _yaml(cfg, tmp_path / "b"), "--plan", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"].endswith("config.json") and out["base"]["shape"]["num_layers"] == 3


def _bad_base_config(cfg):
    from transformers import AutoConfig

    gpt2 = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=300)
    for f in (cfg.run_dir / "base").glob("*"):
        f.unlink()
    gpt2.save_pretrained(cfg.run_dir / "base")
    mark_complete(cfg, "base")


@pytest.mark.parametrize("case, overrides, expect", [
    ("above", ["compress.target_params=1000000000"], "compress.target_params: target 1,000,000,000"),
    ("embeddings", ["compress.target_params=500"], "below the embeddings alone"),
    ("heads", ["compress.shape.num_heads=3", "compress.shape.num_kv_heads=2"], "impossible head ratio"),
    ("arch", [], "unsupported architecture 'gpt2'"),
    ("missing", [], "base/config.json: missing; stage 'compress' reads it"),  # against the manifest's record
    ("no_stage", [], "needs stage 'base'"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case, overrides, expect):
    cfg = _run_with_base(tmp_path)
    if case == "arch":
        _bad_base_config(cfg)
    if case == "missing":
        (cfg.run_dir / "base" / "config.json").unlink()
    if case == "no_stage":
        manifest = pipeline.load_manifest(cfg.run_dir)
        del manifest["stages"]["base"]
        (cfg.run_dir / "manifest.json").write_text(json.dumps(manifest))
    code = main(["compress", _yaml(cfg, tmp_path), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("downscale: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and expect in errors[0], err
    assert "Traceback" not in err
    assert not (cfg.run_dir / "students").exists()
    assert not (cfg.run_dir / ".staging" / "compress").exists()
    if case not in ("no_stage", "missing"):  # refused before it runs: no entry at all
        assert pipeline.load_manifest(cfg.run_dir)["stages"]["compress"]["status"] == "failed"
    else:
        assert "compress" not in pipeline.load_manifest(cfg.run_dir)["stages"]
