"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd on localhost, every file under
one folder, stopped by their PIDs.

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them) and root (munged and slurmd run as root
here, as NOTES.md measured). ``why_not()`` says why a cluster cannot start on this machine (None: it can).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")


def why_not() -> str | None:
    missing = [d for d in (*DAEMONS, *CLIENTS) if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge "
                f"(.ci/run does)")
    if os.geteuid() != 0:
        return "the single-node SLURM cluster runs munged and slurmd as root; these tests run as another user"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """``start()`` the three daemons in ``root``; ``env`` is what a client needs (SLURM_CONF); ``stop()``."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 16000):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.cpus, self.memory_mb = cpus, memory_mb
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}

    def _write(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text("\n".join([
            "ClusterName=downscale-test", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            "SlurmctldPort=16817", "SlurmdPort=16818", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MinJobAge=900", "KillWait=30",
            "SchedulerParameters=defer_batch", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))

    def start(self, timeout: float = 60.0) -> Cluster:
        self._write()
        r = self.root
        subprocess.run([_exe("munged"), "--force", f"--socket={self.munge_socket}",
                        f"--key-file={r / 'munge' / 'munge.key'}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                        f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'munged.seed'}"],
                       check=True, capture_output=True, timeout=30)
        self.pids["munged"] = int((r / "munge" / "munged.pid").read_text().split()[0])
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_exe(daemon), "-f", str(self.conf)], check=True, capture_output=True, env=self.env,
                           timeout=30)
        deadline = time.time() + timeout
        while time.time() < deadline:
            for daemon in ("slurmctld", "slurmd"):
                pid_file = r / f"{daemon}.pid"
                if daemon not in self.pids and pid_file.exists() and pid_file.read_text().strip():
                    self.pids[daemon] = int(pid_file.read_text().split()[0])
            out = subprocess.run([_exe("sinfo"), "-h", "-o", "%t"], capture_output=True, text=True, env=self.env)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc") and len(self.pids) == 3:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the SLURM node did not come up in {timeout:.0f}s; logs in {r / 'log'}")

    def scontrol(self, *args: str) -> str:
        return subprocess.run([_exe("scontrol"), *args], capture_output=True, text=True, env=self.env,
                              check=True).stdout

    def job_states(self, job: str) -> dict[str, str]:
        """{"<id>" or "<array id>_<task>": state} of a job and its array tasks, as scontrol knows them."""
        out = subprocess.run([_exe("scontrol"), "show", "job", "-o", job], capture_output=True, text=True,
                             env=self.env).stdout
        states = {}
        for line in out.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            key = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if f.get("ArrayTaskId") else f.get("JobId", "?")
            states[key] = f.get("JobState", "?")
        return states

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
