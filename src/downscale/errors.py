"""The error a user acts on: bad input, a missing or corrupt upstream artifact, a stage another process holds.
The CLI prints its one line and exits with status 2 (no traceback)."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage cannot run (bad input, missing upstream artifact). The CLI prints it and exits 2."""


class Preempted(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 arrived during training (a scheduler's preemption, requeue or time-limit warning): the
    step in progress was finished and checkpointed; running the same command again resumes from it. An interruption,
    like Ctrl-C (stages record it as ``interrupted``); the CLI exits with ``EXIT_PREEMPTED``."""


EXIT_PREEMPTED = 3  # scripts/slurm_specialize.sbatch requeues a task that exits with it after SIGUSR1
