"""The run directory, its manifest, the stage order and resume.

A run directory holds one experiment. ``manifest.json`` records, for each stage: status,
start and end time, the config keys it read and their hash, the fingerprints of its inputs
(the parts of upstream stages' outputs that it reads) and of its own outputs, package versions
and seed. The resolved config each stage last completed with is kept in ``<run>/configs/<stage>.yaml``.

What re-runs a stage (``stage_status``): a change in the config keys it reads (``stage_keys``; keys
that only change logging, checkpoint cadence, speed, the device or where files go are not among
them), or in the content it reads of upstream stages' outputs. A stage that re-runs and writes the
same content as before does not re-run the stages after it. ``plan`` predicts what ``run_all`` will
do (``downscale status``).

A stage writes its outputs into a staging folder (``<run>/.staging/<stage>/``) under their
final names; only when it returns are they renamed into place and the manifest marked
complete. Long stages keep resumable state (checkpoints, caches) under ``<run>/work/<stage>/``,
which survives an interruption.

Before a stage runs it takes its locks (``downscale.locks``: one process per stage or student, nothing rewritten
while it is read) and checks every upstream file it reads against the file table the manifest recorded when that
file's stage completed (``check_inputs``, ``downscale.integrity``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from downscale import integrity, locks
from downscale._io import (
    dir_fingerprint,
    file_fingerprint,
    package_versions,
    read_json,
    replace_dir,
    temp_file_for,
    write_json_atomic,
    write_text_atomic,
)
from downscale.config import ExperimentConfig
from downscale.errors import StageError


class NotBuiltYet(StageError):
    """The stage exists in the design but has not been implemented yet."""


# Keys of a TrainConfig that change only what is logged and how often state is saved, never the result
# (resume from any checkpoint is exact, and validation does not touch the weights or the data order).
TRAIN_MONITORING = ("log_every", "report_to", "eval_every", "save_every", "keep_checkpoints")
# The optimizer and schedule keys of a TrainConfig that a loop with its own step count reads (compress's
# recovery between rounds, evaluate's control): every key but max_steps and the monitoring ones.
TRAIN_SCHEDULE = ("batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas",
                  "max_grad_norm")
# v1: each stage hashed whole config sections. v2: the keys each stage reads (``stage_keys``). A manifest
# entry recorded under another version is stale once, and says so.
HASH_VERSION = 2


@dataclass(frozen=True)
class Keys:
    """The config keys a stage reads. ``content``: dotted keys (a section stands for every key below it,
    less ``exclude``) that shape what later stages read of its outputs; ``report``: keys that change only
    its report files (``Stage.reports``). A key that does not exist in the schema is skipped."""

    content: tuple[str, ...]
    report: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def _kd_keys(cfg: ExperimentConfig) -> list[str]:
    s = cfg.specialize
    return (["specialize.kd_ratio", "specialize.kd_loss", "specialize.temperature"]
            + (["specialize.jsd_beta"] if s.kd_loss == "jsd" else [])
            + (["specialize.skew_alpha"] if s.kd_loss == "skew_kl" else []))


def _data_keys(cfg: ExperimentConfig) -> Keys:
    content, exclude = ["run.seed", "data"], []
    if cfg.data.shard_by != "cluster":
        exclude.append("data.cluster")
    if not cfg.data.near_dup.enabled:  # off: its settings change nothing (and runs made before it keep their hash)
        exclude.append("data.near_dup")
    if cfg.data.tokenizer.kind == "base":  # the tokenizer (and its separator token) come from the base
        content += ["base.name_or_path", "base.revision", "base.gguf_file", "base.trust_remote_code"]
        exclude += ["data.tokenizer.vocab_size", "data.tokenizer.min_frequency", "data.tokenizer.train_chars"]
    return Keys(tuple(content), exclude=tuple(exclude))


def _base_keys(cfg: ExperimentConfig) -> Keys:
    if cfg.base.name_or_path:  # imported: the weights come from the source; the validation loss is a report
        return Keys(("base.name_or_path", "base.revision", "base.gguf_file", "base.dtype", "base.trust_remote_code"),
                    report=("base.import_eval_batches", "base.train.batch_size", "run.precision"))
    return Keys(("run.seed", "run.precision", "base.init", "base.train"), report=("base.train.eval_batches",),
                exclude=tuple(f"base.train.{k}" for k in TRAIN_MONITORING))


def _compress_keys(cfg: ExperimentConfig) -> Keys:
    content = ["run.seed", "run.precision", "compress", "base.dtype"]  # base.dtype: the base is loaded in it
    if cfg.base.name_or_path:
        content.append("base.trust_remote_code")
    if cfg.compress.recover_steps > 0:  # distillation between rounds, with specialize's KD and optimizer settings
        content += _kd_keys(cfg) + [f"specialize.train.{k}" for k in TRAIN_SCHEDULE if k != "grad_accum"]
    return Keys(tuple(content), report=("compress.val_blocks",))


def _specialize_keys(cfg: ExperimentConfig) -> Keys:
    s = cfg.specialize
    exclude = [f"specialize.train.{k}" for k in TRAIN_MONITORING]
    # speed and location only: the chunking of the fused loss, torch.compile, where teacher caches live
    exclude += ["specialize.kd_chunk_tokens", "specialize.compile", "specialize.cache_dir"]
    exclude += [k for k in ("specialize.jsd_beta", "specialize.skew_alpha") if k not in _kd_keys(cfg)]
    if s.teacher != "cache":
        exclude += ["specialize.cache_top_k", "specialize.cache_logprob_dtype"]
    if not s.lora:
        exclude += ["specialize.lora_rank", "specialize.lora_alpha"]
    # data pruning by quality happens in this stage; off, its settings change nothing (and older runs keep their hash)
    return Keys(("run.seed", "run.precision", "specialize") + (("quality",) if cfg.quality.enabled else ()),
                exclude=tuple(exclude))


def _combine_keys(cfg: ExperimentConfig) -> Keys:
    return Keys(("run.precision", "combine"))


def _evaluate_keys(cfg: ExperimentConfig) -> Keys:
    # evaluate.device_watts and grid_gco2_per_kwh only change the ledger's energy and CO2 columns, but the
    # ledger is made inside the stage: changing them re-runs it (the honest, simple choice)
    content, exclude = ["run.seed", "run.precision", "evaluate"], []
    if cfg.evaluate.control:  # the control trains with specialize's loop settings (its step count is its own)
        content += [f"specialize.train.{k}" for k in TRAIN_SCHEDULE
                    if k != "lr" or cfg.evaluate.control_lr is None]
    else:
        exclude.append("evaluate.control_lr")
    if cfg.evaluate.quality_ablation:  # it specializes the students again, on the unpruned shards
        content += ["specialize", "quality"]
    return Keys(tuple(content), exclude=tuple(exclude))


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # "downscale.stages.<x>"; its ``run(ctx) -> dict`` is the entry
    keys: Callable[[ExperimentConfig], Keys]  # the config keys it reads; a change re-runs the stage
    upstream: tuple[str, ...]  # stages whose outputs this stage reads
    outputs: tuple[str, ...]  # paths under the run directory that this stage writes
    # An incremental stage writes its outputs part by part (each part atomically, e.g. one student
    # folder) straight into the run directory, and records each part in the manifest, so that parts
    # can run as independent jobs; the pipeline does not stage and rename its outputs as a whole.
    incremental: bool = False
    # Report files among the outputs (globs relative to the run directory): summaries and metrics that
    # the stages reading this one's "content" never open. Only ``reads_reports`` stages read them.
    reports: tuple[str, ...] = ()
    # upstream stages whose report files this stage reads too (a function of the config where that depends on it)
    reads_reports: tuple[str, ...] | Callable[[ExperimentConfig], tuple[str, ...]] = ()


STAGES: tuple[Stage, ...] = (
    Stage("data", "downscale.stages.data", _data_keys, (), ("data", "tokenizer")),
    Stage("base", "downscale.stages.base", _base_keys, ("data",), ("base",),
          reports=("base/train_summary.json", "base/metrics.jsonl")),
    Stage("compress", "downscale.stages.compress", _compress_keys, ("data", "base"), ("students",),
          reports=("students/compress.json", "students/*/compress_student.json")),
    Stage("specialize", "downscale.stages.specialize", _specialize_keys, ("data", "base", "compress"),
          ("specialized",), incremental=True),
    # combine records the fingerprint of each student folder it combines (summaries included) in ensemble.json
    Stage("combine", "downscale.stages.combine", _combine_keys, ("data", "compress", "specialize"), ("ensemble",),
          reads_reports=lambda cfg: ("compress", "specialize") if cfg.combine.source == "students" else
          ("specialize",)),
    Stage("evaluate", "downscale.stages.evaluate", _evaluate_keys, ("data", "base", "compress", "specialize",
                                                                     "combine"), ("eval",),
          reads_reports=("base", "compress", "specialize", "combine")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)


# --------------------------------------------------------------------------- config keys and their hashes


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:  # a value, or a list (sources, betas, modes): one leaf
        out[prefix] = node


def _select(dump: dict, keys: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = dump
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            _flatten(node, key, out)
    return {k: v for k, v in out.items() if not any(k == x or k.startswith(x + ".") for x in exclude)}


def stage_keys(cfg: ExperimentConfig, stage: Stage | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(content, report): the config values ``stage`` reads, by dotted key. A change in either re-runs it; only a
    change in ``content`` can change what the stages after it read of its outputs."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    keys = stage.keys(cfg)
    dump = cfg.model_dump(mode="json")
    return (_select(dump, keys.content, keys.exclude + keys.report), _select(dump, keys.report, keys.exclude))


def _hash(values: dict[str, Any]) -> str:
    payload = json.dumps({"version": HASH_VERSION, "keys": values}, sort_keys=True)
    return f"v{HASH_VERSION}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def config_hash(cfg: ExperimentConfig, stage: Stage | str) -> str:
    """The hash of every config key ``stage`` reads (``stage_keys``): what its manifest entry records."""
    content, report = stage_keys(cfg, stage)
    return _hash({**content, **report})


def content_hash(cfg: ExperimentConfig, stage: Stage | str) -> str:
    """The hash of the keys that shape the content of ``stage``'s outputs (its report files aside)."""
    return _hash(stage_keys(cfg, stage)[0])


