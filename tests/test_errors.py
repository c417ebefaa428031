"""When things go wrong: a bad flag, a config this machine cannot honour, a run directory that cannot be
written, a full disk, a diverged training: one line on stderr naming the file or the key, exit status 2, no
traceback, nothing half-written. ``--force`` redoes what it names. Artifacts follow the umask. The tests keep
out of the user's Hugging Face cache."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from downscale import cli, pipeline
from tiny import WORDS, domain_text, fake_data_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cli(capfd, *argv) -> tuple[int, str, list[str]]:
    """Run the CLI in this process: (exit status, stderr, its ``downscale: error`` lines). An exception that
    escapes ``main`` (a traceback for the user) fails the test."""
    capfd.readouterr()
    _log_to_this_stderr()
    rc = cli.main([str(a) for a in argv])
    err = capfd.readouterr().err
    return rc, err, [line for line in err.splitlines() if line.startswith("downscale:")]


def _log_to_this_stderr() -> None:
    """Log handlers made during an earlier test (transformers' own) write to that test's captured stderr, closed
    since: point them at this one's, as in a real process, where stderr stays open."""
    import logging
    import sys

    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                    and getattr(handler.stream, "closed", False)):
                handler.stream = sys.stderr  # not setStream: it would flush the closed one
                if "flush" in vars(handler):  # transformers binds flush to the stream it was made with
                    handler.flush = sys.stderr.flush


def _local_config(tmp_path: Path, **sections) -> Path:
    """A tiny experiment YAML over local text files (two domains, one document per line): the data stage runs
    in a few seconds."""
    tree = {"run": {"name": "errs", "dir": str(tmp_path / "run"), "precision": "fp32"},
            "data": {"sources": [], "block_size": 32, "val_fraction": 0.2, "test_fraction": 0.2,
                     "tokenizer": {"kind": "bpe", "vocab_size": 300, "train_chars": 20000}}}
    for i, domain in enumerate(list(WORDS)[:2]):
        path = tmp_path / "corpus" / f"{domain}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(domain_text(domain, 40, seed=i)) + "\n", encoding="utf-8")
        tree["data"]["sources"].append({"name": domain, "kind": "local", "paths": [str(path)],
                                        "txt_document": "lines"})
    for key, val in sections.items():
        tree[key] = {**tree.get(key, {}), **val}
    out = tmp_path / "exp.yaml"
    out.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return out


def _yaml(cfg, tmp_path: Path) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


