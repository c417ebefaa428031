"""Test set-up: no network, ever. Hub access is switched off and sockets to anything but the
loopback interface raise."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # noqa: ANN001
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    if self.family == getattr(socket, "AF_UNIX", None):
        return _real_connect(self, address)
    raise RuntimeError(f"tests must not use the network (tried to connect to {address!r})")


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch on the 2 cores CI has, without oversubscribing."""
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def one_thread():
    """Tiny models: one thread. On a busy 2-core machine two OpenMP threads made a tiny training step
    ~100x slower (threads spin-waiting for a descheduled peer). Modules that want it declare
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` (it runs after ``_torch_threads``)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# tests/ on sys.path, so that tests can ``from tiny import ...``.
import sys as _sys  # noqa: E402

_sys.path.insert(0, os.path.dirname(__file__))
