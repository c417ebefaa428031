"""Config: precedence, validation errors (one line naming file and key), every shipped YAML loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from downscale.config import ConfigError, config_field_docs, load_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"data": {"sources": [{"name": "code", "kind": "builtin", "builtin": "python_code"}]}}


def write(tmp_path: Path, tree: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path, check_paths=False)
    assert cfg.run.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment giving the command that runs it"
    assert "downscale" in path.read_text().split("\n\n")[0]


def test_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    tree = {**MINIMAL, "base": {"train": {"lr": 0.01, "max_steps": 7}}}
    path = write(tmp_path, tree)
    cfg = load_config(path)
    assert cfg.base.train.warmup_steps == 20  # default
    assert cfg.base.train.lr == 0.01  # YAML over default
    assert cfg.run.name == "exp"  # the file's stem
    assert cfg.run_dir == Path("runs/exp")
    cfg = load_config(path, ["base.train.lr=3e-4", "run.seed=5", "data.sources.0.max_documents=10"])
    assert cfg.base.train.lr == pytest.approx(3e-4)  # command line over YAML
    assert cfg.base.train.max_steps == 7
    assert cfg.run.seed == 5
    assert cfg.data.sources[0].max_documents == 10


def _error(tmp_path: Path, tree: dict, overrides: tuple[str, ...] = ()) -> str:
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    msg = _error(tmp_path, {**MINIMAL, "base": {"train": {"learning_rate": 1}}})
    assert msg.startswith(str(tmp_path / "exp.yaml"))
    assert "base.train.learning_rate" in msg and "unknown key" in msg


def test_wrong_type(tmp_path: Path) -> None:
    msg = _error(tmp_path, {**MINIMAL, "base": {"train": {"max_steps": "many"}}})
    assert "base.train.max_steps" in msg and "integer" in msg and "'many'" in msg


def test_out_of_range_and_literal(tmp_path: Path) -> None:
    msg = _error(tmp_path, {**MINIMAL, "specialize": {"jsd_beta": 1.0}})
    assert "specialize.jsd_beta" in msg and "less than 1" in msg
    msg = _error(tmp_path, {**MINIMAL, "data": {"sources": [{"name": "x", "kind": "web"}]}})
    assert "data.sources.0.kind" in msg and "'web'" in msg


def test_cross_field_checks(tmp_path: Path) -> None:
    msg = _error(tmp_path, {"data": {"sources": [{"name": "x", "kind": "local"}]}})
    assert "data.sources.0" in msg and "paths" in msg
    msg = _error(tmp_path, {**MINIMAL, "base": {"init": {"num_heads": 6, "num_kv_heads": 4}}})
    assert "base.init" in msg and "multiple" in msg
    two = {"data": {"sources": [MINIMAL["data"]["sources"][0]] * 2}}
    assert "unique" in _error(tmp_path, two)


def test_override_errors_name_the_command_line(tmp_path: Path) -> None:
    msg = _error(tmp_path, MINIMAL, ("base.train.max_steps=-3",))
    assert msg.startswith("command line (base.train.max_steps=-3)")
    msg = _error(tmp_path, MINIMAL, ("base.nonsense=1",))
    assert "base.nonsense" in msg and "unknown key" in msg
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(write(tmp_path, MINIMAL), ["no_equals_sign"])


def test_missing_input_file(tmp_path: Path) -> None:
    tree = {"data": {"sources": [{"name": "x", "kind": "local", "paths": [str(tmp_path / "nope*.txt")]}]}}
    msg = _error(tmp_path, tree)
    assert "data.sources.0.paths.0" in msg and "expected existing files" in msg


def test_missing_config_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="valid UTF-8 YAML"):
        load_config(bad)


def test_section_hash_tracks_only_named_parts(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    a, b = load_config(path), load_config(path, ["base.train.lr=0.5"])
    assert a.section_hash("data", "run.seed") == b.section_hash("data", "run.seed")
    assert a.section_hash("base") != b.section_hash("base")


def test_setup_runtime_applies_the_run_section(tmp_path: Path) -> None:
    """Every stage starts with models.setup_runtime(cfg.run): threads, TF32 on CUDA (a global flag, read by CUDA
    kernels only), device and autocast dtype from the config."""
    import torch

    from downscale import models

    threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    try:
        cfg = load_config(write(tmp_path, MINIMAL), ["run.device=cpu", "run.precision=fp32", "run.threads=1",
                                                     "run.tf32=false"])
        assert models.setup_runtime(cfg.run) == (torch.device("cpu"), None)
        assert torch.get_num_threads() == 1 and torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is False
        cfg = load_config(write(tmp_path, MINIMAL), ["run.device=cpu", "run.precision=bf16"])
        assert cfg.run.tf32 is True  # the default
        assert models.setup_runtime(cfg.run) == (torch.device("cpu"), torch.bfloat16)
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_every_field_is_documented() -> None:
    undocumented = [key for key, _, _, desc in config_field_docs() if not desc and not key.startswith(
        ("base.init.", "compress.shape."))]
    assert not undocumented, undocumented


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "bogus": 1})
    proc = subprocess.run([sys.executable, "-m", "downscale.cli", "data", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in proc.stderr


def test_config_reference_doc_is_current() -> None:
    """docs/CONFIG.md matches the schema (regenerate with: python scripts/config_reference.py)."""
    from downscale.config import config_reference_markdown

    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert doc == config_reference_markdown(), "docs/CONFIG.md is stale: run python scripts/config_reference.py"
    assert "`specialize.kd_ratio`" in doc and "`data.sources[].kind`" in doc


def test_each_launched_process_gets_its_own_gpu(monkeypatch) -> None:
    """Under accelerate launch / torchrun (LOCAL_RANK) with several GPUs, rank k loads its models on cuda:k (made
    current) rather than all on GPU 0; one visible GPU (a job per GPU) or no launcher: plain cuda."""
    import torch

    from downscale import models

    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert models.resolve_device("auto") == torch.device("cuda", 2) and current == [2]
    assert models.resolve_device("cpu") == torch.device("cpu") and current == [2]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert models.resolve_device("cuda") == torch.device("cuda") and current == [2]
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert models.resolve_device("auto") == torch.device("cuda") and current == [2]
    for bad in ("4", "x"):  # a rank without a GPU of its own: one clear line, not GPU 0
        monkeypatch.setenv("LOCAL_RANK", bad)
        with pytest.raises(RuntimeError, match=f"LOCAL_RANK is '{bad}' but torch sees 4 CUDA devices"):
            models.resolve_device("cuda")
