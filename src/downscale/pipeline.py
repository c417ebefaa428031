"""The run directory, its manifest, the stage order and resume.

A run directory holds one experiment. ``manifest.json`` records, for each stage: status,
start and end time, the hash of the config parts it depends on, the fingerprints of its
inputs (the outputs of upstream stages) and of its own outputs, package versions and seed.

A stage writes its outputs into a staging folder (``<run>/.staging/<stage>/``) under their
final names; only when it returns are they renamed into place and the manifest marked
complete. Long stages keep resumable state (checkpoints, caches) under ``<run>/work/<stage>/``,
which survives an interruption.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from downscale._io import dir_fingerprint, package_versions, read_json, replace_dir, write_json_atomic
from downscale.config import ExperimentConfig


class StageError(RuntimeError):
    """A stage cannot run (bad input, missing upstream artifact). The CLI prints it and exits 2."""


class NotBuiltYet(StageError):
    """The stage exists in the design but has not been implemented yet."""


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # "downscale.stages.<x>"; its ``run(ctx) -> dict`` is the entry
    depends_on: tuple[str, ...]  # config parts (dotted) whose change re-runs the stage
    upstream: tuple[str, ...]  # stages whose outputs this stage reads
    outputs: tuple[str, ...]  # paths under the run directory that this stage writes
    # An incremental stage writes its outputs part by part (each part atomically, e.g. one student
    # folder) straight into the run directory, and records each part in the manifest, so that parts
    # can run as independent jobs; the pipeline does not stage and rename its outputs as a whole.
    incremental: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("data", "downscale.stages.data", ("run.seed", "data", "base.name_or_path", "base.revision"), (),
          ("data", "tokenizer")),
    Stage("base", "downscale.stages.base", ("run.seed", "run.precision", "base"), ("data",), ("base",)),
    Stage("compress", "downscale.stages.compress", ("run.seed", "compress"), ("data", "base"), ("students",)),
    Stage("specialize", "downscale.stages.specialize", ("run.seed", "run.precision", "specialize"),
          ("data", "base", "compress"), ("specialized",), incremental=True),
    Stage("combine", "downscale.stages.combine", ("combine",), ("data", "compress", "specialize"), ("ensemble",)),
    Stage("evaluate", "downscale.stages.evaluate", ("evaluate",), ("data", "base", "compress", "specialize",
                                                                    "combine"), ("eval",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)


@dataclass
class StageContext:
    """What a stage's ``run`` function gets."""

    cfg: ExperimentConfig
    run_dir: Path
    staging: Path  # write outputs here, under their final names (staging/"base"/...)
    stage: str
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    def work_dir(self, *parts: str) -> Path:
        """A persistent folder for resumable state (checkpoints, caches) of this stage."""
        path = self.run_dir.joinpath("work", self.stage, *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def output(self, name: str) -> Path:
        """The staging path of one declared output."""
        return self.staging / name


# --------------------------------------------------------------------------- manifest


def manifest_path(run_dir: Path) -> Path:
    return run_dir / "manifest.json"


def load_manifest(run_dir: Path) -> dict:
    path = manifest_path(run_dir)
    if not path.exists():
        return {"stages": {}}
    try:
        manifest = read_json(path)
    except ValueError as exc:
        raise StageError(f"{path}: corrupt manifest ({exc}); remove it to start the run afresh") from None
    manifest.setdefault("stages", {})
    return manifest


def _save_manifest(run_dir: Path, manifest: dict) -> None:
    write_json_atomic(manifest_path(run_dir), manifest)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if needed) for the duration of the block: parallel
    jobs on one file system (student jobs, SLURM array tasks) take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no locking
            pass
        yield


@contextlib.contextmanager
def _manifest_lock(run_dir: Path):
    """An exclusive lock around read-modify-write of the manifest (parallel student jobs share it)."""
    with file_lock(run_dir / ".manifest.lock"):
        yield


def _update_entry(run_dir: Path, stage: str, entry: dict) -> None:
    with _manifest_lock(run_dir):
        manifest = load_manifest(run_dir)  # re-read: another process may have recorded another stage
        old = manifest["stages"].get(stage, {})
        if "parts" in old and "parts" not in entry:
            entry = {**entry, "parts": old["parts"]}
        manifest["stages"][stage] = entry
        _save_manifest(run_dir, manifest)