def resume_hash(cfg: ExperimentConfig, stage: Stage | str, drop: tuple[str, ...] = (), **extra: Any) -> str:
    """The key of a stage's own resumable state (a training run's checkpoints under ``<run>/work/<stage>/``): the
    content keys ``stage`` reads (``stage_keys``; never a logging, checkpoint-cadence or speed key) less those under
    ``drop`` (a section stands for every key below it), plus ``extra`` values (a part's index, the fingerprints of
    the upstream outputs it starts from: ``recorded_content``)."""
    content, _ = stage_keys(cfg, stage)
    keys = {k: v for k, v in content.items() if not any(k == d or k.startswith(d + ".") for d in drop)}
    return _hash({"resume": keys, **extra})


def recorded_content(run_dir: Path, stages: tuple[str, ...]) -> dict[str, str | None]:
    """The content fingerprint (``products["content"]``, report files aside) each of ``stages`` was last recorded
    complete with; None for one not recorded so. What resumable state made from their outputs is keyed by."""
    recorded = load_manifest(run_dir)["stages"]
    out: dict[str, str | None] = {}
    for name in stages:
        entry = recorded.get(name) or {}
        out[name] = (entry.get("products") or {}).get("content") if entry.get("status") == "complete" else None
    return out


def _scheme(entry: dict) -> str:
    recorded = str(entry.get("config_hash") or "")
    return recorded.split(":", 1)[0] if ":" in recorded else "v1"


