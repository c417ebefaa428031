"""The stages' own keys for resumable state follow the config keys each really reads: a logging or
checkpoint-cadence change neither retrains a finished student nor throws away a half-trained run's checkpoints
(the base's pretraining, a student, evaluate's control), and resume stays exact; a change that shapes the
training (the learning rate) retrains and never resumes a checkpoint made before it."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch

from downscale import pipeline, train
from downscale.config import TrainConfig
from tiny import fake_data_run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BASE = {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
             "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 3,
                       "eval_batches": 1, "save_every": 2, "log_every": 1}}
SPECIALIZE = {"kd_ratio": 0.5, "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                                         "eval_every": 3, "eval_batches": 1, "save_every": 2, "log_every": 2}}


class Killed(Exception):
    pass


@contextlib.contextmanager
def killed_after(monkeypatch, step: int):
    """Inside the block, ``train.fit`` is killed after optimizer step ``step`` (the block must get killed)."""
    real_fit = train.fit

    def fit(*args, **kwargs):
        def on_step(done):
            if done == step:
                raise Killed

        return real_fit(*args, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(train, "fit", fit)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.setattr(train, "fit", real_fit)


def _changed(cfg, **values):
    """A copy of ``cfg`` with dotted keys set (``specialize__train__lr=...``)."""
    out = cfg.model_copy(deep=True)
    for dotted, value in values.items():
        *path, last = dotted.split("__")
        node = out
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return out


def _summary(folder) -> dict:
    return json.loads((folder / "train_summary.json").read_text())


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_key_ignores_exactly_the_trajectory_neutral_train_keys() -> None:
    sampler = train.BlockSampler([torch.zeros(10, 4).numpy()], 4, seed=0)
    tcfg = TrainConfig(max_steps=10)
    key = train.resume_key("h", tcfg, sampler)
    neutral = {"log_every": 1, "report_to": "tensorboard", "eval_every": 1, "eval_batches": 1, "save_every": 1,
               "keep_checkpoints": 5}
    for name, value in neutral.items():
        assert train.resume_key("h", tcfg.model_copy(update={name: value}), sampler) == key, name
    shaping = {"max_steps": 11, "batch_size": 2, "grad_accum": 2, "lr": 1e-4, "min_lr_ratio": 0.5, "warmup_steps": 3,
               "weight_decay": 0.0, "betas": (0.9, 0.99), "max_grad_norm": None}
    assert set(neutral) | set(shaping) == set(TrainConfig.model_fields)
    for name, value in shaping.items():
        assert train.resume_key("h", tcfg.model_copy(update={name: value}), sampler) != key, name
    assert train.resume_key("other", tcfg, sampler) != key
    for other in (train.BlockSampler([torch.zeros(10, 4).numpy()], 4, seed=1),
                  train.BlockSampler([torch.zeros(10, 4).numpy()], 8, seed=0),
                  train.BlockSampler([torch.zeros(12, 4).numpy()], 4, seed=0)):
        assert train.resume_key("h", tcfg, other) != key


def test_base_pretraining_resumes_after_a_logging_change_but_not_after_an_lr_change(tmp_path, monkeypatch) -> None:
    cfg = fake_data_run(tmp_path, base=TINY_BASE)  # 6 steps, a checkpoint every 2
    with killed_after(monkeypatch, 3):
        pipeline.run_stage(cfg, "base", log=lambda m: None)
    louder = _changed(cfg, base__train__log_every=2, base__train__eval_every=1, base__train__keep_checkpoints=4)
    pipeline.run_stage(louder, "base", log=lambda m: None)
    base = cfg.run_dir / "base"
    assert _summary(base)["resumed_from"] == 2
    resumed = _weights(base)
    # exact: the same weights as the base trained without interruption
    shutil.rmtree(cfg.run_dir / "work" / "base")
    pipeline.run_stage(louder, "base", force=True, log=lambda m: None)
    assert _summary(base)["resumed_from"] is None
    uninterrupted = _weights(base)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # another learning rate: re-runs, and does not take the checkpoint at step 6 made with the old one
    pipeline.run_stage(_changed(louder, base__train__lr=1e-3), "base", log=lambda m: None)
    assert _summary(base)["resumed_from"] is None


def test_specialize_keeps_students_and_checkpoints_across_logging_changes_not_lr_changes(tmp_path, monkeypatch) -> None:
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "max_steps": 8, "eval_every": 8, "save_every": 8}}
    compress = {"target_params": 0.6, "importance": "magnitude", "calibration_sequences": 4, "val_blocks": 2}
    cfg = fake_data_run(tmp_path, base=base, compress=compress, specialize=SPECIALIZE)
    for stage in ("base", "compress"):
        pipeline.run_stage(cfg, stage, log=lambda m: None)
    out = cfg.run_dir / "specialized" / "0"
    with killed_after(monkeypatch, 3):  # the checkpoint at step 2 is kept
        pipeline.run_stage(cfg, "specialize", part=0, log=lambda m: None)
    # logging and checkpoint cadence: the half-trained student resumes from its checkpoint
    louder = _changed(cfg, specialize__train__log_every=1, specialize__train__eval_every=2)
    pipeline.run_stage(louder, "specialize", part=0, log=lambda m: None)
    assert _summary(out)["resumed_from"] == 2
    trained = _weights(out)
    # ... and the finished student is not trained again
    logs: list[str] = []
    pipeline.run_stage(_changed(louder, specialize__train__keep_checkpoints=5, specialize__train__save_every=3,
                                specialize__kd_chunk_tokens=16), "specialize", part=0, log=logs.append)
    assert "[specialize] student 0 complete, skipped" in logs
    assert all(torch.equal(v, _weights(out)[k]) for k, v in trained.items())
    # another learning rate: the student is trained again, from the start (not from the checkpoint at step 6)
    logs.clear()
    pipeline.run_stage(_changed(louder, specialize__train__lr=1e-3), "specialize", part=0, log=logs.append)
    assert "[specialize] student 0 complete, skipped" not in logs
    assert _summary(out)["resumed_from"] is None
    assert any("ignoring checkpoints made with another config" in m for m in logs)


def test_control_resumes_after_logging_and_ledger_changes_but_not_after_a_control_lr_change(tmp_path,
                                                                                              monkeypatch) -> None:
    from downscale.stages import evaluate

    cfg = fake_data_run(tmp_path, base=TINY_BASE, specialize=SPECIALIZE, evaluate={"control": True})
    pipeline.run_stage(cfg, "base", log=lambda m: None)
    for i in range(cfg.num_students):  # what the control reads of the students: the tokens they consumed
        folder = cfg.run_dir / "specialized" / str(i)
        folder.mkdir(parents=True)
        (folder / "train_summary.json").write_text(json.dumps({"tokens": 2 * 4 * 32}))  # 3 x 2 steps: 6 steps
    logs: list[str] = []

    def control(c):
        logs.clear()
        ctx = pipeline.StageContext(cfg=c, run_dir=c.run_dir, staging=tmp_path / "staging", stage="evaluate",
                                    log=logs.append)
        return evaluate.train_control(ctx, torch.device("cpu"), None)[1]

    with killed_after(monkeypatch, 3):
        control(cfg)
    louder = _changed(cfg, specialize__train__log_every=1, specialize__train__keep_checkpoints=3,
                      evaluate__device_watts=300.0, evaluate__batch_size=2)
    assert control(louder)["steps"] == 6
    assert any("resuming from checkpoint at step 2" in m for m in logs), logs
    control(_changed(louder, evaluate__control_lr=1e-3))
    assert not any("resuming" in m for m in logs), logs
    assert any("ignoring checkpoints made with another config" in m for m in logs), logs
