"""The error a user acts on: bad input, a missing or corrupt upstream artifact, a stage another process holds.
The CLI prints its one line and exits with status 2 (no traceback)."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage cannot run (bad input, missing upstream artifact). The CLI prints it and exits 2."""
