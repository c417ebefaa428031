"""The one training loop: base pretraining, specialization (distillation), and the compute-matched control.

Built on accelerate, so the same code runs in one process (CPU or GPU) and under
``accelerate launch`` (DDP, FSDP). What it does each optimizer step:

    global batch = batch_size x grad_accum x world_size blocks, a pure function of (seed, step)
    for each of grad_accum micro-batches (this rank's rows): loss_fn -> backward (no DDP sync until the last)
    clip -> NaN/inf guard -> AdamW step with the cosine-with-warm-up learning rate of this step

Exact resume: a checkpoint (every ``save_every`` steps, atomically written, the newest
``keep_checkpoints`` kept) holds the trainable parameters and the AdamW state (by parameter name, full
tensors, gathered from the shards under FSDP) as safetensors and the step, token count and RNG state
as JSON. Because the batch of step s depends only on the seed and s, and the learning rate only on s,
a run killed and restarted ends with the same weights as one that was never interrupted. No pickle is
written or read. A model trained sharded also comes back as ``FitResult.full_state`` (full weights on
every rank) for a plain copy to evaluate and save.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downscale._io import write_json_atomic
from downscale.errors import Preempted
from downscale.pipeline import TRAIN_MONITORING

CKPT_PREFIX = "step-"


class _StopSignals:
    """While active (main thread only): SIGTERM and SIGUSR1 set ``received`` instead of killing the process, so the
    loop can finish its step and write a checkpoint. Restores the previous handlers on exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> _StopSignals:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _stop_requested(stop: _StopSignals, accelerator: Any, world: int) -> bool:
    """Whether any rank received a stop signal (all ranks agree, so they checkpoint and stop at the same step)."""
    if world == 1:
        return stop.received is not None
    flag = torch.tensor([1.0 if stop.received else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


# With fp16's GradScaler, this many overflowing (skipped) steps in a row count as divergence.
MAX_SKIPPED_STEPS = 20


# --------------------------------------------------------------------------- data order


class BlockSampler:
    """Deterministic batches of packed blocks from one or more sources.

    ``fractions=None``: every batch is drawn from the union of the sources (one epoch-wise
    permutation over all blocks). Otherwise source i contributes ``round(fractions[i] * batch)``
    rows of every batch (the first source takes the remainder), each source cycling through its
    own epoch-wise permutations: that is how replay of other shards is mixed in. Row r of the
    batch of step s is the same whatever the world size, so runs with the same global batch see
    the same data.
    """

    def __init__(self, sources: Sequence[np.ndarray], global_batch: int, seed: int,
                 fractions: Sequence[float] | None = None):
        self.sources = [s for s in sources]
        if not self.sources or any(len(s) == 0 for s in self.sources):
            raise ValueError("every source of blocks must be non-empty")
        self.global_batch = global_batch
        self.seed = seed
        if fractions is None:
            self.counts = None
            self._offsets = np.cumsum([0] + [len(s) for s in self.sources])
        else:
            if len(fractions) != len(self.sources):
                raise ValueError("one fraction per source")
            counts = [int(round(f * global_batch)) for f in fractions]
            counts[0] = global_batch - sum(counts[1:])
            if counts[0] < 1:
                raise ValueError("the first source must get at least one row of every batch")
            self.counts = counts
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, source: int, epoch: int, n: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 16:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, source, epoch])
            self._perm_cache[key] = rng.permutation(n)
        return self._perm_cache[key]

    def _take(self, source: int, n_total: int, start: int, count: int) -> np.ndarray:
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // n_total):
            sel = pos // n_total == epoch
            out[sel] = self._perm(source, int(epoch), n_total)[pos[sel] % n_total]
        return out

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, block index) of every row of the global batch of ``step``."""
        if self.counts is None:
            n_total = int(self._offsets[-1])
            flat = self._take(0, n_total, step * self.global_batch, self.global_batch)
            src = np.searchsorted(self._offsets, flat, side="right") - 1
            return src, flat - self._offsets[src]
        srcs, idxs = [], []
        for i, (source, count) in enumerate(zip(self.sources, self.counts, strict=True)):
            if count:
                srcs.append(np.full(count, i))
                idxs.append(self._take(i, len(source), step * count, count))
        return np.concatenate(srcs), np.concatenate(idxs)

    def batch(self, step: int, rows: slice | None = None) -> dict[str, torch.Tensor]:
        """The blocks of ``step`` (optionally only ``rows`` of the global batch)."""
        src, idx = self.indices(step)
        if rows is not None:
            src, idx = src[rows], idx[rows]
        tokens = np.stack([np.asarray(self.sources[s][i], dtype=np.int64) for s, i in zip(src, idx, strict=True)])
        return {"input_ids": torch.from_numpy(tokens), "source": torch.from_numpy(src),
                "block": torch.from_numpy(idx)}


# --------------------------------------------------------------------------- schedule and optimizer


def lr_at(step: int, cfg: Any) -> float:
    """Cosine schedule with linear warm-up: the learning rate used for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: Any, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on norms, biases and other 1-D tensors.
    ``fused``: torch's fused CUDA kernel (one launch for all parameters; fit uses it on CUDA unless the model
    will be sharded by FSDP); otherwise one parameter at a time on a CPU (measured faster there than foreach) and
    torch's default (foreach) on CUDA."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    kind = {"fused": True} if fused else {"foreach": False} if on_cpu else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), **kind)