# --------------------------------------------------------------------------- parts of incremental stages


def part_entry(run_dir: Path, stage: str, part: str) -> dict | None:
    """The manifest record of one part (e.g. student "0") of an incremental stage."""
    return load_manifest(run_dir)["stages"].get(stage, {}).get("parts", {}).get(part)


def record_part(run_dir: Path, stage: str, part: str, entry: dict) -> None:
    """Record one part of an incremental stage in the manifest (under a lock)."""
    with _manifest_lock(run_dir):
        manifest = load_manifest(run_dir)
        node = manifest["stages"].setdefault(stage, {"status": "partial"})
        node.setdefault("parts", {})[part] = entry
        _save_manifest(run_dir, manifest)


def part_is_complete(run_dir: Path, stage: str, part: str, config_hash: str, inputs: dict,
                     output: Path) -> bool:
    """True if ``part`` was completed with this config hash and these inputs and its output is unchanged."""
    entry = part_entry(run_dir, stage, part)
    return bool(entry and entry.get("status") == "complete" and entry.get("config_hash") == config_hash
                and entry.get("inputs") == inputs and output.exists()
                and dir_fingerprint(output) == entry.get("output"))


def _inputs(run_dir: Path, stage: Stage, manifest: dict) -> dict[str, dict]:
    """Recorded output fingerprints of the upstream stages; a missing upstream is an error."""
    out = {}
    for up in stage.upstream:
        entry = manifest["stages"].get(up)
        if not entry or entry.get("status") != "complete":
            raise StageError(f"stage '{stage.name}' needs stage '{up}' to be complete in {run_dir}: "
                             f"run `downscale {up}` first (or `downscale run`)")
        out[up] = entry["outputs"]
    return out


def stage_status(cfg: ExperimentConfig, stage: Stage, manifest: dict | None = None) -> tuple[str, str]:
    """('complete' | 'stale' | 'missing', why) for one stage against the current config."""
    run_dir = cfg.run_dir
    manifest = manifest if manifest is not None else load_manifest(run_dir)
    entry = manifest["stages"].get(stage.name)
    if not entry:
        return "missing", "never run"
    if entry.get("status") != "complete":
        return "missing", f"last attempt {entry.get('status')}"
    if entry.get("config_hash") != cfg.section_hash(*stage.depends_on):
        return "stale", "config changed"
    try:
        if entry.get("inputs") != _inputs(run_dir, stage, manifest):
            return "stale", "inputs changed"
    except StageError as exc:
        return "stale", str(exc)
    for name, fp in entry.get("outputs", {}).items():
        path = run_dir / name
        if not path.exists():
            return "stale", f"output {name} missing"
        if dir_fingerprint(path) != fp:
            return "stale", f"output {name} changed on disk"
    return "complete", "up to date"


