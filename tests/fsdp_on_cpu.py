"""Run downscale under FSDP2 on a CPU (gloo), for tests: ``accelerate launch`` (2 CPU processes) of this script.

accelerate turns FSDP into DDP on a CPU, so this script swaps its ``prepare`` for what accelerate's FSDP2 path with
``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`` does on GPUs: ``fully_shard`` on every decoder layer (the HF
model's ``_no_split_modules`` classes), then on the root module, and the optimizer re-pointed at the sharded
parameters (accelerate's ``fsdp2_switch_optimizer_parameters``). Everything else is the real accelerate.

    accelerate launch --config_file configs/accelerate/cpu_ddp_2proc.yaml tests/fsdp_on_cpu.py \\
        specialize CONFIG --student 0            # the stage, through downscale's CLI
    ... tests/fsdp_on_cpu.py fit OUT_DIR KILL_AT  # train.fit on a tiny LLaMA, killed after KILL_AT steps, resumed
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


class FSDPOnCPU:
    def __init__(self, accelerator):
        self._acc = accelerator

    def __getattr__(self, name):
        return getattr(self._acc, name)

    def prepare(self, model, optimizer):
        from torch.distributed.fsdp import fully_shard

        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        wrap = set(getattr(model, "_no_split_modules", None) or [])  # accelerate reads the top module's only
        layers = [m for m in model.modules() if type(m).__name__ in wrap]
        assert layers, f"{type(model).__name__} names no decoder layers (_no_split_modules) to shard"
        for m in layers:
            fully_shard(m)
        fully_shard(model)
        params = dict(model.named_parameters())
        for g, group_names in zip(optimizer.param_groups, groups, strict=True):
            g["params"] = [params[n] for n in group_names]
        return model, optimizer

    def unwrap_model(self, model):
        return model

    def no_sync(self, model):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _patch() -> None:
    import os

    from downscale import models, train

    if os.environ.get("DOWNSCALE_COMPILE_BACKEND"):  # specialize.compile with a quick backend (tests)
        models.COMPILE_BACKEND = os.environ["DOWNSCALE_COMPILE_BACKEND"]
    real = train.make_accelerator
    train.make_accelerator = lambda *a, **k: FSDPOnCPU(real(*a, **k))


def fit_run(out_dir: Path, kill_at: int) -> None:
    """Train a tiny LLaMA sharded, killed after ``kill_at`` steps, then resumed; rank 0 writes the full weights
    (``FitResult.full_state``) and every rank a digest of them."""
    import hashlib

    import numpy as np
    from safetensors.torch import save_file

    from downscale import models, train
    from tiny import tiny_model

    acc = train.make_accelerator(torch.device("cpu"), None)
    blocks = np.random.default_rng(0).integers(1, 128, (32, 16))
    result = None
    for attempt in ("killed", "resumed"):
        model = tiny_model("llama", seed=1, vocab_size=128).train()
        cfg = fit_config()
        sampler = train.BlockSampler([blocks], cfg.batch_size * acc.num_processes, seed=0)

        def on_step(step, attempt=attempt):
            if attempt == "killed" and step == kill_at:
                raise KeyboardInterrupt

        with contextlib.suppress(KeyboardInterrupt):
            result = train.fit(model, cfg=cfg, sampler=sampler, loss_fn=train.causal_lm_loss, work_dir=out_dir,
                               accelerator=acc, desc=attempt, log=lambda m: None, config_hash="fsdp",
                               on_step=on_step)
        assert attempt == "killed" or result.resumed_from is not None
    assert train.is_sharded(model) and result.full_state is not None
    plain = models.plain_copy(model, result.full_state)  # what the base stage and the control keep
    assert not train.is_sharded(plain)
    state = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
    h = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(state.items())))
    (out_dir / f"digest-{acc.process_index}.txt").write_text(h.hexdigest())
    if acc.is_main_process:
        save_file({k: v.clone() for k, v in state.items()}, str(out_dir / "weights.safetensors"))
        (out_dir / "resumed_from.txt").write_text(str(result.resumed_from))


def fit_config(batch_size: int = 2, grad_accum: int = 1):
    from downscale.config import TrainConfig

    return TrainConfig(max_steps=6, batch_size=batch_size, grad_accum=grad_accum, lr=3e-3, warmup_steps=1,
                       eval_every=100, save_every=2, log_every=1, keep_checkpoints=2)


if __name__ == "__main__":
    _patch()
    if sys.argv[1] == "fit":
        fit_run(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        from downscale.cli import main

        sys.exit(main(sys.argv[1:]))
