"""Scale-out through the command line: scripts/launch_students.sh runs data -> compress once, the students
as parallel jobs (two at a time here; one per GPU on a GPU node), then combine -> evaluate. The parallel
jobs share the run directory and its manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from downscale import pipeline
from downscale.config import load_config
from tiny import domain_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_launch_students_runs_the_pipeline_with_parallel_students(tmp_path) -> None:
    sources = []
    for i, domain in enumerate(("code", "legal", "prose")):
        docs = domain_text(domain, 60, words_per_doc=40, seed=i)
        (tmp_path / f"{domain}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        sources.append({"name": domain, "kind": "local", "paths": [str(tmp_path / f"{domain}.jsonl")]})
    tiny_train = {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 4, "eval_batches": 1,
                  "save_every": 4, "log_every": 2}
    tree = {
        "run": {"name": "scale", "dir": str(tmp_path / "run"), "seed": 0, "precision": "fp32", "threads": 1},
        "data": {"sources": sources, "block_size": 32, "val_fraction": 0.1, "test_fraction": 0.1,
                 "tokenizer": {"vocab_size": 300, "min_frequency": 1}},
        "base": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                          "num_kv_heads": 2}, "train": {**tiny_train, "max_steps": 10}},
        "compress": {"target_params": 0.7, "importance": "magnitude", "calibration_sequences": 4, "val_blocks": 2},
        "specialize": {"train": tiny_train},
        "evaluate": {"control": False},
    }
    cfg_file = tmp_path / "scale.yaml"
    cfg_file.write_text("# test\n" + yaml.safe_dump(tree))
    env = {**os.environ, "GPUS": "2", "DOWNSCALE": f"{sys.executable} -m downscale.cli", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "launch_students.sh"), str(cfg_file)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    run = tmp_path / "run"
    assert "student 2 on GPU 0" in res.stdout and "student 1 on GPU 1" in res.stdout
    for i in range(3):
        assert (run / "logs" / f"specialize-{i}.log").exists()
        assert (run / "specialized" / str(i) / "model.safetensors").exists()
    manifest = pipeline.load_manifest(run)
    stages = manifest["stages"]
    assert all(stages[s]["status"] == "complete" for s in pipeline.STAGE_NAMES), {k: v["status"] for k, v in
                                                                                   stages.items()}
    assert sorted(stages["specialize"]["parts"]) == ["0", "1", "2"]
    assert (run / "eval" / "report.md").exists()
    # everything is complete: the same command again skips every stage
    cfg = load_config(cfg_file)
    assert all(pipeline.stage_status(cfg, pipeline.get_stage(s))[0] == "complete" for s in pipeline.STAGE_NAMES)