def run_stage(cfg: ExperimentConfig, name: str, force: bool = False, log: Callable[[str], None] | None = None,
              **kwargs: Any) -> dict:
    """Run one stage (unless complete and ``force`` is off). Returns its manifest entry."""
    stage = get_stage(name)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    manifest = load_manifest(run_dir)
    status, why = stage_status(cfg, stage, manifest)
    if status == "complete" and not force:
        log(f"[{name}] complete, skipped ({why})")
        return manifest["stages"][name]
    try:
        module = importlib.import_module(stage.module)
    except ModuleNotFoundError as exc:
        if exc.name == stage.module:
            raise NotBuiltYet(f"stage '{name}' is not built yet") from None
        raise
    inputs = _inputs(run_dir, stage, manifest)
    if not is_main_process():
        return _run_as_worker(cfg, stage, module, log, **kwargs)
    if stage.incremental and kwargs.get("part") is not None:
        return _run_part(cfg, stage, module, inputs, log, **kwargs)
    _write_resolved_config(cfg)
    staging = run_dir / ".staging" / name
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    entry = {
        "status": "running",
        "started": _now(),
        "ended": None,
        "config_hash": cfg.section_hash(*stage.depends_on),
        "inputs": inputs,
        "outputs": {},
        "versions": package_versions(),
        "seed": cfg.run.seed,
        "pid": os.getpid(),
    }
    _update_entry(run_dir, name, entry)
    log(f"[{name}] running ({why})")
    t0 = time.time()
    ctx = StageContext(cfg=cfg, run_dir=run_dir, staging=staging, stage=name, log=log)
    try:
        summary = module.run(ctx, **kwargs) or {}
        where = run_dir if stage.incremental else staging
        missing = [o for o in stage.outputs if not (where / o).exists()]
        if missing:
            raise StageError(f"stage '{name}' finished without writing {', '.join(missing)}")
        if not stage.incremental:
            for out in stage.outputs:
                replace_dir(staging / out, run_dir / out)
    except BaseException as exc:
        entry.update(status="failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
                     ended=_now(), error=f"{type(exc).__name__}: {exc}"[:500])
        _update_entry(run_dir, name, entry)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entry.update(status="complete", ended=_now(), seconds=round(time.time() - t0, 2),
                 outputs={o: dir_fingerprint(run_dir / o) for o in stage.outputs}, summary=summary)
    entry.pop("pid", None)
    _update_entry(run_dir, name, entry)
    log(f"[{name}] complete in {entry['seconds']:.1f}s")
    return entry


def _run_part(cfg: ExperimentConfig, stage: Stage, module: Any, inputs: dict, log: Callable[[str], None],
              **kwargs: Any) -> dict:
    """Run one part of an incremental stage (``downscale specialize --student i``) as an independent job:
    the stage records the part itself; the stage as a whole is marked complete here once every part is."""
    _write_resolved_config(cfg)
    part = kwargs["part"]
    staging = cfg.run_dir / ".staging" / f"{stage.name}.part{part}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ctx = StageContext(cfg=cfg, run_dir=cfg.run_dir, staging=staging, stage=stage.name, log=log)
    try:
        summary = module.run(ctx, **kwargs) or {}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if summary.get("all_parts_complete"):
        entry = {"status": "complete", "started": summary.get("started", _now()), "ended": _now(),
                 "config_hash": cfg.section_hash(*stage.depends_on), "inputs": inputs,
                 "outputs": {o: dir_fingerprint(cfg.run_dir / o) for o in stage.outputs},
                 "versions": package_versions(), "seed": cfg.run.seed, "summary": summary}
        _update_entry(cfg.run_dir, stage.name, entry)
        log(f"[{stage.name}] every part is complete: stage complete")
    return summary


def is_main_process() -> bool:
    """False on the non-zero ranks of an ``accelerate launch`` / ``torchrun`` job."""
    return int(os.environ.get("RANK", "0")) == 0


def _run_as_worker(cfg: ExperimentConfig, stage: Stage, module: Any, log: Callable[[str], None],
                   **kwargs: Any) -> dict:
    """A non-zero rank runs the stage (it takes part in the collective training) with a private
    staging folder it then discards; the manifest and the outputs belong to rank 0."""
    rank = int(os.environ.get("RANK", "0"))
    staging = cfg.run_dir / ".staging" / f"{stage.name}.rank{rank}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ctx = StageContext(cfg=cfg, run_dir=cfg.run_dir, staging=staging, stage=stage.name, log=lambda msg: None)
    try:
        return module.run(ctx, **kwargs) or {}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_all(cfg: ExperimentConfig, stages: tuple[str, ...] = STAGE_NAMES, force: bool = False,
            log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run ``stages`` in order. Once one stage re-runs, every later stage re-runs too."""
    results = {}
    rerun = force
    for name in stages:
        before = load_manifest(cfg.run_dir)["stages"].get(name, {}).get("ended")
        entry = run_stage(cfg, name, force=rerun, log=log)
        results[name] = entry
        if entry.get("ended") != before:
            rerun = True  # this stage produced new outputs: everything downstream follows
    return results


def _write_resolved_config(cfg: ExperimentConfig) -> None:
    from downscale._io import write_text_atomic

    header = f"# resolved config of run '{cfg.run.name}', from {cfg._source}\n"
    write_text_atomic(cfg.run_dir / "config.yaml", header + cfg.to_yaml())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
