"""The shared training loop: deterministic data order, schedule, exact resume, NaN guard, base stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from downscale import pipeline, train
from downscale.data.blocks import open_split
from tiny import fake_data_run, tiny_model


def _sources():
    return [np.arange(40 * 4).reshape(40, 4), 1000 + np.arange(10 * 4).reshape(10, 4)]


def test_sampler_is_a_pure_function_of_seed_and_step() -> None:
    a, b = train.BlockSampler(_sources(), 8, seed=1), train.BlockSampler(_sources(), 8, seed=1)
    assert all(torch.equal(a.batch(s)["input_ids"], b.batch(s)["input_ids"]) for s in (0, 3, 17))
    other = train.BlockSampler(_sources(), 8, seed=2)
    assert not torch.equal(a.batch(0)["input_ids"], other.batch(0)["input_ids"])
    # one epoch of the union covers every block exactly once (50 blocks, batches of 10)
    c = train.BlockSampler(_sources(), 10, seed=0)
    seen = [tuple(x) for s in range(5) for x in zip(*c.indices(s), strict=True)]
    assert len(set(seen)) == 50
    # rows of the global batch do not depend on how they are split among ranks / micro-batches
    full = a.batch(5)["input_ids"]
    halves = torch.cat([a.batch(5, slice(0, 4))["input_ids"], a.batch(5, slice(4, 8))["input_ids"]])
    assert torch.equal(full, halves)


def test_sampler_fractions_mix_sources_in_every_batch() -> None:
    s = train.BlockSampler(_sources(), 10, seed=0, fractions=[0.8, 0.2])
    for step in range(7):
        src, _ = s.indices(step)
        assert (src == 0).sum() == 8 and (src == 1).sum() == 2
    with pytest.raises(ValueError):
        train.BlockSampler([np.zeros((0, 4))], 4, seed=0)


def test_cosine_schedule_with_warmup() -> None:
    from downscale.config import TrainConfig

    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:], strict=False))  # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def _fit(cfg, tmp, on_step=None, model=None):
    from downscale.config import TrainConfig

    tcfg = TrainConfig(max_steps=7, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2, save_every=2,
                       eval_every=3, eval_batches=1, log_every=1, keep_checkpoints=2)
    blocks = open_split(cfg.run_dir, "code", "train")
    model = model or tiny_model(vocab_size=300)
    model.train()
    acc = train.make_accelerator(torch.device("cpu"), None)
    sampler = train.BlockSampler([blocks], 4, seed=0)
    val = lambda m: {"loss": 0.0}  # noqa: E731
    res = train.fit(model, cfg=tcfg, sampler=sampler, loss_fn=train.causal_lm_loss, work_dir=tmp, accelerator=acc,
                    validate=val, log=lambda m: None, config_hash="h", on_step=on_step)
    return model, res


def test_killed_run_resumes_to_identical_weights(tmp_path) -> None:
    cfg = fake_data_run(tmp_path)
    ref, ref_res = _fit(cfg, tmp_path / "a")
    start = {n: p.detach().clone() for n, p in tiny_model(vocab_size=300).named_parameters()}
    assert all(not torch.equal(start[n], p) for n, p in ref.named_parameters()), "every parameter trains"

    class Killed(Exception):
        pass

    def kill(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        _fit(cfg, tmp_path / "b", on_step=kill)
    ckpts = train.list_checkpoints(tmp_path / "b" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004"]  # kept 2; step 5 not saved
    resumed, res = _fit(cfg, tmp_path / "b")
    assert res.resumed_from == 4
    for (n, p), (_, q) in zip(ref.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    # the metrics of the lost steps were dropped and written again: one line per step, in order
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 8))


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_scheduler_signal_checkpoints_the_step_and_stops_then_resumes_exactly(tmp_path, signame) -> None:
    """SLURM's preemption / requeue (SIGTERM) and its time-limit warning (--signal=USR1): the step in progress
    finishes, is checkpointed (save_every is 2, the signal comes at step 5), fit raises Preempted; the next run
    resumes from step 5 to the uninterrupted run's weights. The handlers are the previous ones afterwards."""
    import os
    import signal

    from downscale.errors import Preempted

    cfg = fake_data_run(tmp_path)
    ref, _ = _fit(cfg, tmp_path / "a")
    sig = getattr(signal, signame)
    before = signal.getsignal(sig)

    def send(step):
        if step == 5:
            os.kill(os.getpid(), sig)

    with pytest.raises(Preempted, match=f"{signame} received: stopped after step 5 of 7"):
        _fit(cfg, tmp_path / "b", on_step=send)
    assert signal.getsignal(sig) == before
    assert [p.name for p in train.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000004",
                                                                                         "step-00000005"]
    resumed, res = _fit(cfg, tmp_path / "b")
    assert res.resumed_from == 5
    for (n, p), (_, q) in zip(ref.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_checkpoint_of_another_config_is_ignored(tmp_path) -> None:
    cfg = fake_data_run(tmp_path)
    _fit(cfg, tmp_path / "w")
    from downscale.config import TrainConfig

    model = tiny_model(vocab_size=300)
    acc = train.make_accelerator(torch.device("cpu"), None)
    tcfg = TrainConfig(max_steps=2, batch_size=4, save_every=1)
    sampler = train.BlockSampler([open_split(cfg.run_dir, "code", "train")], 4, seed=0)
    res = train.fit(model, cfg=tcfg, sampler=sampler, loss_fn=train.causal_lm_loss, work_dir=tmp_path / "w",
                    accelerator=acc, log=lambda m: None, config_hash="other")
    assert res.resumed_from is None


def test_nan_guard_names_the_step_and_keeps_the_last_checkpoint(tmp_path) -> None:
    cfg = fake_data_run(tmp_path)
    from downscale.config import TrainConfig

    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, stats = train.causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] >= 4 else loss), stats

    tcfg = TrainConfig(max_steps=10, batch_size=4, save_every=2)
    sampler = train.BlockSampler([open_split(cfg.run_dir, "code", "train")], 4, seed=0)
    with pytest.raises(train.TrainingDiverged, match="at step 4") as info:
        train.fit(tiny_model(vocab_size=300), cfg=tcfg, sampler=sampler, loss_fn=loss_fn, work_dir=tmp_path / "w",
                  accelerator=train.make_accelerator(torch.device("cpu"), None), log=lambda m: None)
    assert "step 2" in str(info.value)
    assert [p.name for p in train.list_checkpoints(tmp_path / "w" / "checkpoints")] == ["step-00000002"]


