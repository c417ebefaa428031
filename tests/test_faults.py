"""Fault injection on a real tiny run: a garbled or truncated artifact for every stage's inputs is refused (one line
naming the file and the stage that writes it again, exit 2, nothing of the refusing stage touched); ``kill -9`` and
Ctrl-C in every training stage resume to exactly the weights of an uninterrupted run; two processes on one student:
the second exits 2 saying who holds it, and a dead holder's lock is taken over; ``downscale status`` tells a dead
attempt from a running one; staging left by a killed process is swept."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from downscale import cli, integrity, locks, pipeline
from downscale._io import dir_fingerprint
from downscale.config import load_config
from tiny import fake_data_run

pytestmark = pytest.mark.usefixtures("one_thread")

SHARDS = ("code", "legal")
# long enough trainings that a process can be killed in the middle (tiny steps take milliseconds), one thread
# everywhere (in this process and in the children) so that the killed-and-resumed runs can equal this one bit
# for bit, checkpoints every 10 steps.
SECTIONS = {
    "run": {"threads": 1},
    "base": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
             "train": {"max_steps": 120, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 60,
                       "eval_batches": 1, "save_every": 10, "log_every": 20}},
    "compress": {"target_params": 0.6, "importance": "activation", "calibration_sequences": 8, "val_blocks": 4,
                 "search": {"enabled": False}},
    "specialize": {"train": {"max_steps": 100, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 50,
                             "eval_batches": 1, "save_every": 10, "log_every": 20}},
    "combine": {"prior_blocks": 2},
    "evaluate": {"control": True, "batch_size": 4, "max_test_tokens_per_shard": 256},
}


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    """A complete tiny run (every stage, the control included): the reference the faulted copies are compared
    with. Returns its folder."""
    root = tmp_path_factory.mktemp("faults")
    torch.set_num_threads(1)
    cfg = fake_data_run(root, n_docs=30, shards=SHARDS, **{k: v for k, v in SECTIONS.items() if k != "run"},
                        run={"name": "tiny", "dir": str(root / "run"), "seed": 0, "precision": "fp32", "threads": 1})
    pipeline.run_all(cfg, log=lambda m: None)
    return cfg.run_dir


def _copy(done: Path, tmp_path: Path) -> Path:
    """A copy of the complete run (modification times kept, as a user's copy with ``cp -a``) and its config file."""
    run = tmp_path / "run"
    shutil.copytree(done, run, symlinks=True)
    tree = yaml.safe_load((done / "config.yaml").read_text())
    tree["run"]["dir"] = str(run)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config


def _cli(capfd, *argv) -> tuple[int, str, list[str]]:
    capfd.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capfd.readouterr().err
    return rc, err, [line for line in err.splitlines() if line.startswith("downscale:")]


def _cli_out(capfd, *argv) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = cli.main([str(a) for a in argv])
    out = capfd.readouterr()
    return rc, out.out, out.err


def _stage_state(run: Path, stage: str) -> tuple[dict, dict]:
    """(the stage's manifest entry, the fingerprints of its outputs now)."""
    entry = pipeline.load_manifest(run)["stages"][stage]
    outputs = {o: dir_fingerprint(run / o) for o in pipeline.get_stage(stage).outputs if (run / o).exists()}
    return entry, outputs


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    """Same size, 64 bytes in the middle set to 0xff (NaN in any float format, token ids past any vocabulary)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


# (the stage that runs, the file it reads, the stage that wrote it)
READS = [
    ("base", "data/code/train.bin", "data"),
    ("compress", "base/model.safetensors", "base"),
    ("compress", "data/legal/val.bin", "data"),
    ("specialize", "students/0/model.safetensors", "compress"),
    ("specialize", "data/code/train.bin", "data"),
    ("specialize", "base/model.safetensors", "base"),
    ("combine", "specialized/1/model.safetensors", "specialize"),
    ("combine", "students/compress.json", None),  # a report combine does not read: not refused
    ("evaluate", "ensemble/ensemble.json", "combine"),
    ("evaluate", "specialized/0/model.safetensors", "specialize"),
    ("evaluate", "tokenizer/tokenizer.json", "data"),
]


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
@pytest.mark.parametrize(("stage", "rel", "writer"), READS, ids=[f"{s}-reads-{r}" for s, r, _ in READS])
def test_a_changed_input_is_refused_and_nothing_is_touched(done_run, tmp_path, capfd, stage, rel, writer,
                                                           damage) -> None:
    config = _copy(done_run, tmp_path)
    run = tmp_path / "run"
    if writer is None:  # a report: the stage runs (forced), whatever happened to the file
        damage(run / rel)
        rc, err, lines = _cli(capfd, stage, config, "--force")
        assert rc == 0, err
        return
    before = _stage_state(run, stage)
    damage(run / rel)
    rc, err, lines = _cli(capfd, stage, config, "--force")
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert str(run / rel) in lines[0] and f"`downscale {writer}`" in lines[0], lines[0]
    assert ("truncated" in lines[0]) == (damage is _truncate), lines[0]
    assert _stage_state(run, stage) == before  # the refusing stage wrote nothing, not even its manifest entry
    assert not any((run / ".staging").glob("*")) if (run / ".staging").exists() else True


def test_without_force_the_skip_says_an_input_changed_and_run_rewrites_only_it(done_run, tmp_path, capfd) -> None:
    config = _copy(done_run, tmp_path)
    run = tmp_path / "run"
    student = run / "students" / "0" / "model.safetensors"
    good = student.read_bytes()
    _garble(student)
    rc, err, _ = _cli(capfd, "specialize", config)
    assert rc == 0
    assert "complete, skipped" in err and f"note: {student}" in err and "`downscale compress`" in err, err
    cfg = load_config(config, [], check_paths=False)
    rows = pipeline.plan(cfg)
    assert rows["compress"][0] == "stale" and "changed on disk" in rows["compress"][1]
    # compress re-runs; evaluate, which reads its report (timings), too; the rewritten student is the same, so the
    # stages that read only the students (specialize, combine) do not
    assert {k for k, (s, _) in rows.items() if s != "complete"} == {"compress", "evaluate"}
    logs: list[str] = []
    pipeline.run_all(cfg, log=logs.append)
    ran = [m[1:m.index("]")] for m in logs if "] running (" in m]
    assert ran == ["compress", "evaluate"], logs
    assert student.read_bytes() == good


def test_loaders_refuse_what_the_manifest_does_not_cover(done_run, tmp_path) -> None:
    """A model folder or ensemble loaded outside the pipeline: NaN weights, a truncated file, a student changed
    since the ensemble was made, are one-line errors."""
    from downscale import models
    from downscale.ensemble import EnsembleError
    from downscale.ensemble_io import load_ensemble

    _copy(done_run, tmp_path)
    run = tmp_path / "run"
    student = run / "specialized" / "1"
    with pytest.raises(EnsembleError, match=r"students\[1\].*changed since the ensemble was made"):
        _garble(student / "model.safetensors")
        load_ensemble(run / "ensemble")
    with pytest.raises(integrity.CorruptArtifact, match="NaN or inf"):
        models.load_causal_lm(student)
    with pytest.raises(integrity.CorruptArtifact, match="NaN or inf"):  # the opt-out still loads no NaN
        load_ensemble(run / "ensemble", verify=False)
    _truncate(student / "model.safetensors")
    with pytest.raises(integrity.CorruptArtifact, match="truncated or garbled"):
        models.load_causal_lm(student)


# --------------------------------------------------------------------------- two processes, dead holders


HOLD = """
import sys, time
from pathlib import Path
from downscale import locks
with locks.hold(Path(sys.argv[1]), exclusive=sys.argv[2].split(",") if sys.argv[2] else [],
                shared=sys.argv[3].split(",") if sys.argv[3] else [], what="test"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(run: Path, exclusive: str, shared: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run), exclusive, shared], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_student_is_one_line_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
        done_run, tmp_path, capfd) -> None:
    config = _copy(done_run, tmp_path)
    run = tmp_path / "run"
    proc = _holder(run, "specialize.part0", "data,base,compress,specialize")  # as `specialize --student 0` does
    try:
        rc, err, lines = _cli(capfd, "specialize", config, "--student", "0", "--force")
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "student 0 of stage specialize" in lines[0] and f"pid {proc.pid}" in lines[0], lines[0]
        # the whole stage waits for none of its students: refused too, as is rewriting what the student reads
        rc, err, lines = _cli(capfd, "specialize", config, "--force")
        assert rc == 2 and "stage specialize is in use by student 0 of stage specialize: pid" in lines[0], err
        rc, err, lines = _cli(capfd, "compress", config, "--force")
        assert rc == 2 and "stage compress is in use" in lines[0], err
        # another student runs meanwhile
        rc, err, _ = _cli(capfd, "specialize", config, "--student", "1", "--force")
        assert rc == 0, err
    finally:
        proc.kill()
        proc.wait()
    assert locks.holder(run, "specialize.part0") is None  # the kernel dropped the dead process's lock
    rc, err, _ = _cli(capfd, "specialize", config, "--student", "0", "--force")
    assert rc == 0, err