def _diff(old: dict | None, new: dict[str, Any], limit: int = 3) -> str:
    """``key (old -> new), ...`` for the keys whose values differ; '' when the old values were not recorded."""
    if not isinstance(old, dict):
        return ""
    missing = object()
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]

    def show(value: Any) -> str:
        text = "unset" if value is missing else json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{k} ({show(old.get(k, missing))} -> {show(new.get(k, missing))})" for k in changed[:limit]]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return (": " + ", ".join(parts) + more) if parts else ""


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


def _reads_reports(stage: Stage, cfg: ExperimentConfig | None) -> tuple[str, ...]:
    whole = stage.reads_reports
    if callable(whole):
        return whole(cfg) if cfg is not None else stage.upstream  # no config: assume every report is read
    return whole


def _inputs(run_dir: Path, stage: Stage, manifest: dict, cfg: ExperimentConfig | None = None) -> dict[str, dict]:
    """What this stage reads of each upstream stage, by its recorded fingerprint: ``{up: {"content": fp}}`` (its
    outputs less its report files) or ``{up: {"all": fp}}``. A missing upstream is an error."""
    whole = _reads_reports(stage, cfg)
    out = {}
    for up in stage.upstream:
        entry = manifest["stages"].get(up)
        if not entry or entry.get("status") != "complete":
            raise StageError(f"stage '{stage.name}' needs stage '{up}' to be complete in {run_dir}: "
                             f"run `downscale {up}` first (or `downscale run`)")
        product = "all" if up in whole else "content"
        products = entry.get("products")
        out[up] = {product: products[product]} if products else {"outputs": entry.get("outputs")}  # old entries
    return out


