"""One entry point: ``downscale <stage> CONFIG [key.path=value ...]``.

Torch and friends are imported only by the stage that runs, so ``--help`` and config checks
are fast. Bad input exits with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence

from downscale.pipeline import STAGE_NAMES

STAGE_HELP = {
    "data": "read the sources, shard by domain or cluster, train/load the tokenizer, pack token blocks",
    "base": "load the base model, or build and pretrain the demo base",
    "compress": "prune the base into n students of a target size",
    "specialize": "distill each student from the base on its own shard",
    "combine": "build the ensemble of specialized students",
    "evaluate": "measure base, students and ensembles; write the report",
}

EPILOG = """\
examples:
  downscale run configs/demo.yaml                     every stage, skipping those already complete
  downscale base configs/demo.yaml base.train.lr=3e-4 one stage, with an override
  downscale status configs/demo.yaml                  what is complete, stale or missing
  downscale config configs/demo.yaml run.seed=1       print the resolved config
  downscale law --json                                the downscaling guarantee for LLaMA-3-8B
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="config overrides; they win over the YAML (e.g. base.train.max_steps=10)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downscale",
        description="Compress a big LM into small students, specialize each on a domain, combine them, "
                    "and measure the ensemble against the base.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"downscale {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    for name in STAGE_NAMES:
        p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name])
        _add_config_args(p)
        p.add_argument("--force", action="store_true",
                       help="run again even if complete, training from step 0 (its checkpoints are discarded)")
        if name == "compress":
            p.add_argument("--plan", action="store_true", help="print the student shape plan and exit (no weights)")
            p.add_argument("--json", action="store_true", help="with --plan: print JSON")
        if name == "specialize":
            p.add_argument("--student", default=None, metavar="I",
                           help="train only student I, 0-based (parallel jobs); with --force, retrain it")
            p.add_argument("--cache-only", action="store_true",
                           help="with specialize.teacher=cache: only build the teacher caches (of student i's "
                                "shards with --student, else of every shard) and exit")

    p = sub.add_parser("run", help="run every stage in order, skipping complete ones",
                       description="Run the stages in order. A stage that is complete with the same config keys "
                                   "(those it reads) and inputs is skipped; one whose keys or inputs changed "
                                   "re-runs, and the stages after it re-run if what they read of its outputs "
                                   "changed. `downscale status` shows what would run.")
    _add_config_args(p)
    p.add_argument("--from", dest="start", choices=STAGE_NAMES, default=STAGE_NAMES[0], help="first stage")
    p.add_argument("--to", dest="stop", choices=STAGE_NAMES, default=STAGE_NAMES[-1], help="last stage")
    p.add_argument("--force", action="store_true", help="re-run every selected stage")

    p = sub.add_parser("status", help="show which stages are complete, stale or missing")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("config", help="validate a config and print it resolved (defaults filled in)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")

    sub.add_parser("law", help="the downscaling law, ensemble-law fits, Chinchilla", add_help=False)
    return parser


def _version() -> str:
    from downscale import __version__

    return __version__