def test_a_loss_not_finite_at_the_first_step_names_the_inputs_not_the_learning_rate(tmp_path) -> None:
    """Before any update, a NaN loss is an input's fault (garbled weights, teacher or data): the message names what
    the caller says the loss reads; after a resume it names the checkpoint too."""
    cfg = fake_data_run(tmp_path)
    from downscale.config import TrainConfig

    state = {"nan_from": 0, "n": 0, "kill_at": None}

    def loss_fn(model, batch):
        state["n"] += 1
        if state["n"] == state["kill_at"]:
            raise KeyboardInterrupt
        loss, stats = train.causal_lm_loss(model, batch)
        return (loss * float("nan") if state["n"] > state["nan_from"] else loss), stats

    def fit(steps):
        return train.fit(tiny_model(vocab_size=300), cfg=TrainConfig(max_steps=steps, batch_size=4, save_every=2),
                         sampler=train.BlockSampler([open_split(cfg.run_dir, "code", "train")], 4, seed=0),
                         loss_fn=loss_fn, work_dir=tmp_path / "w", log=lambda m: None, inputs="THE-INPUTS",
                         accelerator=train.make_accelerator(torch.device("cpu"), None))

    with pytest.raises(train.TrainingDiverged, match="first step") as info:
        fit(4)
    assert "learning rate is not the cause" in str(info.value) and "THE-INPUTS" in str(info.value)
    state.update(nan_from=99, n=0, kill_at=5)
    with pytest.raises(KeyboardInterrupt):
        fit(8)  # 4 good steps, checkpoints at 2 and 4, then interrupted
    state.update(nan_from=0, n=0, kill_at=None)
    with pytest.raises(train.TrainingDiverged, match="after resuming from step 4") as info:
        fit(8)
    assert "step-00000004" in str(info.value)