def _fingerprints(run_dir: Path, stage: Stage) -> tuple[dict[str, str], dict[str, str]]:
    """The stage's output fingerprints, each file read once: ``outputs`` (per output, what ``_io.dir_fingerprint``
    gives: ``stage_status`` recomputes it to see a change on disk) and ``products`` (as the stages after it read them:
    ``all``, every file, and ``content``, every file but the report files, ``Stage.reports``)."""
    fps: dict[str, str] = {}  # run-relative path -> file fingerprint
    outputs = {}
    for name in stage.outputs:
        path, h = run_dir / name, hashlib.sha256()
        for f in integrity.files_below(path):
            fp = fps[f.relative_to(run_dir).as_posix()] = file_fingerprint(f)
            h.update(str(f.relative_to(path)).encode())
            h.update(fp.encode())
        outputs[name] = fps[name] if path.is_file() else h.hexdigest()[:16]
    every, content = hashlib.sha256(), hashlib.sha256()
    for rel, fp in sorted(fps.items()):
        item = f"{rel}\0{fp}\n".encode()
        every.update(item)
        if not any(fnmatch.fnmatch(rel, pattern) for pattern in stage.reports):
            content.update(item)
    return outputs, {"content": content.hexdigest()[:16], "all": every.hexdigest()[:16]}


def _current_scheme(entry: dict) -> bool:
    return _scheme(entry) == f"v{HASH_VERSION}"


def stage_status(cfg: ExperimentConfig, stage: Stage, manifest: dict | None = None) -> tuple[str, str]:
    """('complete' | 'stale' | 'missing', why) for one stage against the current config and its upstream stages'
    recorded outputs: what ``run_stage`` decides by. ``plan`` also looks ahead at upstream stages that will re-run."""
    run_dir = cfg.run_dir
    manifest = manifest if manifest is not None else load_manifest(run_dir)
    entry = manifest["stages"].get(stage.name)
    if not entry:
        return "missing", "never run"
    if entry.get("status") != "complete":
        return "missing", _attempt(run_dir, stage, entry)
    if not _current_scheme(entry):
        return "stale", (f"recorded by another downscale version (config hash {_scheme(entry)}, this one uses "
                         f"v{HASH_VERSION}): re-runs once")
    if entry.get("config_hash") != config_hash(cfg, stage):
        content, report = stage_keys(cfg, stage)
        return "stale", "config changed" + _diff(entry.get("config_keys"), {**content, **report})
    try:
        now = _inputs(run_dir, stage, manifest, cfg)
    except StageError as exc:
        return "stale", str(exc)
    recorded = entry.get("inputs") or {}
    if recorded != now:
        changed = [up for up in now if recorded.get(up) != now[up]] or list(now)
        return "stale", f"inputs changed: {', '.join(changed)} re-ran since"
    for name, fp in entry.get("outputs", {}).items():
        path = run_dir / name
        if not path.exists():
            return "stale", f"output {name} missing"
        if dir_fingerprint(path) != fp:
            return "stale", f"output {name} changed on disk"
    return "complete", "up to date"


