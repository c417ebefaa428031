"""Progress bars of long loops: tqdm on stderr, all switched off by ``DOWNSCALE_NO_PROGRESS=1``.

Every bar the package draws is made here, so one environment variable silences them all (batch jobs whose logs are
files, CI, benchmarks that print their own lines). ``disable`` keeps tqdm's meaning: True off, False on, None on only
when stderr is a terminal.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV = "DOWNSCALE_NO_PROGRESS"


def enabled() -> bool:
    """False when ``DOWNSCALE_NO_PROGRESS`` is set to 1 / true / yes."""
    return os.environ.get(ENV, "").strip().lower() not in ("1", "true", "yes")


def bar(iterable: Any = None, *, disable: bool | None = False, **kwargs: Any):
    """A tqdm bar (``tqdm.auto``) on stderr unless ``file`` is given; off when ``disable`` or not ``enabled()``."""
    from tqdm.auto import tqdm

    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=True if not enabled() else disable, **kwargs)