def test_base_stage_pretrains_saves_and_reloads(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = fake_data_run(tmp_path)
    entry = pipeline.run_stage(cfg, "base", log=lambda m: None)
    assert entry["status"] == "complete"
    base = cfg.run_dir / "base"
    summary = json.loads((base / "train_summary.json").read_text())
    assert set(summary["val_loss"]) == {"code", "legal", "prose", "pooled"}
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config.vocab_size == 300 and model.config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(base).eos_token_id == 0
    assert (base / "model.safetensors").exists() and (base / "metrics.jsonl").exists()
    assert not list(base.glob("*.bin")) and not list(base.glob("*.pt"))
    # complete with the same config: skipped; another base config: stale
    assert pipeline.stage_status(cfg, pipeline.get_stage("base"))[0] == "complete"
    other = cfg.model_copy(deep=True)
    other.base.train.lr = 1e-4
    assert pipeline.stage_status(other, pipeline.get_stage("base")) == (
        "stale", "config changed: base.train.lr (0.003 -> 0.0001)")
    # what pretraining does not read: logging and checkpoint cadence
    quiet = cfg.model_copy(deep=True)
    quiet.base.train.log_every, quiet.base.train.save_every = 5, 3
    assert pipeline.stage_status(quiet, pipeline.get_stage("base"))[0] == "complete"


def test_tensorboard_tracker_receives_the_metrics(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = fake_data_run(tmp_path)
    cfg.base.train.report_to = "tensorboard"
    pipeline.run_stage(cfg, "base", log=lambda m: None)
    events = list((cfg.run_dir / "work" / "base").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss" in tags, tags
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 7))
    assert "val/loss/code" in tags and "val/loss/pooled" in tags, tags  # validation per shard


def test_fused_causal_lm_equals_the_hf_loss_and_gradients() -> None:
    """The control's objective: FusedCausalLM (CE fused with the head, chunk by chunk) gives HF's shifted
    next-token loss and the same gradient for every parameter, without the [B, T, V] logits."""
    from tiny import tiny_model

    ids = torch.randint(1, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    hf = tiny_model("llama", seed=3, vocab_size=128).train()
    fused = train.FusedCausalLM(tiny_model("llama", seed=3, vocab_size=128).train())
    ref = hf(input_ids=ids, labels=ids).loss
    ref.backward()
    loss, stats = train.fused_causal_lm_loss(fused, {"input_ids": ids})
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6) and stats == {}
    grads = {n: p.grad for n, p in hf.named_parameters()}
    for name, p in fused.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4)
    assert fused._no_split_modules == ["LlamaDecoderLayer"]


def _full_logits_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    return float(-logp.gather(-1, ids[:, 1:, None]).sum())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_nll_applies_the_head_chunk_by_chunk_and_equals_the_full_logits(arch, monkeypatch) -> None:
    """Validation / calibration / evaluation scoring: the LM head runs on chunks of positions (no [B, T, V]
    logits at a 128k vocabulary) and the summed NLL equals the one from the model's full logits; a wrapper
    that scores itself (FusedCausalLM, the base stage's FSDP root) gives the same through its own forward."""
    from downscale import models

    model = tiny_model(arch, seed=4, vocab_size=128)
    ids = torch.randint(1, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    ref = _full_logits_nll(model, ids)
    rows = []
    model.lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape))  # must never run
    monkeypatch.setattr(models, "nll_chunk_tokens", lambda vocab, n=1, budget=0: 16)
    chunks = []
    real_ce = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda z, *a, **k: chunks.append(tuple(z.shape)) or real_ce(z, *a, **k))
    total, count = models.block_nll(model, ids, torch.device("cpu"))
    assert count == 3 * 19 and rows == []
    assert chunks == [(16, 128)] * 3 + [(9, 128)]  # 57 positions in chunks of 16, never [B, T, V]
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real_ce)
    assert total == pytest.approx(ref, rel=1e-6)
    # chunks of 16 of the 57 positions: 4 chunks, the same sum
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
    assert float(models.chunked_nll_sum(h, model.lm_head.weight, ids[:, 1:].reshape(-1), 16)) == \
        pytest.approx(ref, rel=1e-6)
    wrapped = train.FusedCausalLM(model)
    assert models.block_nll(wrapped, ids, torch.device("cpu")) == (pytest.approx(ref, rel=1e-6), count)
    # under bf16 autocast (validation of the base stage, also wrapped in autocast by accelerate) the head products
    # stay fp32: the wrapper and the plain model score alike, and so does a prepared wrapper
    bf16 = torch.bfloat16
    plain = models.block_nll(model, ids, torch.device("cpu"), bf16)[0]
    assert models.block_nll(wrapped, ids, torch.device("cpu"), bf16)[0] == plain
    acc = train.make_accelerator(torch.device("cpu"), bf16)
    inner = acc.unwrap_model(acc.prepare(train.FusedCausalLM(model)))
    with torch.no_grad():
        assert float(inner(ids, score=True)[0]) == plain
    assert models.mean_nll(wrapped, ids.numpy(), 2, torch.device("cpu"))[0] == pytest.approx(ref / count, rel=1e-6)