def _attempt(run_dir: Path, stage: Stage, entry: dict) -> str:
    """What became of the last attempt at a stage that is not complete: running now (its lock is held), died
    (recorded as running, but no process holds its lock: killed), failed, interrupted; for an incremental
    stage, which parts are complete, running now, or died."""
    if locks.fcntl is None:
        return f"last attempt {entry.get('status')} (no file locks on this system: running or died cannot be told)"
    held = locks.holder(run_dir, stage.name)
    if held is not None:
        return f"running now ({locks.describe(held)})"
    parts = entry.get("parts") or {}
    if stage.incremental and parts:
        done = sorted(int(k) for k, v in parts.items() if v.get("status") == "complete")
        what = [f"students complete: {', '.join(map(str, done)) or 'none'}"]
        for k in sorted(parts, key=int):
            if parts[k].get("status") == "running":
                who = locks.holder(run_dir, f"{stage.name}.part{k}")
                what.append(f"student {k} running now ({locks.describe(who)})" if who is not None else
                            f"student {k}: last attempt died (recorded as running, holds no lock)")
        return "; ".join(what)
    if entry.get("status") == "running":
        return (f"last attempt died (pid {entry.get('pid')}, recorded as running, holds no lock): it runs again, "
                f"resuming from its last checkpoint")
    return f"last attempt {entry.get('status')}"


def plan(cfg: ExperimentConfig, manifest: dict | None = None) -> dict[str, tuple[str, str]]:
    """What ``run_all`` will do, per stage: ('complete' | 'stale' | 'missing', why), as ``stage_status`` says, and
    a complete stage is also stale when an upstream stage will re-run and change what it reads of its outputs
    ("upstream x will re-run"). A re-run is taken to change its report files always (they hold timings) and the
    rest of its outputs when the config keys of that content or its inputs changed, or when there is no complete
    record to compare with: with the same keys and inputs, the stages write the same content (on a GPU a
    re-run can differ in the last bits, and then the stages after it re-run too)."""
    manifest = manifest if manifest is not None else load_manifest(cfg.run_dir)
    changes: dict[str, dict[str, bool]] = {}
    out: dict[str, tuple[str, str]] = {}
    for stage in STAGES:
        status, why = stage_status(cfg, stage, manifest)
        whole = _reads_reports(stage, cfg)
        moving = [up for up in stage.upstream if changes.get(up, {}).get("all" if up in whole else "content")]
        if status == "complete" and moving:
            status, why = "stale", f"upstream {moving[0]} will re-run"
        out[stage.name] = (status, why)
        changes[stage.name] = _will_change(cfg, stage, manifest, status, bool(moving))
    return out


def _will_change(cfg: ExperimentConfig, stage: Stage, manifest: dict, status: str, inputs_move: bool) -> dict:
    """Whether running ``stage`` now will change its products (``content``, ``all``), judged against its last
    complete record: a stage that is complete does not run; a re-run rewrites its report files (``all``
    changes), and writes the recorded content again unless its content keys or inputs changed."""
    if status == "complete":
        return {"content": False, "all": False}
    entry = manifest["stages"].get(stage.name) or {}
    if entry.get("status") != "complete" or not _current_scheme(entry) or not entry.get("products"):
        return {"content": True, "all": True}
    try:
        moved = inputs_move or entry.get("inputs") != _inputs(cfg.run_dir, stage, manifest, cfg)
    except StageError:
        return {"content": True, "all": True}
    return {"content": moved or entry.get("content_hash") != content_hash(cfg, stage), "all": True}


def _new_entry(cfg: ExperimentConfig, stage: Stage, inputs: dict) -> dict:
    content, report = stage_keys(cfg, stage)
    return {"status": "running", "started": _now(), "ended": None, "config_hash": _hash({**content, **report}),
            "content_hash": _hash(content), "config_keys": {**content, **report}, "inputs": inputs, "outputs": {},
            "versions": package_versions(), "seed": cfg.run.seed}


def _complete(cfg: ExperimentConfig, stage: Stage, entry: dict) -> dict:
    """Mark ``entry`` complete: fingerprint the outputs, keep the config the stage ran with, record it."""
    run_dir = cfg.run_dir
    config_file = _write_stage_config(cfg, stage.name)
    outputs, products = _fingerprints(run_dir, stage)
    entry.update(status="complete", ended=_now(), outputs=outputs, products=products,
                 files=integrity.file_table(run_dir, stage.outputs), config_file=config_file)
    entry.pop("pid", None)
    _update_entry(run_dir, stage.name, entry)
    return entry


def record_complete(cfg: ExperimentConfig, name: str, summary: dict | None = None) -> dict:
    """Record stage ``name`` as complete with the outputs now in the run directory, as ``run_stage`` does after
    running it (for tools and tests that write a stage's outputs themselves)."""
    stage = get_stage(name)
    entry = _new_entry(cfg, stage, _inputs(cfg.run_dir, stage, load_manifest(cfg.run_dir), cfg))
    entry["summary"] = summary or {}
    return _complete(cfg, stage, entry)


