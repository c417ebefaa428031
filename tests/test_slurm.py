"""The SLURM path on a real single-node SLURM (slurmctld + slurmd + munged on localhost; tests/slurm_cluster.py):
scripts/slurm_pipeline.sh submits prepare -> a job array of students -> combine+evaluate, and the results equal
those of `downscale run` with the same config. A student task cancelled mid-training fails the pipeline (its
combine job never runs; the script says which task and how to resubmit) and resumes from its checkpoint when
resubmitted; a task requeued with `scontrol requeue` (SIGTERM) checkpoints the step it is in and resumes from it;
a task sent the time-limit warning (SIGUSR1 to its batch script) checkpoints, requeues itself and resumes.

Skipped, with the reason, where SLURM is not installed or the tests do not run as root (.ci/run installs
slurm-wlm and munge, so CI always runs them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import Cluster, why_not

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "scripts" / "slurm_pipeline.sh"
DOWNSCALE = str(Path(sys.executable).with_name("downscale"))
# sbatch options for a 2-CPU node without GPUs (they override the scripts' GPU-cluster #SBATCH lines)
SBATCH_ARGS = "--gres=none --mem=2G --cpus-per-task=1 --time=30:00"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(why_not() is not None, reason=str(why_not()))]

# three tiny students whose training lasts long enough (~10 s) to be cancelled or requeued in the middle; one
# thread everywhere so that a resumed run equals an uninterrupted one bit for bit
CONFIG = {
    "run": {"name": "slurm", "seed": 0, "device": "cpu", "precision": "fp32", "threads": 1},
    "data": {"sources": [{"name": "code", "kind": "builtin", "builtin": "python_code", "max_documents": 150},
                         {"name": "docs", "kind": "builtin", "builtin": "english_docs", "max_documents": 150},
                         {"name": "legal", "kind": "builtin", "builtin": "legal", "max_documents": 150}],
             "tokenizer": {"kind": "bpe", "vocab_size": 512}, "block_size": 64, "val_fraction": 0.1,
             "test_fraction": 0.1, "max_tokens_per_shard": 30000,
             "max_eval_tokens_per_shard": 1024},
    "base": {"init": {"hidden_size": 96, "intermediate_size": 192, "num_layers": 2, "num_heads": 4,
                      "num_kv_heads": 2},
             "train": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 30,
                       "eval_batches": 1, "save_every": 30, "log_every": 10}},
    "compress": {"target_params": 0.6, "calibration_sequences": 8, "val_blocks": 2, "search": {"enabled": False}},
    "specialize": {"train": {"max_steps": 240, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 240,
                             "eval_batches": 1, "save_every": 20, "log_every": 40}},
    "combine": {"modes": ["logit_mean", "routed", "sparse"], "prior_blocks": 2},
    "evaluate": {"control": False, "batch_size": 4, "max_test_tokens_per_shard": 512},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "exp.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> dict:
    """The same experiment with `downscale run` (no SLURM): its results.json."""
    run = tmp_path_factory.mktemp("direct") / "run"
    env = {**os.environ, "DOWNSCALE_NO_PROGRESS": "1"}
    subprocess.run([DOWNSCALE, "run", str(config), f"run.dir={run}"], check=True, env=env, capture_output=True,
                   timeout=900)
    return json.loads((run / "eval" / "results.json").read_text())


def _submit(cluster, config, run: Path, wait: bool = True, **kw):
    env = {**cluster.env, "SBATCH_ARGS": SBATCH_ARGS, "DOWNSCALE": DOWNSCALE, "POLL": "1",
           "DOWNSCALE_NO_PROGRESS": "1"}
    argv = ["bash", str(PIPELINE), *(["--wait"] if wait else []), str(config), f"run.dir={run}"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _losses(results: dict) -> dict:
    return {r["name"]: r["loss"] for r in results["rows"]}


def _jobs(stdout: str) -> tuple[str, str, str]:
    m = re.search(r"submitted: prepare (\d+) -> students (\d+) .* -> combine\+evaluate (\d+)", stdout)
    assert m, stdout
    return m.group(1), m.group(2), m.group(3)


def test_the_pipeline_on_slurm_equals_downscale_run(cluster, config, reference, tmp_path):
    run = tmp_path / "run"
    proc = _submit(cluster, config, run)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, (out, err)
    prep, students, final = _jobs(out)
    states = cluster.job_states(students)
    assert states == {f"{students}_{i}": "COMPLETED" for i in range(3)}, states
    assert cluster.job_states(prep) == {prep: "COMPLETED"} and cluster.job_states(final) == {final: "COMPLETED"}
    # the same numbers as `downscale run`
    results = json.loads((run / "eval" / "results.json").read_text())
    assert _losses(results) == _losses(reference)
    # the dependency chain held: combine started after every student ended; each task trained its own student
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    parts = manifest["specialize"]["parts"]
    assert sorted(parts) == ["0", "1", "2"] and all(p["status"] == "complete" for p in parts.values())
    assert manifest["combine"]["started"] >= max(p["ended"] for p in parts.values())
    assert manifest["specialize"]["started"] >= manifest["compress"]["ended"]
    for i, shard in enumerate(["code", "docs", "legal"]):
        log = (run / "logs" / "slurm" / f"student-{students}_{i}.out").read_text()
        assert f"[specialize] student {i} ({shard}) after: CE" in log, log[-2000:]


def _wait_for_checkpoint(run: Path, student: int, timeout: float = 600) -> None:
    ckpts = run / "work" / "specialize" / f"student-{student}" / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of student {student} in {timeout}s")


def test_a_cancelled_task_fails_the_pipeline_and_a_requeued_task_resumes_then_resubmission_completes(
        cluster, config, reference, tmp_path):
    run = tmp_path / "run"
    proc = _submit(cluster, config, run)
    # student 0: requeued in the middle (SIGTERM: it checkpoints the step it is in, SLURM starts it again);
    # student 1: cancelled in the middle
    _wait_for_checkpoint(run, 0)
    cluster.scontrol("requeue", _first_task(cluster, 0))
    _wait_for_checkpoint(run, 1)
    subprocess.run(["scancel", _first_task(cluster, 1)], env=cluster.env, check=True)
    # student 2: the time-limit warning (--signal=B:USR1@300) sent now to its batch script: the training checkpoints,
    # and the script requeues the task itself
    _wait_for_checkpoint(run, 2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", _first_task(cluster, 2)], env=cluster.env, check=True)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 1, (out, err)
    prep, students, final = _jobs(out)
    assert f"student task 1 (job {students}_1) ended CANCELLED" in err, err
    assert "resubmit" in err and str(PIPELINE) in err
    assert cluster.job_states(final)[final] == "CANCELLED"  # afterok never satisfied: combine did not run
    assert not (run / "ensemble").exists() and not (run / "eval").exists()
    log0 = (run / "logs" / "slurm" / f"student-{students}_0.out").read_text()
    assert "SIGTERM received: stopped after step" in log0, log0[-3000:]
    stopped = int(re.search(r"stopped after step (\d+)", log0).group(1))
    assert f"resuming from checkpoint at step {stopped}" in log0, log0[-3000:]
    assert cluster.job_states(students)[f"{students}_0"] == "COMPLETED"
    log2 = (run / "logs" / "slurm" / f"student-{students}_2.out").read_text()
    assert "SIGUSR1 received: stopped after step" in log2 and "time limit near: student 2 checkpointed" in log2, \
        log2[-3000:]
    stopped = int(re.search(r"stopped after step (\d+)", log2).group(1))
    assert f"resuming from checkpoint at step {stopped}" in log2, log2[-3000:]
    assert cluster.job_states(students)[f"{students}_2"] == "COMPLETED"
    # resubmitted as the script says: that student alone (it resumes from its checkpoint), then combine+evaluate
    line = next(x for x in err.splitlines() if x.startswith("resubmit that student"))
    command = line.split("with: ", 1)[1]
    assert "scripts/slurm_specialize.sbatch" in command and "scripts/slurm_stage.sbatch run" in command, command
    env = {**cluster.env, "DOWNSCALE": DOWNSCALE, "DOWNSCALE_NO_PROGRESS": "1"}
    sub = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, check=True)
    final2 = re.search(r"Submitted batch job (\d+)", sub.stdout).group(1)
    deadline = time.time() + 900
    while cluster.job_states(final2).get(final2) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline, cluster.job_states(final2)
        time.sleep(1)
    assert cluster.job_states(final2)[final2] == "COMPLETED", (run / "logs" / "slurm" / f"final-{final2}.out")
    logs1 = [p for p in (run / "logs" / "slurm").glob("student-*_1.out") if p.name != f"student-{students}_1.out"]
    assert len(logs1) == 1, logs1
    assert re.search(r"resuming from checkpoint at step [1-9]\d*", logs1[0].read_text()), logs1[0].read_text()[-3000:]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert _losses(results) == _losses(reference)


def _first_task(cluster, student: int) -> str:
    """The job id of the running array task that trains ``student`` (from the pipeline's array)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %t"], capture_output=True, text=True, env=cluster.env,
                         check=True).stdout
    for line in out.splitlines():
        job, state = line.split()
        if job.endswith(f"_{student}") and state == "R":
            return job
    raise AssertionError(f"student {student} is not running: {out}")