# The CLI in a child process whose every checkpoint save is followed by 0.2 s of sleep: on a quiet machine a tiny
# training finishes in under a second, so a signal sent once two checkpoints exist would otherwise land after the
# end. Sleeping changes no number. SIGINT gets Python's handler back: started from a non-interactive shell's
# background job (as CI may be), a process inherits SIGINT ignored, and Python then leaves it ignored.
SLOW_SAVES = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background job ignores Ctrl-C
from downscale import cli, train
save = train.save_checkpoint
def slow(*args, **kwargs):
    out = save(*args, **kwargs)
    time.sleep(0.2)
    return out
train.save_checkpoint = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def _child(config: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVES, *argv[:1], str(config), *argv[1:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(check, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended first (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def _checkpoints(work: Path) -> list[Path]:
    return sorted(work.rglob("checkpoints/step-*"))


# (stage, command line after the config, its checkpoint folder, how to read the weights or numbers it made)
TRAININGS = {
    "base": (["base", "--force"], "work/base"),
    "specialize": (["specialize", "--student", "0"], "work/specialize/student-0"),  # after _forget_student_0
    "control": (["evaluate", "--force"], "work/evaluate/control"),
}


def _made(run: Path, what: str):
    if what == "base":
        return load_file(run / "base" / "model.safetensors")
    if what == "specialize":
        return load_file(run / "specialized" / "0" / "model.safetensors")
    return load_file(run / "eval" / "control" / "model.safetensors")


def _forget_student_0(run: Path) -> None:
    """Student 0 as if never trained (its folder and its record gone): `specialize --student 0` trains it."""
    shutil.rmtree(run / "specialized" / "0")
    manifest = pipeline.load_manifest(run)
    del manifest["stages"]["specialize"]["parts"]["0"]
    pipeline._save_manifest(run, manifest)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
@pytest.mark.parametrize("what", list(TRAININGS))
def test_a_killed_training_resumes_to_the_uninterrupted_result(done_run, tmp_path, capfd, what, sig) -> None:
    config = _copy(done_run, tmp_path)
    run = tmp_path / "run"
    argv, work = TRAININGS[what]
    reference = _made(done_run, what)
    assert reference
    pipeline.discard_checkpoints(run / work)  # the copy's own: the ones waited for are the child's
    if what == "specialize":
        _forget_student_0(run)
    proc = _child(config, *argv)
    stage = argv[0]
    _wait_for(lambda: len(_checkpoints(run / work)) >= 2, proc)  # killed past its second checkpoint
    proc.send_signal(sig)
    proc.wait(timeout=120)
    err = proc.stderr.read()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert "interrupted" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    cfg = load_config(config, [], check_paths=False)
    status, why = pipeline.stage_status(cfg, pipeline.get_stage(stage))
    assert status != "complete"
    if sig == signal.SIGKILL and stage != "specialize":
        assert "died" in why, why  # recorded as running, but nobody holds its lock
    if stage == "specialize":
        assert pipeline.part_entry(run, "specialize", "0")["status"] == (
            "running" if sig == signal.SIGKILL else "failed")
    # resume, as a user would: the same command without --force
    rc, err, _ = _cli(capfd, *[a for a in argv if a != "--force"][:1], config,
                      *[a for a in argv[1:] if a != "--force"])
    assert rc == 0, err
    assert "resuming from checkpoint" in err, err[-3000:]
    if sig == signal.SIGKILL and stage != "specialize":  # the run says why it runs: the dead attempt, not itself
        assert f"[{stage}] running (last attempt died" in err, err[-3000:]
    made = _made(run, what)
    assert made.keys() == reference.keys()
    assert all(torch.equal(made[k], reference[k]) for k in reference)
    assert not (run / ".staging").exists() or not any((run / ".staging").iterdir())


def test_two_real_processes_on_one_student(done_run, tmp_path, capfd) -> None:
    """Two `downscale specialize --student 0` at once: the second exits 2 naming the first; the first is not
    disturbed; status says which student is running meanwhile."""
    config = _copy(done_run, tmp_path)
    run = tmp_path / "run"
    pipeline.discard_checkpoints(run / "work/specialize/student-0")
    first = _child(config, "specialize", "--student", "0", "--force")
    _wait_for(lambda: len(_checkpoints(run / "work/specialize/student-0")) >= 1, first)
    first.send_signal(signal.SIGSTOP)  # frozen while it holds the student: the test does not race its training
    try:
        second = _child(config, "specialize", "--student", "0", "--force")
        second.wait(timeout=120)
        err = second.stderr.read()
        lines = [line for line in err.splitlines() if line.startswith("downscale:")]
        assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert f"pid {first.pid}" in lines[0] and "student 0 of stage specialize" in lines[0], lines[0]
        rc, out, _ = _cli_out(capfd, "status", config)
        assert f"running now: student 0 of stage specialize (pid {first.pid}" in out, out
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()[-2000:]
    made = load_file(run / "specialized" / "0" / "model.safetensors")
    reference = load_file(done_run / "specialized" / "0" / "model.safetensors")
    assert all(torch.equal(made[k], reference[k]) for k in reference)


def test_staging_of_a_dead_process_is_swept(done_run, tmp_path, capfd) -> None:
    config = _copy(done_run, tmp_path)
    run = tmp_path / "run"
    for name in ("specialize.part1.12345", "specialize.part0", "compress", "base.rank1"):
        (run / ".staging" / name / "x").mkdir(parents=True)
    proc = _holder(run, "specialize.part0", "")
    try:
        rc, err, _ = _cli(capfd, "combine", config, "--force")
        assert rc == 2, err  # combine reads student 0, which is held
        rc, err, _ = _cli(capfd, "specialize", config, "--student", "1", "--force")
        assert rc == 0, err
        left = sorted(p.name for p in (run / ".staging").iterdir())
        assert left == ["specialize.part0"], left  # a live holder's staging is kept, the dead ones' are gone
    finally:
        proc.kill()
        proc.wait()
    rc, err, _ = _cli(capfd, "specialize", config, "--student", "1", "--force")
    assert rc == 0, err
    assert sorted(p.name for p in (run / ".staging").iterdir()) == []


def test_an_interrupted_compress_runs_again_to_the_same_students(done_run, tmp_path, capfd, monkeypatch) -> None:
    """compress keeps no training checkpoints (its recovery between rounds is a few steps); interrupted at its
    second recovery (Ctrl-C), it is recorded as interrupted and the same command makes exactly the students
    an uninterrupted run makes, from its cached importance scores."""
    from downscale.stages import specialize

    two_rounds = ["compress.recover_steps=2", "compress.max_cut_per_round=0.25"]
    reference_cfg = _copy(done_run, tmp_path / "reference")
    rc, err, _ = _cli(capfd, "compress", reference_cfg, *two_rounds)
    assert rc == 0, err
    config = _copy(done_run, tmp_path / "faulted")
    real = specialize.distillation_recovery

    calls = []

    def interrupted_at_the_second_recovery(*args, **kwargs):
        recover = real(*args, **kwargs)

        def hook(model, round_index, student_index):
            calls.append((round_index, student_index))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return recover(model, round_index, student_index)
        return hook

    monkeypatch.setattr(specialize, "distillation_recovery", interrupted_at_the_second_recovery)
    rc, err, _ = _cli(capfd, "compress", config, *two_rounds)
    assert rc == 130 and "Traceback" not in err and len(calls) == 2, err
    run = tmp_path / "faulted" / "run"
    assert pipeline.load_manifest(run)["stages"]["compress"]["status"] == "interrupted"
    monkeypatch.setattr(specialize, "distillation_recovery", real)
    rc, err, _ = _cli(capfd, "compress", config, *two_rounds)
    assert rc == 0, err
    for i in range(len(SHARDS)):
        made = load_file(run / "students" / str(i) / "model.safetensors")
        reference = load_file(tmp_path / "reference" / "run" / "students" / str(i) / "model.safetensors")
        assert made.keys() == reference.keys() and all(torch.equal(made[k], reference[k]) for k in reference)


def test_a_rank_of_another_launch_touches_nothing_until_its_own_rank_0_holds_the_lock(done_run, tmp_path, capfd,
                                                                                     monkeypatch) -> None:
    """Under torchrun / accelerate, ranks > 0 wait for rank 0 of their own launch to hold the stage's lock before
    they discard checkpoints (``--force``) or write staging: a second launch's rank 1 leaves a running launch's
    checkpoints alone and gives up with one line; with its own rank 0 holding the lock it goes on."""
    config = _copy(done_run, tmp_path)
    run = tmp_path / "run"
    cfg = load_config(config, [], check_paths=False)
    before = _checkpoints(run / "work/base")
    assert before
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "TORCHELASTIC_RUN_ID": "test"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run), "base", "data"], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, **env, "MASTER_PORT": "2222", "RANK": "0"})
    assert holder.stdout.readline().strip() == "held"
    try:
        for key, val in {**env, "MASTER_PORT": "1111", "RANK": "1"}.items():
            monkeypatch.setenv(key, val)
        monkeypatch.setattr(pipeline, "RANK0_TIMEOUT_S", 1.0)
        with pytest.raises(pipeline.StageError, match="rank 0 of this launch did not take the lock"):
            pipeline.run_stage(cfg, "base", force=True, log=lambda m: None)
        assert _checkpoints(run / "work/base") == before  # nothing discarded
        monkeypatch.setenv("MASTER_PORT", "2222")  # the holder's launch: rank 1 goes on
        assert pipeline._await_rank0(cfg, pipeline.get_stage("base"), "base", force=True)
    finally:
        holder.kill()
        holder.wait()
    # rank 0 gone, stage complete: a rank 1 without --force skips it
    assert not pipeline._await_rank0(cfg, pipeline.get_stage("data"), "data", force=False, timeout=1.0)
