"""One process at a time writes a stage (or one student of an incremental stage); nothing is rewritten while a
running stage reads it.

Locks are advisory ``flock`` locks on files in ``<run>/.locks/``: the kernel drops a lock when its process dies,
however it dies (``kill -9`` included), so a dead holder's lock is free for the next process without any clean-up.
A running stage holds:

- its own lock exclusively (``specialize`` for the whole stage), or, for one part (``specialize --student 1``),
  the stage's lock shared and the part's lock (``specialize.part1``) exclusively: parts run side by side, a
  whole-stage run waits for none of them;
- the locks of the stages it reads, shared (and every part lock of an incremental one): a stage is not rewritten
  while another reads it.

Nothing waits: a lock that is taken is one line (``LockHeld``, exit 2) saying who holds it. The exclusive holder
writes who it is (pid, host, command, since when) into the lock file; ``holder`` reads it back only while the lock
is really held, so a record left by a dead process is never reported as running.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from downscale.errors import StageError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

LOCK_DIR = ".locks"
_PART = re.compile(r"^(?P<stage>[a-z_]+)\.part(?P<part>\d+)$")


class LockHeld(StageError):
    """Another process holds a lock this one needs."""


def lock_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / LOCK_DIR / f"{name}.lock"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    """'pid 123 on host, `downscale specialize ...`, since ...' from a holder record."""
    if not info:
        return "another process"
    where = f"pid {info.get('pid')} on {info.get('host')}"
    command = f", `{info['command']}`" if info.get("command") else ""
    return f"{where}{command}, since {info.get('since')}"


def launch_id() -> str | None:
    """What the ranks of one ``torchrun`` / ``accelerate launch`` job share (None outside one): rank 0 writes it into
    the lock it takes, and the other ranks wait for it before they touch anything (``pipeline.run_stage``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return ":".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                                                     "WORLD_SIZE"))


def record(run_dir: Path, name: str) -> dict:
    """The holder record in lock ``name``'s file as it is (no probe: it may be a dead process's)."""
    return _read(lock_path(run_dir, name))


def label(name: str) -> str:
    """'student 1 of stage specialize' for ``specialize.part1``, 'stage compress' for ``compress``."""
    m = _PART.match(name)
    return f"student {m.group('part')} of stage {m.group('stage')}" if m else f"stage {name}"


def _live_writer(info: dict) -> bool:
    """True when ``info`` records an exclusive holder that may be alive (on this host: its pid exists)."""
    if info.get("mode") != "exclusive" or not info.get("pid"):
        return False
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _try(fh, shared: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without flock (some Lustre / GPFS mounts): no locking there
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise


def _take(fh, shared: bool, patience: float = 2.0) -> bool:
    """Take the lock, retrying for ``patience`` seconds: another process's ``holder`` probe holds it for an instant."""
    deadline = time.monotonic() + patience
    while not _try(fh, shared):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _who(run_dir: Path, name: str) -> str:
    """Who holds ``name``: its exclusive holder, else the processes holding one of its parts (they hold the stage's
    lock shared), else the readers."""
    info = _read(lock_path(run_dir, name))
    if _live_writer(info):
        return describe(info)
    parts = [(what, who) for what, who in running(run_dir) if what.endswith(f"of stage {name}")]
    if parts:
        return "; ".join(f"{what}: {describe(who)}" for what, who in parts)
    return "a running stage that reads it (`downscale status` lists what runs)"


def holder(run_dir: Path, name: str) -> dict | None:
    """The record of the process that holds lock ``name`` exclusively now (``{}`` when it is held but its record is
    not readable yet or its pid is not visible here), or None when no process holds it exclusively (readers, which
    hold it shared, do not count). The probe is a shared lock on a read-only descriptor: a read-only run directory
    can be inspected, and readers are never disturbed (a writer taking the lock meanwhile retries, see ``hold``)."""
    path = lock_path(run_dir, name)
    if fcntl is None or not path.exists():
        return None
    try:
        fh = open(path)
    except OSError:
        return None
    with fh:
        if _try(fh, shared=True):
            return None  # closing the file drops the probe's lock
    info = _read(path)
    return info if _live_writer(info) else {}


def running(run_dir: Path) -> list[tuple[str, dict]]:
    """``[(label, holder record)]`` of every stage or student some live process holds exclusively now."""
    root = Path(run_dir) / LOCK_DIR
    out = []
    for path in sorted(root.glob("*.lock")) if root.is_dir() else []:
        info = holder(run_dir, path.name[: -len(".lock")])
        if info:
            out.append((label(path.name[: -len(".lock")]), info))
    return out


@contextlib.contextmanager
def hold(run_dir: Path, exclusive: list[str], shared: list[str], what: str) -> Iterator[None]:
    """Hold the ``exclusive`` and ``shared`` locks for the block, or raise ``LockHeld`` naming the first that is
    taken (having taken none)."""
    handles = []
    wanted = [*((n, True) for n in shared), *((n, False) for n in exclusive)]
    try:
        for name, is_shared in wanted:
            path = lock_path(run_dir, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")
            if not _take(fh, is_shared):
                fh.close()
                raise LockHeld(f"{what}: {label(name)} is in use by {_who(run_dir, name)} (lock {path}); wait for it "
                               f"to finish, or stop it, and run again")
            handles.append(fh)
            if not is_shared:
                fh.seek(0)
                fh.truncate()
                fh.write(json.dumps({"mode": "exclusive", "pid": os.getpid(), "host": socket.gethostname(),
                                     "command": " ".join(["downscale", *sys.argv[1:]])[:300],
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "epoch": time.time(),
                                     "launch": launch_id()}))
                fh.flush()
        yield
    finally:
        for fh, (_, is_shared) in zip(reversed(handles), reversed(wanted[:len(handles)]), strict=True):
            if not is_shared:  # no record of a holder outlives its lock (kill -9 aside: see _live_writer)
                fh.seek(0)
                fh.truncate()
            fh.close()


_RANK = re.compile(r"^(?P<stage>[a-z_]+)(?P<part>\.part\d+)?\.rank\d+$")


def staging_owner(name: str) -> str:
    """The lock that owns a folder of ``<run>/.staging``: ``specialize.part1`` for ``specialize.part1`` and for a
    launcher rank's ``specialize.part1.rank<r>``, the stage for ``<stage>`` and ``<stage>.rank<r>`` (rank 0 holds
    that lock exclusively meanwhile)."""
    m = _RANK.match(name)
    if m:
        return m.group("stage") + (m.group("part") or "")
    return name


def sweep_staging(run_dir: Path) -> list[Path]:
    """Remove the staging folders whose owner lock no process holds exclusively (left by a process that was killed;
    readers, which hold it shared, write no staging). Returns them."""
    root = Path(run_dir) / ".staging"
    gone = []
    if fcntl is None or not root.is_dir():
        return gone
    for entry in sorted(root.iterdir()):
        if holder(run_dir, staging_owner(entry.name)) is None:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            gone.append(entry)
    return gone
