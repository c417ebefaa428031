"""Specialize stage: distillation makes student i better on shard i (lower CE and KL to the base), every
trainable weight moves, killed runs resume to identical weights, DDP ranks stay in sync, bad input fails."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from downscale import pipeline, train
from downscale.pipeline import StageError
from tiny import fake_data_run

SPECIALIZE = {"kd_ratio": 0.5, "train": {"max_steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                                         "eval_every": 6, "eval_batches": 2, "save_every": 4, "log_every": 2}}
COMPRESS = {"target_params": 0.6, "importance": "magnitude", "calibration_sequences": 8, "val_blocks": 4}


def _pruned_run(tmp_path, init: dict | None = None, **sections):
    """A tiny run with data (faked), a briefly trained base and pruned students: ready to specialize."""
    sections.setdefault("specialize", SPECIALIZE)
    sections.setdefault("compress", COMPRESS)
    base = {"init": {**_tiny_base()["init"], **(init or {})},
            "train": {"max_steps": 200, "batch_size": 8, "lr": 5e-3, "warmup_steps": 10, "eval_every": 200,
                      "eval_batches": 1, "save_every": 200, "log_every": 50}}
    cfg = fake_data_run(tmp_path, base=base, **sections)
    for stage in ("base", "compress"):
        assert pipeline.run_stage(cfg, stage, log=lambda m: None)["status"] == "complete"
    return cfg


def _tiny_base():
    return {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                     "num_kv_heads": 2}}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_student_improves_on_its_shard_and_every_parameter_changes(tmp_path) -> None:
    cfg = _pruned_run(tmp_path)
    entry = pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    out = cfg.run_dir / "specialized" / "0"
    summary = json.loads((out / "train_summary.json").read_text())
    shard = summary["shard"]
    before, after = summary["before"][shard], summary["after"][shard]
    assert after["kl"] < before["kl"], (before, after)
    assert after["ce"] < before["ce"], (before, after)
    assert summary["trainable_tensors"] > 0 and summary["trainable_params"] == summary["params"]
    assert summary["trainable_tensors_changed"] == summary["trainable_tensors"]
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 4 * 32
    assert summary["rank_weight_digests"] and len(summary["rank_weight_digests"]) == 1
    # a plain HF folder, loadable without us, with the tokenizer and the metrics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 300
    assert AutoTokenizer.from_pretrained(out).eos_token_id == 0
    assert (out / "metrics.jsonl").read_text().strip()
    # one part done, the stage is not complete yet; the other students complete it
    assert entry.get("all_parts_complete") is False
    manifest = pipeline.load_manifest(cfg.run_dir)
    assert manifest["stages"]["specialize"]["parts"]["0"]["status"] == "complete"
    assert manifest["stages"].get("specialize", {}).get("status") != "complete"


def test_killed_specialize_resumes_to_the_same_weights(tmp_path, monkeypatch) -> None:
    cfg = _pruned_run(tmp_path)

    class Killed(Exception):
        pass

    real_fit = train.fit

    def fit_killed_at_step_7(*args, **kwargs):
        def on_step(step):
            if step == 7:
                raise Killed

        return real_fit(*args, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(train, "fit", fit_killed_at_step_7)
    with pytest.raises(Killed):
        pipeline.run_stage(cfg, "specialize", part=1, log=lambda m: None)
    assert not (cfg.run_dir / "specialized" / "1").exists(), "no half-written student"
    monkeypatch.setattr(train, "fit", real_fit)
    resumed_entry = pipeline.run_stage(cfg, "specialize", part=1, log=lambda m: None)
    summary = json.loads((cfg.run_dir / "specialized" / "1" / "train_summary.json").read_text())
    assert summary["resumed_from"] == 4, resumed_entry
    resumed = _weights(cfg.run_dir / "specialized" / "1")
    # the same student again from scratch: identical weights
    shutil.rmtree(cfg.run_dir / "work" / "specialize" / "student-1")
    shutil.rmtree(cfg.run_dir / "specialized" / "1")
    pipeline.run_stage(cfg, "specialize", part=1, log=lambda m: None)
    fresh = _weights(cfg.run_dir / "specialized" / "1")
    assert json.loads((cfg.run_dir / "specialized" / "1" / "train_summary.json").read_text())["resumed_from"] is None
    assert resumed.keys() == fresh.keys()
    for name in fresh:
        assert torch.equal(resumed[name], fresh[name]), name


def test_cached_teacher_lora_and_replay(tmp_path) -> None:
    spec = {**SPECIALIZE, "teacher": "cache", "cache_top_k": 16, "lora": True, "lora_rank": 4,
            "replay_fraction": 0.25, "kd_ratio": 0.7}
    cfg = _pruned_run(tmp_path, specialize=spec)
    pipeline.run_stage(cfg, "specialize", part=2, log=lambda m: None)
    summary = json.loads((cfg.run_dir / "specialized" / "2" / "train_summary.json").read_text())
    shard = summary["shard"]
    assert summary["after"][shard]["kl"] < summary["before"][shard]["kl"]
    assert summary["trainable_tensors_changed"] == summary["trainable_tensors"] > 0
    assert 0 < summary["trainable_params"] < summary["params"]  # LoRA adapters only
    # LoRA merged: the output has exactly the pruned student's tensor names, and the weights moved
    pruned, merged = _weights(cfg.run_dir / "students" / "2"), _weights(cfg.run_dir / "specialized" / "2")
    assert pruned.keys() == merged.keys()
    assert any(not torch.equal(pruned[k], merged[k]) for k in pruned if "proj" in k)
    # replay draws the other shards' caches too: one cache per shard was built
    caches = sorted(p.name for p in (cfg.run_dir / "work" / "teacher_cache").iterdir() if p.is_dir())
    assert caches == ["code", "legal", "prose"]


def test_foreign_teacher_cache_is_refused(tmp_path) -> None:
    cache_dir = tmp_path / "cache"
    spec = {**SPECIALIZE, "teacher": "cache", "cache_top_k": 8, "cache_dir": str(cache_dir)}
    spec["train"] = {**SPECIALIZE["train"], "max_steps": 2}
    cfg = _pruned_run(tmp_path / "a", specialize=spec)
    pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    assert (cache_dir / "code" / "meta.json").exists()
    # another run with another base, pointed at the same cache folder
    other = fake_data_run(tmp_path / "b", base={**_tiny_base(), "train": {"max_steps": 3, "batch_size": 4}},
                          compress=COMPRESS, specialize=spec)
    for stage in ("base", "compress"):
        pipeline.run_stage(other, stage, log=lambda m: None)
    with pytest.raises(StageError, match="another") as info:
        pipeline.run_stage(other, "specialize", part=0, log=lambda m: None)
    assert "specialize.cache_dir" in str(info.value) and "\n" not in str(info.value)
    assert not (other.run_dir / "specialized" / "0").exists()


def test_vocabulary_mismatch_fails_fast(tmp_path) -> None:
    from tiny import tiny_model

    cfg = _pruned_run(tmp_path)
    odd = tiny_model(vocab_size=256)
    odd.save_pretrained(cfg.run_dir / "students" / "0")
    with pytest.raises(StageError, match="vocabular") as info:
        pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    assert str(cfg.run_dir / "students" / "0") in str(info.value)
    assert not (cfg.run_dir / "specialized" / "0").exists()


def test_bad_specialize_settings_exit_2_with_one_line(tmp_path) -> None:
    cfg_file = tmp_path / "bad.yaml"
    data = "data: {sources: [{name: a, kind: builtin, builtin: python_code}]}\n"
    cfg_file.write_text("run: {name: bad, dir: %s}\nspecialize: {kd_ratio: 1.5}\n" % (tmp_path / "run") + data)
    res = subprocess.run([sys.executable, "-m", "downscale.cli", "specialize", str(cfg_file)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "specialize.kd_ratio" in lines[0] and str(cfg_file) in lines[0], res.stderr
    cfg_file.write_text("run: {name: bad, dir: %s}\nspecialize: {kd_loss: jsd, jsd_beta: 1.0}\n" % (tmp_path / "r")
                        + data)
    res = subprocess.run([sys.executable, "-m", "downscale.cli", "specialize", str(cfg_file)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "specialize.jsd_beta" in res.stderr


def test_empty_shard_is_a_clear_error(tmp_path) -> None:
    import numpy as np

    cfg = _pruned_run(tmp_path)
    # the shard of student 1 loses its training blocks after compress (e.g. a re-run of data with a typo)
    train_bin = cfg.run_dir / "data" / "legal" / "train.bin"
    np.zeros(0, dtype=np.uint16).tofile(train_bin)
    with pytest.raises(StageError, match="no train blocks") as info:
        from downscale.pipeline import StageContext
        from downscale.stages import specialize

        ctx = StageContext(cfg=cfg, run_dir=cfg.run_dir, staging=tmp_path / "staging", stage="specialize",
                           log=lambda m: None)
        specialize.specialize_student(ctx, 1, ["code", "legal", "prose"], tmp_path / "out")
    assert "legal" in str(info.value)


def test_iterative_compress_recovers_by_distillation(tmp_path) -> None:
    compress = {**COMPRESS, "target_params": 0.4, "rounds": 2, "recover_steps": 3}
    cfg = _pruned_run(tmp_path, compress=compress)
    report = json.loads((cfg.run_dir / "students" / "compress.json").read_text())
    for student in report["students"]:
        assert student["recovered_between_rounds"] is True
        assert len(student["rounds"]) == 2


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate launcher not installed")
def test_two_process_ddp_matches_one_process(tmp_path) -> None:
    """`accelerate launch` with 2 CPU processes (gloo): both ranks end with identical weights (digests
    gathered from each rank), equal to a 1-process run with the same global batch."""
    spec = {**SPECIALIZE, "train": {**SPECIALIZE["train"], "max_steps": 6, "batch_size": 2}}
    one = {**SPECIALIZE, "train": {**SPECIALIZE["train"], "max_steps": 6, "batch_size": 2, "grad_accum": 2}}
    ddp_cfg = _pruned_run(tmp_path / "ddp", specialize=spec)
    ref_cfg = _pruned_run(tmp_path / "one", specialize=one)
    pipeline.run_stage(ref_cfg, "specialize", part=0, log=lambda m: None)

    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(ddp_cfg.to_yaml())
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": "29731"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([str(launcher if launcher.exists() else "accelerate"), "launch", "--config_file",
                          str(root / "configs" / "accelerate" / "cpu_ddp_2proc.yaml"), "--main_process_port",
                          "29731", "-m", "downscale.cli", "specialize", str(cfg_file), "--student", "0"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((ddp_cfg.run_dir / "specialized" / "0" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    ddp, ref = _weights(ddp_cfg.run_dir / "specialized" / "0"), _weights(ref_cfg.run_dir / "specialized" / "0")
    worst = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-4, worst
    moved = max(float((ref[k] - _weights(ref_cfg.run_dir / "students" / "0")[k]).abs().max()) for k in ref)
    assert moved > 100 * worst, (moved, worst)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_online_teacher(tmp_path, quant) -> None:
    """bitsandbytes 8-bit / 4-bit teacher (its CPU kernels here; CUDA on a GPU box): quantized layers, logits
    close to the full-precision base, and a specialize run that distils from it."""
    pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    from downscale.stages.specialize import load_teacher

    spec = {**SPECIALIZE, "teacher_quant": quant, "train": {**SPECIALIZE["train"], "max_steps": 3}}
    # bitsandbytes' 4-bit CPU kernel needs in_features >= its block size (64): a 64-wide base
    cfg = _pruned_run(tmp_path, init={"hidden_size": 64, "intermediate_size": 128}, specialize=spec)
    base_dir = cfg.run_dir / "base"
    teacher = load_teacher(base_dir, SimpleNamespace(teacher_quant=quant), torch.device("cpu"), None)
    kind = type(teacher.model.layers[0].mlp.up_proj).__name__
    assert kind == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quant]
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = teacher(input_ids=ids).logits.float(), full(input_ids=ids).logits
    assert float((a - b).abs().max()) < 0.1 * float(b.abs().max()) + 0.05
    pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    summary = json.loads((cfg.run_dir / "specialized" / "0" / "train_summary.json").read_text())
    assert summary["kd"]["teacher_quant"] == quant and summary["steps"] == 3
    assert math.isfinite(summary["after"][summary["shard"]]["kl"])


def test_cache_only_pass_builds_what_training_then_reuses(tmp_path) -> None:
    """`downscale specialize CONFIG --cache-only` builds every shard's teacher cache (the parallel cache pass);
    training afterwards opens them instead of building again."""
    from downscale import cli

    spec = {**SPECIALIZE, "teacher": "cache", "cache_top_k": 8, "train": {**SPECIALIZE["train"], "max_steps": 2}}
    cfg = _pruned_run(tmp_path, specialize=spec)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(cfg.to_yaml())
    assert cli.main(["specialize", str(cfg_file), "--cache-only"]) == 0
    root = cfg.run_dir / "work" / "teacher_cache"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["code", "legal", "prose"]
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.npy")}
    logs: list[str] = []
    pipeline.run_stage(cfg, "specialize", part=1, log=logs.append)
    assert not any("building the teacher cache" in m for m in logs), logs
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.npy")} == stamp
    assert not (cfg.run_dir / "specialized" / "0").exists()  # the cache pass trains nothing
    # online teacher: --cache-only is a clear error
    cfg_file.write_text(cfg.to_yaml().replace("teacher: cache", "teacher: online"))
    assert cli.main(["specialize", str(cfg_file), "--cache-only"]) == 2


def test_tensorboard_tracker_of_a_student(tmp_path) -> None:
    """specialize.train.report_to: tensorboard gives each student a named run with its training metrics."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = {**SPECIALIZE, "train": {**SPECIALIZE["train"], "max_steps": 4, "report_to": "tensorboard"}}
    cfg = _pruned_run(tmp_path, specialize=spec)
    pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    run = cfg.run_dir / "work" / "specialize" / "student-0" / f"{cfg.run.name}-student-0"
    events = list(run.rglob("events.out.tfevents.*"))
    assert events, f"no tensorboard event file under {run}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == [2, 4], tags
    assert "kd" in tags and "ce" in tags, tags