def _assert_one_line(rc: int, err: str, lines: list[str], *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------- bad input, caught before any stage


NO_CUDA = pytest.mark.skipif("_cuda()", reason="this machine has CUDA: the setting is valid here")
# (command, arguments after the config, what the line must name); {file}: an existing file, {tmp}: the test's folder
BAD = [
    pytest.param("data", ["run.device=cuda"], "run.device", marks=NO_CUDA, id="device-cuda"),
    pytest.param("base", ["run.precision=fp16"], "run.precision", marks=NO_CUDA, id="fp16-on-cpu"),
    pytest.param("data", ["run.dir=/proc/downscale-test/run"], "run.dir", id="run-dir-under-proc"),
    pytest.param("data", ["run.dir={file}"], "run.dir", id="run-dir-is-a-file"),
    pytest.param("data", ["run.dir={file}/run"], "run.dir", id="run-dir-below-a-file"),
    pytest.param("config", ["base.train.lr=.inf"], "base.train.lr", id="lr-inf"),
    pytest.param("config", ["specialize.train.lr=.nan"], "specialize.train.lr", id="lr-nan"),
    pytest.param("config", ["specialize.kd_ratio=.nan"], "specialize.kd_ratio", id="kd-ratio-nan"),
    pytest.param("config", ["specialize.temperature=.inf"], "specialize.temperature", id="temperature-inf"),
    pytest.param("config", ["evaluate.device_watts=.inf"], "evaluate.device_watts", id="watts-inf"),
    pytest.param("config", ["base.train.betas=[0.9, .inf]"], "base.train.betas", id="betas-inf"),
    pytest.param("config", ["data.val_fraction=.nan"], "data.val_fraction", id="val-fraction-nan"),
    pytest.param("config", ["combine.prior_smoothing=.inf"], "combine.prior_smoothing", id="smoothing-inf"),
    pytest.param("config", ["base.init.rope_theta=.inf"], "base.init.rope_theta", id="rope-theta-inf"),
    pytest.param("config", ["base.train.max_grad_norm=.inf"], "base.train.max_grad_norm", id="grad-norm-inf"),
    pytest.param("specialize", ["--student", "99"], "--student", id="student-99"),
    pytest.param("specialize", ["--student", "2"], "--student", id="student-2-of-2"),
    pytest.param("specialize", ["--student", "-1"], "--student", id="student-negative"),
    pytest.param("specialize", ["--student", "one"], "--student", id="student-not-a-number"),
    pytest.param("specialize", ["--cache-only", "--student", "5", "specialize.teacher=cache"], "--student",
                 id="cache-only-student-5"),
    pytest.param("data", ["base.name_or_path={tmp}/short-model", "data.tokenizer.kind=base", "data.block_size=128"],
                 "data.block_size", id="block-size-over-max-positions"),
    # values the schema refuses, through the command that would write first
    pytest.param("data", ["run.nmae=x"], "run.nmae", id="unknown-key"),
    pytest.param("data", ["compress.num_students=0"], "compress.num_students", id="no-students"),
    pytest.param("data", ["data.block_size=1"], "data.block_size", id="block-size-1"),
    pytest.param("base", ["specialize.kd_ratio=2"], "specialize.kd_ratio", id="kd-ratio-2"),
    pytest.param("specialize", ["specialize.kd_loss=bogus"], "specialize.kd_loss", id="kd-loss-unknown"),
    pytest.param("combine", ["combine.modes=[nope]"], "combine.modes", id="mode-unknown"),
    pytest.param("combine", ["combine.router=nope"], "combine.router", id="router-unknown"),
    pytest.param("combine", ["combine.default_mode=nope"], "combine.default_mode", id="default-mode-unknown"),
    pytest.param("run", ["run.precision=fp8"], "run.precision", id="precision-fp8"),
    pytest.param("run", ["run.device=tpu"], "run.device", id="device-tpu"),
    pytest.param("run", ["run.seed=abc"], "run.seed", id="seed-not-a-number"),
    pytest.param("run", ["run.threads=0"], "run.threads", id="threads-0"),
    pytest.param("specialize", ["specialize.train.batch_size=0"], "specialize.train.batch_size", id="batch-0"),
    pytest.param("specialize", ["specialize.train.grad_accum=0"], "specialize.train.grad_accum", id="grad-accum-0"),
    pytest.param("base", ["base.train.max_steps=-1"], "base.train.max_steps", id="max-steps-negative"),
    pytest.param("evaluate", ["evaluate.max_test_tokens_per_shard=-5"], "evaluate.max_test_tokens_per_shard",
                 id="test-tokens-negative"),
    pytest.param("data", ["data.shard_by=nothing"], "data.shard_by", id="shard-by-unknown"),
    pytest.param("compress", ["compress.importance=guess"], "compress.importance", id="importance-unknown"),
    pytest.param("compress", ["compress.search.finalists=0"], "compress.search.finalists", id="finalists-0"),
    pytest.param("compress", ["compress.round_to=0"], "compress.round_to", id="round-to-0"),
    pytest.param("specialize", ["specialize.teacher=nobody"], "specialize.teacher", id="teacher-unknown"),
    pytest.param("specialize", ["quality.enabled=true", "quality.band=[90, 10]"], "quality.band",
                 id="quality-band-reversed"),
    pytest.param("specialize", ["quality.band=[0, 101]"], "quality.band", id="quality-band-over-100"),
    pytest.param("specialize", ["quality.enabled=true", "specialize.teacher=cache"], "quality.enabled",
                 id="quality-with-a-teacher-cache"),
    pytest.param("evaluate", ["evaluate.quality_ablation=true"], "evaluate.quality_ablation",
                 id="quality-ablation-without-pruning"),
    pytest.param("specialize", ["specialize.temperature=0"], "specialize.temperature", id="temperature-0"),
    pytest.param("specialize", ["specialize.cache_top_k=0"], "specialize.cache_top_k", id="cache-top-k-0"),
    pytest.param("data", ["data.val_fraction=1.5"], "data.val_fraction", id="val-fraction-1.5"),
]


@pytest.mark.parametrize(("command", "args", "key"), BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capfd, command, args, key) -> None:
    config = _local_config(tmp_path)
    (tmp_path / "a-file").write_text("not a folder\n")
    model = tmp_path / "short-model"  # a base whose context is 64 positions
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    args = [a.format(file=tmp_path / "a-file", tmp=tmp_path) for a in args]
    overrides = [a for a in args if "=" in a]
    flags = [a for a in args if "=" not in a]
    rc, err, lines = _cli(capfd, command, config, *overrides, *flags)
    _assert_one_line(rc, err, lines, key)
    assert "command line (" in lines[0]  # where the value came from: the override, not the file
    assert not (tmp_path / "run").exists()  # nothing written, not even the run directory
    assert (tmp_path / "a-file").read_text() == "not a folder\n"
    assert not Path("/proc/downscale-test").exists()


@pytest.mark.parametrize("command", ["specialize", "run"])
@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_teacher_without_bitsandbytes_is_one_line(tmp_path, capfd, monkeypatch, command, quant) -> None:
    import sys

    import transformers  # noqa: F401 - imported first: it notes at import which packages are installed

    config = _local_config(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed, as importlib sees it
    rc, err, lines = _cli(capfd, command, config, f"specialize.teacher_quant={quant}")
    _assert_one_line(rc, err, lines, "specialize.teacher_quant", "bitsandbytes", quant)
    assert not (tmp_path / "run").exists()
    # a stage that never loads the teacher does not ask for it
    rc, err, _ = _cli(capfd, "run", config, f"specialize.teacher_quant={quant}", "--to", "data")
    assert rc == 0, err


def test_a_quantized_teacher_that_fails_to_load_is_one_line(tmp_path, monkeypatch) -> None:
    """bitsandbytes' errors (a shape mismatch deep in its kernels, say) become one line naming the key."""
    from types import SimpleNamespace

    import torch
    import transformers

    from downscale.pipeline import StageError
    from downscale.stages.specialize import load_teacher

    (tmp_path / "config.json").write_text("{}")

    def fail(*args, **kwargs):
        raise RuntimeError("shape '[-1, 64]' is invalid for input of size 48\n  (and more lines)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(StageError) as info:
        load_teacher(tmp_path, SimpleNamespace(teacher_quant="4bit"), torch.device("cpu"), None)
    assert "specialize.teacher_quant" in str(info.value) and "shape '[-1, 64]'" in str(info.value)
    assert "\n" not in str(info.value)


def test_run_dir_on_a_read_only_file_system(tmp_path, capfd, monkeypatch) -> None:
    """EROFS on creating the run directory (simulated: the tests may run as root, whom permissions don't stop)."""
    config = _local_config(tmp_path)
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == ro or ro in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, err, lines = _cli(capfd, "data", config, f"run.dir={ro / 'run'}")
    _assert_one_line(rc, err, lines, "run.dir", "Read-only file system")
    assert not ro.exists()


def test_trust_remote_code_refusal_is_one_line(tmp_path, capfd) -> None:
    """A model folder that ships its own code: the data stage (its tokenizer) and the base stage (its config)
    refuse it with one line naming base.trust_remote_code, not transformers' three."""
    model = tmp_path / "custom-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "my_custom", "architectures": ["MyModel"],
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel",
                     "AutoTokenizer": ["tokenization_my.MyTokenizer", None]}}))
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MyTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_my.MyTokenizer", None]}}))
    (model / "configuration_my.py").write_text("raise SystemExit('custom code ran')\n")
    config = _local_config(tmp_path, base={"name_or_path": str(model)}, data={"tokenizer": {"kind": "base"}})
    rc, err, lines = _cli(capfd, "data", config)
    _assert_one_line(rc, err, lines, "base.trust_remote_code", str(config))
    assert "custom code" not in err and "[transformers]" not in err  # none of transformers' own text
    # the base stage, on a run whose data stage is complete
    cfg = fake_data_run(tmp_path / "b", base={"name_or_path": str(model), "init": {}, "train": {}},
                        data={"tokenizer": {"kind": "base"}})
    rc, err, lines = _cli(capfd, "base", _yaml(cfg, tmp_path / "b"))
    _assert_one_line(rc, err, lines, "base.trust_remote_code")
    assert not (cfg.run_dir / "base").exists()