def _fail(msg: str, code: int = 2) -> int:
    print(f"downscale: error: {msg}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # output piped into `head` and friends: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "law":  # the law command owns its own flags
        try:
            from downscale.law import law_cli
        except ModuleNotFoundError:
            return _fail("command 'law' is not built yet")
        return law_cli(argv[1:])
    args = build_parser().parse_args(argv)

    from downscale.config import ConfigError, load_config
    from downscale.errors import EXIT_PREEMPTED, Preempted
    from downscale.pipeline import NotBuiltYet, StageError

    cfg = None
    try:
        cfg = load_config(args.config, args.overrides, check_paths=args.command not in ("config", "status"))
        return _dispatch(args, cfg)
    except ConfigError as exc:
        return _fail(str(exc))
    except NotBuiltYet as exc:
        return _fail(f"{exc}: its issue has not landed; nothing was written", code=2)
    except StageError as exc:
        return _fail(str(exc))
    except Preempted as exc:  # SIGTERM / SIGUSR1 from a scheduler: checkpointed, resumes when run again
        print(f"downscale: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("downscale: interrupted; complete stages are kept, the interrupted one resumes from its last "
              "checkpoint", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        line = _known_failure(exc, cfg)
        if line is None:  # a bug: its traceback is what a report needs
            raise
        return _fail(line)


# errors of the file system that the user fixes, not the code: one line, exit 2
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _known_failure(exc: BaseException, cfg) -> str | None:
    """The one line for a failure the user can act on, raised from inside a stage: a diverged training, an
    unusable teacher cache, a full disk or a file that cannot be written, transformers' refusal to run a model's
    own code. None for anything else (a bug keeps its traceback)."""
    train, cache = sys.modules.get("downscale.train"), sys.modules.get("downscale.teacher_cache")
    if (train is not None and isinstance(exc, train.TrainingDiverged)) or (
            cache is not None and isinstance(exc, cache.TeacherCacheError)):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL | _NOT_WRITABLE:
        where = f"{exc.filename}: " if exc.filename else ""
        what = exc.strerror or errno.errorcode.get(exc.errno, str(exc.errno))
        if exc.errno in _DISK_FULL:
            return (f"{where}{what}: free some space (or set run.dir elsewhere) and run again; complete stages are "
                    f"kept, and an interrupted training resumes from its last checkpoint")
        return f"{where}{what}" + (f" (run.dir is {cfg.run_dir})" if cfg is not None else "")
    if isinstance(exc, ValueError) and cfg is not None:
        from downscale.config import remote_code_refusal

        refused = remote_code_refusal(exc, cfg._source, cfg.base.name_or_path)
        return str(refused) if refused is not None else None
    return None


def _student_index(args: argparse.Namespace, cfg) -> int | None:
    """``--student`` as an index below the number of students, checked whatever the state of the run."""
    from downscale.config import ConfigError

    raw = getattr(args, "student", None)
    if raw is None:
        return None
    n = cfg.num_students
    text = str(raw).strip()
    if not (text.lstrip("-").isdigit() and 0 <= int(text) < n):
        raise ConfigError(f"command line (--student {raw})", "--student",
                          f"expected a student index 0..{n - 1} ({cfg._source} has {n} students)")
    return int(text)


def _preflight(cfg, stages: tuple[str, ...]) -> None:
    """Before a command that writes into the run directory: it is a folder this process can write, and this machine
    can honour run.device, run.precision and (for specialize) specialize.teacher_quant. One ConfigError line
    otherwise, with nothing written. torch is imported only when the answer depends on it."""
    from downscale import pipeline

    quant = "specialize" in stages and cfg.specialize.teacher_quant != "none"
    if cfg.run.device == "cuda" or cfg.run.precision == "fp16" or quant:
        from downscale import models

        models.check_runtime(cfg, stages)
    pipeline.check_run_dir(cfg)


def _dispatch(args: argparse.Namespace, cfg) -> int:
    from downscale import pipeline

    if args.command == "config":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2) if args.json else cfg.to_yaml(), end="")
        return 0
    if args.command == "status":
        rows = pipeline.plan(cfg)
        if args.json:
            print(json.dumps({k: {"status": v[0], "why": v[1]} for k, v in rows.items()}, indent=2))
        else:
            print(f"run directory: {cfg.run_dir}")
            for name, (status, why) in rows.items():
                print(f"  {name:<11} {status:<9} {why}")
            from downscale import locks

            for what, info in locks.running(cfg.run_dir):
                print(f"  running now: {what} ({locks.describe(info)})")
            todo = [name for name, (status, _) in rows.items() if status != "complete"]
            print(f"`downscale run` would run: {', '.join(todo)}" if todo else "`downscale run` has nothing to do")
        return 0
    if args.command == "compress" and args.plan:
        try:
            from downscale.stages.compress import plan_command
        except ModuleNotFoundError:
            raise pipeline.NotBuiltYet("stage 'compress' is not built yet") from None
        return plan_command(cfg, as_json=args.json)
    if args.command == "run":
        i, j = STAGE_NAMES.index(args.start), STAGE_NAMES.index(args.stop)
        if i > j:
            return _fail(f"--from {args.start} comes after --to {args.stop}")
        _preflight(cfg, STAGE_NAMES[i:j + 1])
        before = pipeline.load_manifest(cfg.run_dir)["stages"].get("evaluate", {}).get("ended")
        entries = pipeline.run_all(cfg, STAGE_NAMES[i:j + 1], force=args.force)
        results = cfg.run_dir / "eval" / "results.json"
        if "evaluate" in entries and entries["evaluate"].get("ended") == before and results.exists():
            # evaluate was skipped as complete: show its table anyway (a fresh evaluate prints it itself)
            from downscale import report

            res = json.loads(results.read_text())
            print(report.main_table(res) + "\n" + report.verdict(res), file=sys.stderr)
            print(f"report: {cfg.run_dir / 'eval' / 'report.md'}", file=sys.stderr)
        return 0
    student = _student_index(args, cfg)
    _preflight(cfg, (args.command,))
    if args.command == "specialize" and args.cache_only:
        from downscale.stages.specialize import build_caches

        build_caches(cfg, student)
        return 0
    kwargs = {}
    if args.command == "specialize" and student is not None:
        kwargs["part"] = student
    pipeline.run_stage(cfg, args.command, force=args.force, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