def run_stage(cfg: ExperimentConfig, name: str, force: bool = False, log: Callable[[str], None] | None = None,
              **kwargs: Any) -> dict:
    """Run one stage (unless complete and ``force`` is off). Returns its manifest entry.

    Before it runs: it takes its locks (``downscale.locks``; ``LockHeld`` when another process holds one), decides
    again under them (another process may have just completed it), and checks every upstream file it reads against
    the manifest (``check_inputs``; ``CorruptInput`` for a changed, truncated or missing one)."""
    stage = get_stage(name)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    manifest = load_manifest(run_dir)
    status, why = stage_status(cfg, stage, manifest)
    if status == "complete" and not force:
        _log_skip(cfg, stage, manifest, why, log)
        return manifest["stages"][name]
    try:
        module = importlib.import_module(stage.module)
    except ModuleNotFoundError as exc:
        if exc.name == stage.module:
            raise NotBuiltYet(f"stage '{name}' is not built yet") from None
        raise
    part = kwargs.get("part") if stage.incremental else None
    own = [f"{name}.part{part}"] if part is not None else [name]
    if not is_main_process():  # rank 0 holds the locks and checks the inputs for the whole launch
        _inputs(run_dir, stage, manifest, cfg)  # a missing upstream stage: the same error as on rank 0
        if not _await_rank0(cfg, stage, own[0], force):
            log(f"[{name}] complete, skipped (rank 0 found it complete)")
            return load_manifest(run_dir)["stages"][name]
        _discard_for_force(run_dir, stage, force, kwargs)
        return _run_as_worker(cfg, stage, module, log, **kwargs)
    with locks.hold(run_dir, exclusive=own, shared=_read_locks(cfg, stage, part), what=f"downscale {name}"):
        locks.sweep_staging(run_dir)
        manifest = load_manifest(run_dir)  # again, under the locks (``why`` stays the one seen before them: under
        if stage_status(cfg, stage, manifest)[0] == "complete" and not force:  # them a dead attempt looks live)
            log(f"[{name}] complete, skipped (another process completed it meanwhile)")
            return manifest["stages"][name]
        inputs = _inputs(run_dir, stage, manifest, cfg)
        check_inputs(cfg, stage, manifest)
        _discard_for_force(run_dir, stage, force, kwargs)
        if part is not None:
            return _run_part(cfg, stage, module, inputs, log, **kwargs)
        return _run_whole(cfg, stage, module, inputs, log, status, why, **kwargs)


_STARTED = time.time()  # about when this process started (imports included): a lock record older than this by
# minutes is not this launch's


RANK0_TIMEOUT_S = 900.0  # how long a rank > 0 waits for rank 0 to take the stage's lock


def _await_rank0(cfg: ExperimentConfig, stage: Stage, lock: str, force: bool, timeout: float | None = None) -> bool:
    """A rank > 0 waits until rank 0 of its launch holds the stage's lock (it has decided to run and checked the
    inputs): True, go on. False when the stage is complete and no process holds the lock (rank 0 skipped it).
    Before this, a rank touches nothing: a second launch's ranks cannot discard a running launch's checkpoints. A
    rank 0 that gave up (a lock held by another job, a corrupt input) ends the launch (the launcher stops the other
    ranks); ``StageError`` after ``timeout`` otherwise."""
    timeout = RANK0_TIMEOUT_S if timeout is None else timeout
    me, deadline = locks.launch_id(), time.monotonic() + timeout
    while True:
        rec = locks.record(cfg.run_dir, lock)
        if me is None or (rec.get("launch") == me and float(rec.get("epoch", 0)) >= _STARTED - 300):
            return True
        if locks.holder(cfg.run_dir, lock) is None and (
                _completed_since(cfg, stage, lock, _STARTED - 300) or (not force and stage_status(cfg, stage)[0]
                                                                       == "complete")):
            return False  # rank 0 skipped it, or ran a stage without collectives to its end already
        if time.monotonic() > deadline:
            raise StageError(f"rank {os.environ.get('RANK')}: rank 0 of this launch did not take the lock "
                             f"{locks.lock_path(cfg.run_dir, lock)} within {timeout:.0f}s; see rank 0's error")
        time.sleep(0.2)


