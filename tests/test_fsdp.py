"""FSDP2 on a CPU (gloo, 2 processes; tests/fsdp_on_cpu.py shards as accelerate's FSDP2 path does on GPUs):
checkpoints gather the shards and resume into them, the trained weights come back whole, and a sharded run
matches a 1-process run with the same global batch, for train.fit and for the specialize stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from downscale import pipeline, train
from test_specialize import SPECIALIZE, _pruned_run, _weights
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _launch(args: list[str], port: int, **env_extra: str) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port), **env_extra}
    return subprocess.run([str(launcher if launcher.exists() else "accelerate"), "launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / "cpu_ddp_2proc.yaml"), "--main_process_port",
                           str(port), str(ROOT / "tests" / "fsdp_on_cpu.py"), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_sharded_fit_killed_resumes_and_matches_one_process(tmp_path) -> None:
    from fsdp_on_cpu import fit_config

    out = tmp_path / "fsdp"
    out.mkdir()
    res = _launch(["fit", str(out), "3"], 29741)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "resumed_from.txt").read_text() == "2"  # killed after step 3, resumed from the step-2 checkpoint
    assert (out / "digest-0.txt").read_text() == (out / "digest-1.txt").read_text()  # every rank got the weights
    sharded = load_file(str(out / "weights.safetensors"))
    # the checkpoint holds full tensors by parameter name, not shards
    ckpt = train.list_checkpoints(out / "checkpoints")[-1]
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    assert opt["exp_avg/model.layers.0.mlp.up_proj.weight"].shape == (64, 32)

    model = tiny_model("llama", seed=1, vocab_size=128).train()
    blocks = np.random.default_rng(0).integers(1, 128, (32, 16))
    acc = train.make_accelerator(torch.device("cpu"), None)
    train.fit(model, cfg=fit_config(batch_size=4), sampler=train.BlockSampler([blocks], 4, seed=0),
              loss_fn=train.causal_lm_loss, work_dir=tmp_path / "one", accelerator=acc, log=lambda m: None)
    ref = {k: v.detach() for k, v in model.state_dict().items()}
    assert sharded.keys() == ref.keys()
    worst = max(float((sharded[k] - ref[k]).abs().max()) for k in ref)
    moved = max(float((ref[k] - tiny_model("llama", seed=1, vocab_size=128).state_dict()[k]).abs().max())
                for k in ref)
    assert worst < 1e-5 and moved > 1000 * worst, (worst, moved)


@pytest.mark.parametrize("variant", ["full", "compile", "lora"])
def test_sharded_specialize_matches_one_process(tmp_path, variant) -> None:
    """The stage under FSDP: validation through the sharded wrapper, the student saved whole, equal to 1 process;
    also with specialize.compile (AOTAutograd through the sharded layers, eager kernels: the same numbers) and
    with LoRA (frozen and trainable weights in one shard group; adapters merged after gathering)."""
    compiled = variant == "compile"
    extra = {"compile": compiled} | ({"lora": True, "lora_rank": 4} if variant == "lora" else {})
    spec = {**SPECIALIZE, **extra,
            "train": {**SPECIALIZE["train"], "max_steps": 6, "batch_size": 2, "eval_every": 3}}
    one = {**SPECIALIZE, **{k: v for k, v in extra.items() if k != "compile"},
           "train": {**SPECIALIZE["train"], "max_steps": 6, "batch_size": 2, "grad_accum": 2, "eval_every": 3}}
    fsdp_cfg = _pruned_run(tmp_path / "fsdp", specialize=spec)
    ref_cfg = _pruned_run(tmp_path / "one", specialize=one)
    pipeline.run_stage(ref_cfg, "specialize", part=0, log=lambda m: None)
    cfg_file = tmp_path / "fsdp.yaml"
    cfg_file.write_text(fsdp_cfg.to_yaml())
    res = _launch(["specialize", str(cfg_file), "--student", "0"], 29750 + ["full", "compile", "lora"].index(variant),
                  DOWNSCALE_COMPILE_BACKEND="aot_eager")
    assert res.returncode == 0, res.stderr[-3000:]
    out = fsdp_cfg.run_dir / "specialized" / "0"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["compiled"] is compiled and summary["lora"] is (variant == "lora")
    assert len(summary["rank_weight_digests"]) == 2 and len(set(summary["rank_weight_digests"])) == 1
    ref_summary = json.loads((ref_cfg.run_dir / "specialized" / "0" / "train_summary.json").read_text())
    shard = summary["shard"]
    assert abs(summary["after"][shard]["kl"] - ref_summary["after"][shard]["kl"]) < 1e-4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if f"val/kl/{shard}" in m]
    assert [m["step"] for m in val] == [3, 6]  # validation ran sharded, through the wrapper
    fsdp, ref = _weights(out), _weights(ref_cfg.run_dir / "specialized" / "0")
    assert fsdp.keys() == ref.keys()
    worst = max(float((fsdp[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-4, worst


def test_sharded_base_pretraining_matches_one_process(tmp_path) -> None:
    """The base stage under FSDP (the root is the HF model itself): sharded validation, the base gathered whole
    and saved, equal to a 1-process run with the same global batch."""
    from tiny import fake_data_run

    base = {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                     "num_kv_heads": 2},
            "train": {"max_steps": 6, "batch_size": 2, "lr": 5e-3, "warmup_steps": 1, "eval_every": 3,
                      "eval_batches": 1, "save_every": 2, "log_every": 1}}
    fsdp_cfg = fake_data_run(tmp_path / "fsdp", base=base)
    ref_cfg = fake_data_run(tmp_path / "one", base={**base, "train": {**base["train"], "grad_accum": 2}})
    pipeline.run_stage(ref_cfg, "base", log=lambda m: None)
    cfg_file = tmp_path / "fsdp.yaml"
    cfg_file.write_text(fsdp_cfg.to_yaml())
    res = _launch(["base", str(cfg_file)], 29745)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((fsdp_cfg.run_dir / "base" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    metrics = [json.loads(line) for line in (fsdp_cfg.run_dir / "base" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics if any(k.startswith("val/") for k in m)] == [3, 6]
    fsdp, ref = _weights(fsdp_cfg.run_dir / "base"), _weights(ref_cfg.run_dir / "base")
    assert fsdp.keys() == ref.keys()
    worst = max(float((fsdp[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-5, worst


def test_sharded_evaluate_trains_and_saves_the_control(tmp_path) -> None:
    """The evaluate stage launched on 2 processes under FSDP: the compute-matched control trains sharded, is
    gathered whole, scored and saved as a plain model; every other row is scored as in one process."""
    from test_evaluate import SECTIONS
    from tiny import fake_data_run

    cfg = fake_data_run(tmp_path, **SECTIONS)
    pipeline.run_all(cfg, stages=("data", "base", "compress", "specialize", "combine"), log=lambda m: None)
    cfg_file = tmp_path / "fsdp.yaml"
    cfg_file.write_text(cfg.to_yaml())
    res = _launch(["evaluate", str(cfg_file)], 29746)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["kind"]: r for r in json.loads((cfg.run_dir / "eval" / "results.json").read_text())["rows"]}
    assert rows["control"]["loss"]["pooled"] < rows["base"]["loss"]["pooled"]  # it trained on more tokens
    control = _weights(cfg.run_dir / "eval" / "control")
    base = _weights(cfg.run_dir / "base")
    assert control.keys() == base.keys() and all(v.dtype == torch.float32 for v in control.values())
    assert max(float((control[k] - base[k]).abs().max()) for k in base) > 1e-3
    assert not list(cfg.run_dir.glob(".staging/*"))  # the workers' staging folders are gone