def test_block_nll_runs_the_whole_model_when_the_head_cannot_be_split() -> None:
    """A head with a bias (or an unsupported architecture) is not ``head(decoder(x))`` as split_head needs: the
    model's own forward scores it."""
    from downscale import models

    model = tiny_model("llama", seed=5, vocab_size=128)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, 128, bias=True)
    torch.nn.init.normal_(model.lm_head.bias, std=1.0)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    assert models.split_head(model) is None
    assert models.block_nll(model, ids, torch.device("cpu"))[0] == pytest.approx(_full_logits_nll(model, ids),
                                                                                 rel=1e-6)


def _fp16_fit(tmp_path, init_scale: float):
    """fit under fp16 with a GradScaler, as accelerate sets it up on CUDA; here on the CPU (fp16 autocast), with
    a scale so large that the first steps' scaled gradients overflow."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from downscale.config import TrainConfig

    cfg = fake_data_run(tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)  # as make_accelerator does between models
    GradientState._reset_state()
    acc = Accelerator(mixed_precision="fp16", cpu=True)  # accelerate gives no scaler on a CPU: add torch's
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=init_scale), True
    model = tiny_model(vocab_size=300).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs: list[str] = []
    tcfg = TrainConfig(max_steps=10, batch_size=4, save_every=100, max_grad_norm=1.0)
    res = train.fit(model, cfg=tcfg, sampler=train.BlockSampler([open_split(cfg.run_dir, "code", "train")], 4, seed=0),
                    loss_fn=train.causal_lm_loss, work_dir=tmp_path / "w", accelerator=acc, log=logs.append,
                    config_hash="h")
    return model, start, res, logs, acc


def test_fp16_overflow_skips_the_step_instead_of_calling_it_divergence(tmp_path) -> None:
    """With fp16's GradScaler an overflowing step is normal (the scaler skips it and lowers its scale); fit goes on
    instead of raising TrainingDiverged, and the weights train once the scale fits."""
    model, start, res, logs, acc = _fp16_fit(tmp_path, 2.0**22)
    skipped = [m for m in logs if "fp16 gradients overflowed" in m]
    assert skipped and skipped[0].startswith("[train] step 1:") and res.steps == 10
    assert acc.scaler.get_scale() < 2.0**22
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters())


def test_fp16_overflow_in_every_step_is_divergence(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train, "MAX_SKIPPED_STEPS", 2)
    with pytest.raises(train.TrainingDiverged, match=r"at step 2 .*2 fp16 steps in a row overflowed"):
        _fp16_fit(tmp_path, 2.0**22)


def test_process_group_timeout_is_long_and_settable(monkeypatch) -> None:
    """Ranks wait at a barrier while rank 0 builds a teacher cache (hours at 8B): the collectives' timeout is 4 h by
    default (NCCL's own is 10 min), DOWNSCALE_DIST_TIMEOUT_S sets it, a bad value is one clear line."""
    monkeypatch.delenv("DOWNSCALE_DIST_TIMEOUT_S", raising=False)
    assert train._process_group_timeout().timeout.total_seconds() == 4 * 3600
    monkeypatch.setenv("DOWNSCALE_DIST_TIMEOUT_S", "90")
    assert train._process_group_timeout().timeout.total_seconds() == 90
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("DOWNSCALE_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="DOWNSCALE_DIST_TIMEOUT_S: expected a positive number"):
            train._process_group_timeout()
    monkeypatch.delenv("DOWNSCALE_DIST_TIMEOUT_S")
    acc = train.make_accelerator(torch.device("cpu"), None)  # the handler is accepted (used when launched)
    assert acc.num_processes == 1


def test_resume_keeps_this_runs_optimizer_kernel(tmp_path) -> None:
    """A checkpoint made with fused AdamW (one CUDA GPU) resumed elsewhere (a CPU, or under FSDP) keeps the kernel
    choice of the resuming run: the saved param_groups' fused / foreach flags are not restored."""
    cfg = fake_data_run(tmp_path)
    _fit(cfg, tmp_path / "a")
    ckpt = train.list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    meta_path = ckpt / "optimizer.json"
    meta = json.loads(meta_path.read_text())
    for g in meta["param_groups"]:
        g.update(fused=True, foreach=True)
    meta_path.write_text(json.dumps(meta))
    from downscale.config import TrainConfig

    model = tiny_model(vocab_size=300)
    opt = train.make_optimizer(model, TrainConfig(max_steps=1))
    train.load_checkpoint(ckpt, model, opt)
    assert all(g["foreach"] is False and not g["fused"] for g in opt.param_groups)
    assert opt.state  # the moments were loaded