def _completed_since(cfg: ExperimentConfig, stage: Stage, lock: str, since: float) -> bool:
    """Whether ``stage`` (or the part that ``lock`` names) was recorded complete after ``since`` (epoch seconds)."""
    import datetime

    node = load_manifest(cfg.run_dir)["stages"].get(stage.name) or {}
    if ".part" in lock:
        node = (node.get("parts") or {}).get(lock.rsplit(".part", 1)[1]) or {}
    try:
        ended = datetime.datetime.strptime(node.get("ended") or "", "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return False
    return node.get("status") == "complete" and ended >= since


def _discard_for_force(run_dir: Path, stage: Stage, force: bool, kwargs: dict) -> None:
    """``--force`` redoes what it names: from step 0, not from the checkpoints of the run being redone."""
    if not force:
        return
    if stage.incremental:
        kwargs["force"] = True  # the stage redoes each part it runs (every one, or the one named)
    else:  # every rank removes them before its own training starts: none can resume from one meanwhile
        discard_checkpoints(run_dir / "work" / stage.name)


def _read_locks(cfg: ExperimentConfig, stage: Stage, part: Any) -> list[str]:
    """The locks a run of ``stage`` holds shared: those of the stages it reads (and of each of their parts), and,
    for one part, its own stage's (a whole-stage run of it holds that one exclusively)."""
    names = []
    for up in stage.upstream:
        names.append(up)
        if get_stage(up).incremental:
            names += [f"{up}.part{i}" for i in range(cfg.num_students)]
    return names + ([stage.name] if part is not None else [])


def _log_skip(cfg: ExperimentConfig, stage: Stage, manifest: dict, why: str, log: Callable[[str], None]) -> None:
    """The 'complete, skipped' line, and a warning when an upstream file it was made from has changed since (its
    outputs still stand for what it read then; ``downscale run`` rewrites the changed file first)."""
    log(f"[{stage.name}] complete, skipped ({why})")
    bad = input_problems(cfg, stage, manifest, cheap=True)
    if bad:
        up, path, what = bad[0]
        log(f"[{stage.name}] note: {path} ({stage.name} read it): {what}; `downscale {up}` writes it again, "
            f"`downscale status` shows what else would re-run")


def input_problems(cfg: ExperimentConfig, stage: Stage, manifest: dict, cheap: bool = False,
                   only: tuple[str, ...] | None = None) -> list[tuple[str, Path, str]]:
    """``[(upstream stage, file, what is wrong)]`` for the files ``stage`` reads of its complete upstream stages
    (``only`` those named), against the file tables their manifest entries recorded (``downscale.integrity``)."""
    whole = _reads_reports(stage, cfg)
    out = []
    for up in stage.upstream if only is None else [u for u in stage.upstream if u in only]:
        entry = manifest["stages"].get(up) or {}
        if entry.get("status") != "complete":
            continue
        u = get_stage(up)
        for path, what in integrity.upstream_problems(cfg.run_dir, entry, u.outputs, u.reports, up in whole,
                                                      cheap=cheap):
            out.append((up, path, what))
    return out


class CorruptInput(StageError):
    """A file a stage would read changed on disk after the stage that wrote it completed."""


def check_inputs(cfg: ExperimentConfig, stage: Stage, manifest: dict, only: tuple[str, ...] | None = None) -> None:
    """Refuse to run ``stage`` on an upstream file that changed after it was written: ``CorruptInput``, one line
    naming the file and the stage that writes it again."""
    bad = input_problems(cfg, stage, manifest, only=only)
    if bad:
        up, path, what = bad[0]
        more = f" (and {len(bad) - 1} more file{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise CorruptInput(f"{path}: {what}{more}; stage '{stage.name}' reads it and will not run on it: "
                           f"`downscale {up}` writes it again (`downscale run` does that and whatever follows)")


def _run_whole(cfg: ExperimentConfig, stage: Stage, module: Any, inputs: dict, log: Callable[[str], None],
               status: str, why: str, **kwargs: Any) -> dict:
    """Run a whole stage into its staging folder, rename its outputs into place, record it complete."""
    run_dir, name = cfg.run_dir, stage.name
    _write_resolved_config(cfg)
    staging = run_dir / ".staging" / name
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    entry = {**_new_entry(cfg, stage, inputs), "pid": os.getpid()}
    _update_entry(run_dir, name, entry)
    log(f"[{name}] running ({why if status != 'complete' else 'forced'})")
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
    entry.update(seconds=round(time.time() - t0, 2), summary=summary)
    _complete(cfg, stage, entry)
    log(f"[{name}] complete in {entry['seconds']:.1f}s")
    return entry