# --------------------------------------------------------------------------- checkpoints (no pickle)


CKPT_FORMAT = 2  # 2: optimizer state keyed by parameter name (full tensors), so FSDP-sharded runs resume too


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter is a DTensor (the model was sharded by FSDP2)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of ``t``; a DTensor shard is all-gathered first (a collective: every rank must call)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as full CPU tensors on every rank (under FSDP a collective, one tensor at a time so
    the accelerator never holds more than one full tensor besides the shards)."""
    return {name: _full(t) for name, t in model.state_dict().items()}


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


def _dcp_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int, write: bool = True) -> Path | None:
    """Write checkpoint ``step`` atomically (temp folder + rename); prune to the newest ``keep``.

    Every rank must call it (the full weights and optimizer state are gathered from FSDP shards); only the
    rank with ``write`` writes. The optimizer state is stored by parameter name, as full tensors."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not write and not is_sharded(model):  # nothing to gather: the writing rank holds every tensor
        return None
    weights = _trainable_state(model)
    opt_sd = get_optimizer_state_dict(model, optimizer, options=_dcp_options(cpu_offload=True))
    if not write:
        return None
    final = ckpt_root / f"{CKPT_PREFIX}{step:08d}"
    tmp = ckpt_root / f".tmp-{CKPT_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / "trainable.safetensors")
    tensors = {}
    for name, pstate in opt_sd["state"].items():
        for key, val in pstate.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"{key}/{name}"] = t.detach().to("cpu").contiguous()
    save_file(tensors, tmp / "optimizer.safetensors")
    write_json_atomic(tmp / "optimizer.json", {"param_groups": opt_sd["param_groups"]})
    write_json_atomic(tmp / "state.json", {**state, "step": step, "format": CKPT_FORMAT,
                                           "torch_rng": torch.get_rng_state().tolist()})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.exists():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
                  and (p / "state.json").exists())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable parameters, AdamW state and the torch RNG; return the saved state dict. Every rank
    calls it, after the model is prepared (full tensors are re-sharded to FSDP's layout where it is sharded)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    params = dict(model.named_parameters())
    weights = load_file(path / "trainable.safetensors")
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks trainable parameter {missing[0]}")
    set_model_state_dict(model, weights, options=_dcp_options(strict=False))
    opt_state: dict[str, dict] = {}
    for key, tensor in load_file(path / "optimizer.safetensors").items():
        name, param = key.split("/", 1)
        opt_state.setdefault(param, {})[name] = tensor
    groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
    # how the update runs (fused on one CUDA GPU, per tensor on a CPU) belongs to this run, not to the checkpoint:
    # a run resumed on other hardware or under FSDP keeps the kernel choice make_optimizer made for it
    kernel = ("fused", "foreach", "capturable", "differentiable")
    now = optimizer.param_groups[0]
    groups = [{**g, **{k: now[k] for k in kernel if k in now}} for g in groups]
    set_optimizer_state_dict(model, optimizer, {"state": opt_state, "param_groups": groups}, options=_dcp_options())
    state = json.loads((path / "state.json").read_text())
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state


# --------------------------------------------------------------------------- the loop


# Keys of a TrainConfig that never change the weights a run ends with: the pipeline's monitoring keys (what is
# logged and when, how often state is saved and how much of it is kept) and eval_batches (validation neither
# touches the weights nor draws from an RNG). A checkpoint made under other values of them is resumed; every
# other key, max_steps included (the cosine schedule spans it), is part of the checkpoint's key.
TRAJECTORY_NEUTRAL = (*TRAIN_MONITORING, "eval_batches")
# r1: the caller's hash, the loop's settings and the data order (``resume_key``). Before it, a checkpoint recorded
# the caller's hash alone (whole config sections): such a checkpoint is not resumed, and the run starts afresh once.
RESUME_KEY_VERSION = 1


def resume_key(config_hash: str, cfg: Any, sampler: BlockSampler) -> str:
    """What a checkpoint must have been made with for ``fit`` to resume from it: the caller's ``config_hash``
    (what the loss and the starting weights depend on), every key of ``cfg`` that shapes the trajectory (all but
    ``TRAJECTORY_NEUTRAL``) and the sampler's data order (seed, global batch, mix, the sources' sizes)."""
    import hashlib

    dump = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(vars(cfg))
    loop = {k: v for k, v in dump.items() if k not in TRAJECTORY_NEUTRAL}
    order = {"seed": sampler.seed, "global_batch": sampler.global_batch, "counts": sampler.counts,
             "sources": [[int(n) for n in s.shape] for s in sampler.sources]}
    payload = json.dumps({"caller": config_hash, "loop": loop, "order": order}, sort_keys=True, default=str)
    return f"r{RESUME_KEY_VERSION}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"



@dataclass
class FitResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    resumed_from: int | None
    final_val: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    peak_memory_kind: str = ""
    history: list[dict] = field(default_factory=list)
    # set when the model was trained sharded (FSDP): its full state dict, CPU tensors, on every rank
    full_state: dict[str, torch.Tensor] | None = None


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB: CUDA max allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def fit(model: torch.nn.Module, *, cfg: Any, sampler: BlockSampler,
        loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
        work_dir: Path, accelerator: Any, validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        desc: str = "train", log: Callable[[str], None] = print, config_hash: str = "",
        on_step: Callable[[int], None] | None = None, inputs: str = "") -> FitResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps (a ``TrainConfig``), resuming from the
    newest checkpoint in ``work_dir/checkpoints`` made with the same ``resume_key``: the same ``config_hash``
    (the caller's: whatever the loss and the starting weights depend on), the same loop settings (a change in a
    ``TRAJECTORY_NEUTRAL`` key, logging or checkpoint cadence, still resumes) and the same data order.

    ``loss_fn(model, micro_batch) -> (loss, stats)``: the mean loss of one micro-batch (``stats``
    are floats averaged into the logs). ``validate(model) -> {name: value}`` runs every
    ``eval_every`` steps and at the end, on the main process's model. ``on_step(step)`` is called
    after each optimizer step (tests use it to simulate a kill). ``inputs``: what the loss reads (the starting
    weights, the teacher, the data), named when the loss is not finite at the first step. ``accelerator`` is an
    ``accelerate.Accelerator``: ``model`` must not be prepared yet.
    """
    from downscale import progress

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = work_dir / "checkpoints"
    metrics_path = work_dir / "metrics.jsonl"
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.batch_size
    if sampler.global_batch != micro * cfg.grad_accum * world:
        raise ValueError(f"sampler batch {sampler.global_batch} != batch_size x grad_accum x world "
                         f"({micro} x {cfg.grad_accum} x {world})")

    fsdp = "FSDP" in str(getattr(accelerator, "distributed_type", ""))
    optimizer = make_optimizer(model, cfg, fused=accelerator.device.type == "cuda" and not fsdp)
    # fp16 (CUDA only): the GradScaler skips steps whose scaled gradients overflowed (normal while it finds its
    # scale); such a step is not divergence unless it keeps happening
    scaler = getattr(accelerator, "scaler", None)
    skipped_in_a_row = 0
    start, tokens, resumed_from, history = 0, 0, None, []
    config_hash = resume_key(config_hash, cfg, sampler)
    ckpts = list_checkpoints(ckpt_root)
    resume = None
    if ckpts:
        saved = json.loads((ckpts[-1] / "state.json").read_text())
        if saved.get("config_hash") == config_hash and saved.get("format") == CKPT_FORMAT:
            resume = ckpts[-1]
        else:
            why = "another config" if saved.get("config_hash") != config_hash else "an older checkpoint format"
            log(f"[{desc}] ignoring checkpoints made with {why}; starting afresh")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(ckpt_root, ignore_errors=True)
    model_p, optimizer_p = accelerator.prepare(model, optimizer)
    inner_model = accelerator.unwrap_model(model_p)
    inner_opt = optimizer_p.optimizer if hasattr(optimizer_p, "optimizer") else optimizer_p
    if resume is not None:  # after prepare: under FSDP the full tensors are loaded into the shards
        state = load_checkpoint(resume, inner_model, inner_opt)
        start, tokens, resumed_from = state["step"], state["tokens"], state["step"]
        log(f"[{desc}] resuming from checkpoint at step {start}")
    if accelerator.is_main_process:
        _trim_metrics(metrics_path, start)
    device = accelerator.device
    if device.type == "cuda":  # this run's peak, not the one of whatever ran before in the process
        torch.cuda.reset_peak_memory_stats(device)

    tokens_per_step = sampler.global_batch * sampler.sources[0].shape[1]
    bar = progress.bar(total=cfg.max_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                       disable=not accelerator.is_local_main_process, mininterval=1.0)
    t0, window_t, window_tok = time.time(), time.time(), 0
    stats_acc: dict[str, float] = {}
    final_val: dict[str, float] = {}
    last_good = start
    model_p.train()
    with _StopSignals() as stop:  # a scheduler's SIGTERM / SIGUSR1: checkpoint, then stop
        for step in range(start, cfg.max_steps):
            lr = lr_at(step, cfg)
            for group in optimizer_p.param_groups:
                group["lr"] = lr
            step_stats: dict[str, float] = {}
            for k in range(cfg.grad_accum):
                # rows of this micro-batch for this rank: [k, rank] block of the global batch
                first = (k * world + rank) * micro
                batch = sampler.batch(step, slice(first, first + micro))
                batch = {key: val.to(device) for key, val in batch.items()}
                sync = k == cfg.grad_accum - 1
                ctx = accelerator.no_sync(model_p) if (not sync and world > 1) else _null()
                with ctx:
                    with accelerator.autocast():
                        loss, stats = loss_fn(model_p, batch)
                    accelerator.backward(loss / cfg.grad_accum)
                for key, val in {"loss": float(loss.detach()), **stats}.items():
                    step_stats[key] = step_stats.get(key, 0.0) + float(val) / cfg.grad_accum
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(model_p.parameters(), cfg.max_grad_norm))
            bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
            overflowed = bad_grad and (scaler is None or skipped_in_a_row + 1 >= MAX_SKIPPED_STEPS)
            bad = not math.isfinite(step_stats["loss"]) or overflowed
            if bad:
                bar.close()
                if step == start and scaler is None:  # before any update: the inputs, not the learning rate
                    first = "the first step" if start == 0 else f"the first step after resuming from step {start}"
                    raise TrainingDiverged(
                        f"{desc}: the loss is not finite at {first} (loss {step_stats['loss']}, grad norm "
                        f"{grad_norm}), "
                        f"before any weight update: the learning rate is not the cause; check what the loss reads: "
                        + (inputs or "the starting weights and the data")
                        + ("" if start == 0 else f", and the checkpoint {ckpt_root}/{CKPT_PREFIX}{start:08d}"))
                raise TrainingDiverged(
                    f"{desc}: loss or gradient norm is not finite at step {step + 1} (loss {step_stats['loss']}, "
                    f"grad norm {grad_norm}); the last good checkpoint (step {last_good}) is kept in {ckpt_root}; "
                    + (f"{MAX_SKIPPED_STEPS} fp16 steps in a row overflowed; lower the learning rate"
                       if bad_grad and scaler is not None and math.isfinite(step_stats["loss"])
                       else "lower the learning rate or enable clipping"))
            optimizer_p.step()
            if scaler is not None and bad_grad:  # GradScaler.step skipped it and lowered the scale
                skipped_in_a_row += 1
                log(f"[{desc}] step {step + 1}: fp16 gradients overflowed; step skipped, loss scale lowered to "
                    f"{scaler.get_scale():g}")
            else:
                skipped_in_a_row = 0
            optimizer_p.zero_grad(set_to_none=True)
            done = step + 1
            tokens += tokens_per_step
            window_tok += tokens_per_step
            for key, val in step_stats.items():
                stats_acc[key] = stats_acc.get(key, 0.0) + val
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                n_log = cfg.log_every if done % cfg.log_every == 0 else (done % cfg.log_every)
                elapsed = max(time.time() - window_t, 1e-9)
                row = {"step": done, "lr": lr, "tokens": tokens, "tokens_per_s": window_tok / elapsed,
                       **{k: v / n_log for k, v in stats_acc.items()}}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                history.append(row)
                _emit(accelerator, metrics_path, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                stats_acc, window_t, window_tok = {}, time.time(), 0
            if validate is not None and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                model_p.eval()
                val = validate(inner_model)
                _reshard(inner_model)
                model_p.train()
                final_val = val
                row = {"step": done, "tokens": tokens, **{f"val/{k}": v for k, v in val.items()}}
                history.append(row)
                _emit(accelerator, metrics_path, row)
                log(f"[{desc}] step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if done % cfg.save_every == 0 or done == cfg.max_steps:
                # every rank gathers (FSDP shards), the main process writes
                save_checkpoint(ckpt_root, done, inner_model, inner_opt, {"tokens": tokens, "config_hash": config_hash},
                                keep=cfg.keep_checkpoints, write=accelerator.is_main_process)
                accelerator.wait_for_everyone()
                last_good = done
            if on_step is not None:
                on_step(done)
            if _stop_requested(stop, accelerator, world) and done < cfg.max_steps:
                if last_good != done:  # finish what the step did: its checkpoint, then stop
                    save_checkpoint(ckpt_root, done, inner_model, inner_opt,
                                    {"tokens": tokens, "config_hash": config_hash},
                                    keep=cfg.keep_checkpoints, write=accelerator.is_main_process)
                    accelerator.wait_for_everyone()
                bar.close()
                raise Preempted(f"{desc}: {stop.received or 'a stop signal'} received: stopped after step {done} of "
                                f"{cfg.max_steps} with its checkpoint in {ckpt_root}; run the same command again (or "
                                f"requeue the job) to resume from it")
    bar.close()
    seconds = time.time() - t0
    run_tokens = tokens - (resumed_from or 0) * tokens_per_step
    mem, kind = peak_memory(device)
    accelerator.end_training() if getattr(accelerator, "trackers", None) else None
    # trained sharded (FSDP): the full weights on every rank, for the stage's plain copy (``models.plain_copy``)
    full_state = gathered_state(inner_model) if is_sharded(inner_model) else None
    return FitResult(steps=cfg.max_steps, tokens=tokens, seconds=seconds,
                     tokens_per_s=run_tokens / max(seconds, 1e-9), resumed_from=resumed_from, final_val=final_val,
                     peak_memory_mb=mem, peak_memory_kind=kind, history=history, full_state=full_state)


def _reshard(model: torch.nn.Module) -> None:
    """FSDP2 leaves the root module's parameters gathered after a forward without backward (validation);
    shard them again, so the parameters are again the ones the optimizer and the checkpoints know."""
    if hasattr(model, "reshard") and is_sharded(model):
        model.reshard()


def _emit(accelerator: Any, path: Path, row: dict) -> None:
    if not accelerator.is_main_process:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    if getattr(accelerator, "trackers", None):
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def _trim_metrics(path: Path, upto_step: int) -> None:
    """Drop metric lines after the step we resume from (they belong to the lost part of the run)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= upto_step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def make_accelerator(device: torch.device, amp_dtype: torch.dtype | None, report_to: str = "none",
                     project_dir: Path | None = None, run_name: str | None = None,
                     tracker_config: dict | None = None):
    """An ``accelerate.Accelerator`` for ``device`` and autocast dtype; under ``accelerate launch`` the
    distributed set-up (DDP / FSDP) comes from the launcher's environment."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    mp = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # One process may train several models with different precisions (base, students, control);
        # accelerate keeps one global state, so reset it between them. Never under a launcher.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    kwargs: dict[str, Any] = {"mixed_precision": mp, "cpu": device.type == "cpu",
                              "kwargs_handlers": [_process_group_timeout()]}
    if report_to != "none":
        kwargs.update(log_with=report_to, project_dir=str(project_dir) if project_dir else None)
    accelerator = Accelerator(**kwargs)
    if report_to != "none":
        # tensorboard: event files under <project_dir>/<run_name>/; wandb: a run of that name
        accelerator.init_trackers(run_name or "downscale", config=_flat(tracker_config or {}))
    return accelerator


def _process_group_timeout():
    """The collectives' timeout under a launcher: ``DOWNSCALE_DIST_TIMEOUT_S`` seconds (default 4 hours). NCCL's
    own default, 10 minutes, would abort a job whose rank 0 builds the 8B teacher's cache of a shard (hours)
    while the other ranks wait at the barrier after it; building the caches first with
    ``downscale specialize CONFIG --cache-only`` avoids the wait altogether."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    raw = os.environ.get("DOWNSCALE_DIST_TIMEOUT_S", "14400")
    try:
        seconds = float(raw)
        if not seconds > 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"DOWNSCALE_DIST_TIMEOUT_S: expected a positive number of seconds; got {raw!r}") from None
    return InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as flat ``a.b: value`` pairs of scalars (what experiment trackers accept)."""
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class FusedCausalLM(torch.nn.Module):
    """An HF causal LM plus its next-token cross-entropy fused with the LM head, chunk by chunk
    (``kd.distill_loss`` without a teacher): the [B, T, V] logits never exist (at a 128k vocabulary they are
    ~8 GB per 16k tokens in fp32, plus their gradient). One forward, so DDP / FSDP see a single root-module
    call; ``_no_split_modules`` is exposed for accelerate's per-layer FSDP wrap. Train it with
    ``fused_causal_lm_loss``; its parameters are the model's under the prefix ``model.``.

    ``forward(ids, score=True)`` (under no_grad) returns the summed NLL and the token count instead, the LM head
    applied in fp32 chunk by chunk as ``models.block_nll`` does: validation of a sharded model must run through
    the FSDP root's forward, which gathers the root's own shards (embeddings, final norm, head)."""

    scores_nll = True  # models.block_nll scores this wrapper through its forward

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

    def forward(self, input_ids: torch.Tensor, score: bool = False):
        from downscale import kd, models

        hidden = self.model.get_decoder()(input_ids=input_ids).last_hidden_state  # [B, T, H]
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts token t + 1
        labels = input_ids[:, 1:].reshape(-1)
        head = self.model.get_output_embeddings().weight
        if score:
            return models.chunked_nll_sum(h, head, labels), labels.numel()
        return kd.distill_loss(h, head, labels, None, kd_ratio=0.0)


def fused_causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy of a (prepared) ``FusedCausalLM`` on packed blocks; same value as
    ``causal_lm_loss`` without the full logits."""
    loss, _ = model(batch["input_ids"])
    return loss, {}


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain next-token cross-entropy on packed blocks (the base's pretraining objective)."""
    ids = batch["input_ids"]
    out = model(input_ids=ids, labels=ids)
    return out.loss, {}