# --------------------------------------------------------------------------- failures inside a stage


def _full_disk_under(root: Path):
    """An ``os.fsync`` that fails with ENOSPC for files under ``root`` (what a full disk does to a write)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if name.startswith(str(root)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    return fsync


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to name the file written")
def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, capfd, monkeypatch) -> None:
    config = _local_config(tmp_path)
    run = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", _full_disk_under(run / ".staging"))  # the stage's outputs; the manifest is fine
    rc, err, lines = _cli(capfd, "data", config)
    _assert_one_line(rc, err, lines, "No space left on device", str(run / ".staging"))
    assert pipeline.load_manifest(run)["stages"]["data"]["status"] == "failed"
    assert not (run / "data").exists() and not (run / "tokenizer").exists()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or (".staging" in p.parts and p.is_file())]
    monkeypatch.undo()  # the disk has room again: the stage runs
    rc, err, _ = _cli(capfd, "data", config)
    assert rc == 0, err
    assert pipeline.load_manifest(run)["stages"]["data"]["status"] == "complete"


def test_cli_maps_enospc_and_erofs_from_any_stage_to_one_line(tmp_path, capfd, monkeypatch) -> None:
    config = _local_config(tmp_path)
    for code, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        def fail(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code), str(tmp_path / "run" / "eval" / "results.json"))

        monkeypatch.setattr(pipeline, "run_stage", fail)
        rc, err, lines = _cli(capfd, "evaluate", config)
        _assert_one_line(rc, err, lines, text, "results.json")


def test_training_diverged_is_one_line(tmp_path, capfd) -> None:
    cfg = fake_data_run(tmp_path, base={"train": {"max_steps": 4, "lr": 1e30, "warmup_steps": 0,
                                                  "max_grad_norm": None, "save_every": 1}})
    rc, err, lines = _cli(capfd, "base", _yaml(cfg, tmp_path))
    _assert_one_line(rc, err, lines, "not finite at step", "last good checkpoint")
    assert pipeline.load_manifest(cfg.run_dir)["stages"]["base"]["status"] == "failed"
    assert not (cfg.run_dir / "base").exists()


def test_teacher_cache_error_is_one_line(tmp_path, capfd, monkeypatch) -> None:
    from downscale.teacher_cache import TeacherCacheError

    config = _local_config(tmp_path)
    message = f"teacher cache {tmp_path / 'cache' / 'code'}: logprobs.npy unreadable (truncated); build it again"

    def fail(*args, **kwargs):
        raise TeacherCacheError(message)

    monkeypatch.setattr(pipeline, "run_stage", fail)
    rc, err, lines = _cli(capfd, "specialize", config)
    _assert_one_line(rc, err, lines, message)


def test_a_bug_keeps_its_traceback(tmp_path, capfd, monkeypatch) -> None:
    """Only the failures a user can act on become one line: anything else is a bug, and its traceback stays."""
    config = _local_config(tmp_path)

    def fail(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(pipeline, "run_stage", fail)
    with pytest.raises(ValueError, match="invariant"):
        cli.main(["evaluate", str(config)])


def test_block_size_over_a_gguf_or_hub_base_is_refused_by_the_base_stage(tmp_path) -> None:
    """When the base's context is known only once its config is loaded (a hub id, a GGUF file: the config check
    reads local folders only), the base stage refuses it before writing anything."""
    from downscale.config import ConfigError
    from tiny import tiny_model

    src = tmp_path / "model"
    tiny_model(vocab_size=300).save_pretrained(src)
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "max_position_embeddings": 16}))
    # built without the CLI's config check (which would refuse this local folder at once)
    cfg = fake_data_run(tmp_path, base={"name_or_path": str(src), "init": {}, "train": {}},
                        data={"tokenizer": {"kind": "base"}, "block_size": 32})
    with pytest.raises(ConfigError, match=r"data\.block_size: expected at most the base's max_position_embeddings, "
                                          r"16 \(.*config\.json\); got 32"):
        pipeline.run_stage(cfg, "base", log=lambda m: None)
    assert not (cfg.run_dir / "base").exists()
    assert pipeline.load_manifest(cfg.run_dir)["stages"]["base"]["status"] == "failed"


# --------------------------------------------------------------------------- --force and --student

TINY = {
    "base": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
             "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "eval_every": 6,
                       "eval_batches": 1, "save_every": 3, "log_every": 3}},
    "compress": {"target_params": 0.6, "importance": "magnitude", "calibration_sequences": 4, "val_blocks": 2,
                 "search": {"enabled": False, "random_baseline": False}},
    "specialize": {"train": {"max_steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 3,
                             "eval_batches": 1, "save_every": 3, "log_every": 3}},
}


def _parts(run_dir: Path) -> dict[str, dict]:
    return pipeline.load_manifest(run_dir)["stages"]["specialize"]["parts"]


def test_force_redoes_what_it_names_and_a_bad_student_is_exit_2(tmp_path, capfd) -> None:
    cfg = fake_data_run(tmp_path, shards=("code", "legal"), **TINY)
    config = _yaml(cfg, tmp_path)
    for command in ("base", "compress", "specialize"):
        rc, err, _ = _cli(capfd, command, config)
        assert rc == 0, err
    before = _parts(cfg.run_dir)
    assert set(before) == {"0", "1"} and all(p["status"] == "complete" for p in before.values())

    # a complete run: a bad --student is still exit 2 with one line naming the flag
    for bad in ("99", "-1", "2"):
        rc, err, lines = _cli(capfd, "specialize", config, "--student", bad)
        _assert_one_line(rc, err, lines, "--student", bad)
    rc, err, _ = _cli(capfd, "specialize", config, "--student", "1")
    assert rc == 0 and "complete, skipped" in err

    # --force --student 1: student 1 trains again from step 0, student 0 is untouched
    rc, err, _ = _cli(capfd, "specialize", config, "--force", "--student", "1")
    assert rc == 0, err
    assert "complete, skipped" not in err and "resuming from checkpoint" not in err
    after = _parts(cfg.run_dir)
    assert after["0"] == before["0"]
    assert after["1"]["status"] == "complete" and after["1"]["started"] >= before["1"]["started"]
    assert after["1"]["ended"] != before["1"]["ended"] or after["1"]["summary"] != before["1"]["summary"]
    summary = json.loads((cfg.run_dir / "specialized" / "1" / "train_summary.json").read_text())
    assert summary["resumed_from"] is None and summary["steps"] == 3
    assert pipeline.load_manifest(cfg.run_dir)["stages"]["specialize"]["status"] == "complete"

    # --force on the stage: every student trains again from step 0
    rc, err, _ = _cli(capfd, "specialize", config, "--force")
    assert rc == 0, err
    assert "complete, skipped" not in err and "resuming from checkpoint" not in err
    assert all(f"student {i}: --force, training from step 0" in err for i in (0, 1))
    for i in ("0", "1"):
        summary = json.loads((cfg.run_dir / "specialized" / i / "train_summary.json").read_text())
        assert summary["resumed_from"] is None

    # the other stages: --force runs them again, a training one from step 0 (not from its last checkpoint)
    rc, err, _ = _cli(capfd, "base", config, "--force")
    assert rc == 0 and "[base] running (forced)" in err and "resuming from checkpoint" not in err, err
    rc, err, _ = _cli(capfd, "compress", config, "--force")
    assert rc == 0 and "[compress] running (forced)" in err, err
    rc, err, _ = _cli(capfd, "base", config)
    assert rc == 0 and "[base] complete, skipped" in err, err


def test_discard_checkpoints_keeps_caches(tmp_path) -> None:
    work = tmp_path / "work"
    for path in ("base/checkpoints/step-00000003/state.json", "evaluate/control/checkpoints/step-1/x",
                 "compress/scores/round-0.npz", "teacher_cache/code/meta.json"):
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text("{}")
    gone = pipeline.discard_checkpoints(work / "base") + pipeline.discard_checkpoints(work / "evaluate")
    gone += pipeline.discard_checkpoints(work / "compress") + pipeline.discard_checkpoints(work / "nothing")
    assert gone == [work / "base" / "checkpoints", work / "evaluate" / "control" / "checkpoints"]
    assert (work / "compress/scores/round-0.npz").exists() and (work / "teacher_cache/code/meta.json").exists()


# --------------------------------------------------------------------------- files follow the umask


@pytest.fixture(params=[0o022, 0o002], ids=["umask-022", "umask-002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writers_follow_the_umask(tmp_path, umask) -> None:
    import numpy as np

    from downscale._io import current_umask, write_json_atomic, write_text_atomic
    from downscale.data.cluster import Clusterer
    from downscale.data.packing import write_blocks

    assert current_umask() == umask
    want = 0o666 & ~umask
    write_text_atomic(tmp_path / "report.md", "# report\n")
    write_json_atomic(tmp_path / "results.json", {"rows": []})
    write_blocks(tmp_path / "train.bin", np.zeros((2, 4), dtype=np.uint16))
    Clusterer.fit(domain_text("code", 12) + domain_text("legal", 12, seed=1), k=2, svd_dim=4, max_features=64,
                  seed=0).save(tmp_path / "cluster")
    with open(tmp_path / "plain.txt", "w") as fh:  # what a plain open() gives
        fh.write("x")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 6
    assert {p.name: _mode(p) for p in files} == {p.name: want for p in files}


def test_a_stage_writes_its_artifacts_with_the_umask(tmp_path, capfd, umask) -> None:
    """The manifest, config.yaml, configs/<stage>.yaml, meta.json and the token files of a real data stage."""
    config = _local_config(tmp_path)
    rc, err, _ = _cli(capfd, "data", config)
    assert rc == 0, err
    run = tmp_path / "run"
    files = sorted(p for p in run.rglob("*") if p.is_file() and not p.name.startswith("."))
    names = {p.name for p in files}
    assert {"manifest.json", "config.yaml", "data.yaml", "meta.json", "train.bin", "val.bin", "test.bin"} <= names
    assert {str(p.relative_to(run)): oct(_mode(p)) for p in files} == {
        str(p.relative_to(run)): oct(0o666 & ~umask) for p in files}


# --------------------------------------------------------------------------- the user's Hugging Face cache


def _listing(root: Path) -> dict[str, int]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_tests_keep_out_of_the_users_hf_cache(tmp_path, capfd) -> None:
    """The data stage on an ``hf`` source (a folder of jsonl files, read through ``datasets.load_dataset``, which
    writes a cache) with no per-test redirection: the cache lands in the session's folder (conftest), and
    nothing appears under the user's ~/.cache/huggingface."""
    import datasets

    real = Path(os.environ.get("DOWNSCALE_TEST_REAL_HF_HOME") or os.environ.get("HF_HOME")
                or Path.home() / ".cache" / "huggingface")
    before = _listing(real)
    for i, domain in enumerate(list(WORDS)[:2]):
        folder = tmp_path / "hf" / domain
        folder.mkdir(parents=True)
        (folder / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                   for t in domain_text(domain, 40, seed=i)), encoding="utf-8")
    tree = yaml.safe_load(_local_config(tmp_path).read_text())
    tree["data"]["sources"] = [{"name": d, "kind": "hf", "dataset": str(tmp_path / "hf" / d)}
                               for d in list(WORDS)[:2]]
    config = tmp_path / "hf.yaml"
    config.write_text(yaml.safe_dump(tree), encoding="utf-8")
    rc, err, _ = _cli(capfd, "data", config)
    assert rc == 0, err
    assert _listing(real) == before
    session = Path(os.environ["DOWNSCALE_TEST_HF_HOME"])
    assert os.environ["HF_HOME"] == str(session) and session != real
    assert session in Path(datasets.config.HF_DATASETS_CACHE).parents
    assert any(p.suffix == ".arrow" for p in Path(datasets.config.HF_DATASETS_CACHE).rglob("*"))