def discard_checkpoints(root: Path) -> list[Path]:
    """``--force``: remove the training checkpoints below ``root`` (a stage's folder under ``<run>/work/``, or one
    part's), so that the forced run trains from step 0 instead of resuming at its last step. Caches that are keyed
    by what they were made from (compress's importance scores, the teacher caches) are kept. Returns what went."""
    if not root.is_dir():
        return []
    found = sorted(p for p in root.rglob("checkpoints") if p.is_dir())
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def check_run_dir(cfg: ExperimentConfig) -> None:
    """Before any stage runs: the run directory is a folder this process can create and write in. A
    ``ConfigError`` naming ``run.dir`` otherwise (an existing file, a read-only file system, /proc, no
    permission), with nothing written."""
    from downscale.config import ConfigError

    run_dir = cfg.run_dir
    where = cfg.origin("run.dir") if cfg.run.dir else cfg._source
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(where, "run.dir", "expected a folder; it names an existing file", str(run_dir))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = temp_file_for(run_dir / ".write-check")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(where, "run.dir", f"expected a folder this process can write in ({exc.strerror or exc})",
                          str(run_dir)) from None


def _run_part(cfg: ExperimentConfig, stage: Stage, module: Any, inputs: dict, log: Callable[[str], None],
              **kwargs: Any) -> dict:
    """Run one part of an incremental stage (``downscale specialize --student i``) as an independent job:
    the stage records the part itself; the stage as a whole is marked complete here once every part is."""
    _write_resolved_config(cfg)
    part = kwargs["part"]
    staging = cfg.run_dir / ".staging" / f"{stage.name}.part{part}"  # this part's lock is held: no one else's
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ctx = StageContext(cfg=cfg, run_dir=cfg.run_dir, staging=staging, stage=stage.name, log=log)
    try:
        summary = module.run(ctx, **kwargs) or {}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if summary.get("all_parts_complete"):
        entry = {**_new_entry(cfg, stage, inputs), "started": summary.get("started", _now()), "summary": summary}
        _complete(cfg, stage, entry)
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
    part = f".part{kwargs['part']}" if stage.incremental and kwargs.get("part") is not None else ""
    staging = cfg.run_dir / ".staging" / f"{stage.name}{part}.rank{rank}"  # owned by rank 0's lock (locks.py)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ctx = StageContext(cfg=cfg, run_dir=cfg.run_dir, staging=staging, stage=stage.name, log=lambda msg: None)
    try:
        return module.run(ctx, **kwargs) or {}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_all(cfg: ExperimentConfig, stages: tuple[str, ...] = STAGE_NAMES, force: bool = False,
            log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run ``stages`` in order, each unless it is complete (``stage_status``); ``force`` re-runs every one of
    them. A stage after one that re-ran runs again only if what it reads of that one's outputs changed (its
    recorded input fingerprints no longer match): the cascade follows content, not time."""
    return {name: run_stage(cfg, name, force=force, log=log) for name in stages}


def _write_resolved_config(cfg: ExperimentConfig) -> None:
    """``<run>/config.yaml``: the config of the latest stage run (any stage); see ``_write_stage_config``."""
    header = f"# resolved config of run '{cfg.run.name}', from {cfg._source}: the latest stage run's\n"
    write_text_atomic(cfg.run_dir / "config.yaml", header + cfg.to_yaml())


def _write_stage_config(cfg: ExperimentConfig, stage: str) -> str:
    """``<run>/configs/<stage>.yaml``: the resolved config the stage's current outputs were made with.
    Returns its path relative to the run directory."""
    rel = f"configs/{stage}.yaml"
    header = (f"# resolved config that stage '{stage}' of run '{cfg.run.name}' last completed with, from "
              f"{cfg._source} at {_now()}\n# (the keys it depends on: manifest.json, stages.{stage}.config_keys)\n")
    write_text_atomic(cfg.run_dir / rel, header + cfg.to_yaml())
    return rel


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