def test_compiled_training_matches_eager(tmp_path, monkeypatch) -> None:
    """specialize.compile: the student's and the online teacher's decoders run through torch.compile (a
    recording backend that runs dynamo's captured graphs as they are, so the numbers must equal the eager run);
    the saved student has the plain HF weight names."""
    from downscale import models

    graphs: list[int] = []

    def recording_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    cfg = _pruned_run(tmp_path)
    pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    eager = _weights(cfg.run_dir / "specialized" / "0")
    monkeypatch.setattr(models, "COMPILE_BACKEND", recording_backend)
    cfg.specialize.compile = True  # speed only: neither the finished student nor its checkpoints are stale
    pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    out = cfg.run_dir / "specialized" / "0"
    assert json.loads((out / "train_summary.json").read_text())["compiled"] is False and not graphs
    shutil.rmtree(out)  # trained again, compiled, from the start
    shutil.rmtree(cfg.run_dir / "work" / "specialize" / "student-0")
    pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    assert json.loads((out / "train_summary.json").read_text())["compiled"] is True
    assert len(graphs) >= 2 and min(graphs) > 20  # at least the student's and the teacher's decoder graphs
    weights = _weights(out)
    assert weights.keys() == eager.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, eager[name], atol=1e-5, rtol=1e-4)


def test_compile_without_a_cxx_compiler_is_one_line(tmp_path, monkeypatch) -> None:
    from downscale import models

    cfg = _pruned_run(tmp_path)
    cfg.specialize.compile = True
    monkeypatch.setattr(models.shutil, "which", lambda name: None)
    with pytest.raises(StageError, match=r"specialize\.compile: torch\.compile on the CPU needs a C\+\+") as info:
        pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    assert "\n" not in str(info.value)
    assert not (cfg.run_dir / "specialized" / "0").exists()
