"""Progress bars: every bar comes from downscale.progress, and DOWNSCALE_NO_PROGRESS=1 silences them all."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from downscale import progress, train
from downscale.pruning.importance import calibration_batches
from tiny import tiny_model

SRC = Path(__file__).resolve().parents[1] / "src" / "downscale"


def test_no_module_draws_a_bar_of_its_own():
    """A bar made with tqdm directly would not hear DOWNSCALE_NO_PROGRESS (the training bar once did not)."""
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.name != "progress.py" and re.search(r"\btqdm\b\s*\(|from tqdm|import tqdm", p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("value, on", [("1", False), ("true", False), ("0", True), ("", True)])
def test_the_variable_switches_bars_off(value, on, monkeypatch):
    monkeypatch.setenv(progress.ENV, value)
    assert progress.enabled() is on
    assert progress.bar(range(3), disable=False).disable is (not on)
    assert progress.bar(range(3), disable=True).disable  # a caller's own off stays off


def _fit(tmp_path):
    from downscale.config import TrainConfig

    blocks = np.random.default_rng(0).integers(0, 300, (16, 16))
    return train.fit(tiny_model(vocab_size=300), cfg=TrainConfig(max_steps=3, batch_size=4, save_every=10),
                     sampler=train.BlockSampler([blocks], 4, seed=0), loss_fn=train.causal_lm_loss,
                     work_dir=tmp_path, log=lambda m: None, desc="TRAINBAR",
                     accelerator=train.make_accelerator(torch.device("cpu"), None))


def test_training_and_calibration_bars_obey_the_variable(tmp_path, monkeypatch, capsys):
    blocks = np.zeros((8, 4), dtype=np.int64)
    monkeypatch.delenv(progress.ENV, raising=False)
    list(calibration_batches(blocks, 2, torch.device("cpu"), "CALIBBAR"))
    _fit(tmp_path / "a")
    err = capsys.readouterr().err
    assert "CALIBBAR" in err and "TRAINBAR" in err  # drawn (stderr is not a terminal here, and still drawn)
    monkeypatch.setenv(progress.ENV, "1")
    list(calibration_batches(blocks, 2, torch.device("cpu"), "CALIBBAR"))
    _fit(tmp_path / "b")
    err = capsys.readouterr().err
    assert "CALIBBAR" not in err and "TRAINBAR" not in err
