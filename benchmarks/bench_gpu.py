"""The GPU figures of issue 6 in one run: specialize-step MFU with the teacher online, and generation
tokens/s of the n-student ensemble (fast path and one by one) against the base.

On CUDA (default there): a random-initialised base with the published Meta-Llama-3-8B config
(tests/fixtures/hf_configs/llama3-8b) in bf16, and students of the shape the planner gives for
configs/llama3-8b_to_8x1b.yaml (988.6M parameters each). On a CPU, or with ``--small``: the same code at
small shapes (a smoke run: the numbers mean nothing there).

    .venv/bin/python benchmarks/bench_gpu.py                    # on an H100 / H200: the real figures
    .venv/bin/python benchmarks/bench_gpu.py --small            # anywhere: a quick smoke run

1. Specialize step: the project's DistillStudent (fused chunked KD + CE, kd_ratio 0.5) with the base as the
   online bf16 teacher, AdamW on fp32 master weights under bf16 autocast, batch B x T. Tokens/s over the timed
   steps; MFU = tokens/s x (6 N_student + 2 N_teacher + attention) / peak dense bf16 FLOP/s, with the FLOPs per
   token of downscale.cost (goal >= 35%). Then the same step through the stage's own loop, ``train.fit`` (accelerate,
   the loss read to the host per micro-batch, the divergence guard; ``--fit-steps`` timed steps after the
   warm-up, no checkpoint written): its MFU is the stage's, the first one the step's own.
2. Generation: greedy decoding of ``--gen-tokens`` tokens after a ``--prompt``-token prompt, batch 1 and
   ``--gen-batch``: the base, the ensemble of ``--students`` students on its fast path, and one by one.

Prints a table and, with --json, writes the numbers. Time on an H200: a few minutes (most of it building the
random models).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _configs(small: bool):
    from transformers import AutoConfig

    from downscale.config import load_config
    from downscale.pruning.plan import student_config
    from downscale.stages.compress import make_plan

    if small:
        base = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=256, intermediate_size=704,
                                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                    max_position_embeddings=2048, tie_word_embeddings=False)
        cfg = load_config(ROOT / "configs" / "demo.yaml", check_paths=False)
    else:
        base = AutoConfig.from_pretrained(ROOT / "tests" / "fixtures" / "hf_configs" / "llama3-8b")
        cfg = load_config(ROOT / "configs" / "llama3-8b_to_8x1b.yaml", check_paths=False)
    plan = make_plan(cfg, base, "bench")
    return base, student_config(base, plan.shape), plan


def _build(config, device, dtype, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def specialize_step(args, base_cfg, student_cfg, device) -> dict:
    from downscale import cost, models
    from downscale.config import SpecializeConfig
    from downscale.stages.specialize import DistillStudent, teacher_targets

    amp = torch.bfloat16 if (device.type == "cuda" or models.cpu_supports_bf16()) else None
    teacher = _build(base_cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32, 0).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = _build(student_cfg, device, torch.float32, 1).train()
    scfg = SpecializeConfig(kd_ratio=0.5)
    wrapper = DistillStudent(student, scfg)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, base_cfg.vocab_size, (args.batch, args.seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))

    def step():
        target = teacher_targets(teacher, ids, amp)
        with models.autocast(device, amp):
            loss, _ = wrapper(ids, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    tokens_per_s = args.batch * args.seq / seconds
    n_s, n_t = models.count_params(student), models.count_params(teacher)
    # training FLOPs per token: 3 x the student's forward (fwd + bwd) + the teacher's forward, attention included
    flops = 3 * cost.flops_per_token(student_cfg, args.seq, causal=False) + cost.flops_per_token(base_cfg, args.seq)
    peak = cost.peak_flops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out = {"student_params": n_s, "teacher_params": n_t, "batch": args.batch, "seq": args.seq,
           "seconds_per_step": seconds, "tokens_per_s": tokens_per_s, "flops_per_token": flops,
           "flops_6n_2n": 6 * n_s + 2 * n_t, "achieved_tflops": tokens_per_s * flops / 1e12,
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "precision": str(amp or "fp32").removeprefix("torch.")}
    if peak:
        out["peak_tflops"] = peak / 1e12
        out["mfu"] = cost.mfu(tokens_per_s, flops, peak)
    if args.fit_steps:
        del opt
        student.zero_grad(set_to_none=True)
        fit_s = _through_fit(args, wrapper, teacher, amp, base_cfg.vocab_size, device)
        out["fit_seconds_per_step"] = fit_s
        out["fit_tokens_per_s"] = args.batch * args.seq / fit_s
        if peak:
            out["fit_mfu"] = cost.mfu(out["fit_tokens_per_s"], flops, peak)
    return out  # the models go with this frame; the caller empties the CUDA cache


class _Stop(Exception):
    pass


def _through_fit(args, wrapper, teacher, amp, vocab: int, device) -> float:
    """Seconds per optimizer step of the specialize stage's loop (``train.fit`` with the online teacher), timed
    between step ends after ``args.warmup`` steps; stopped before fit's final checkpoint (no GBs written)."""
    import tempfile

    import numpy as np

    from downscale import train
    from downscale.config import TrainConfig
    from downscale.stages.specialize import teacher_targets

    total = args.warmup + args.fit_steps
    blocks = np.random.default_rng(0).integers(0, vocab, size=(args.batch * (total + 1), args.seq), dtype=np.int64)
    tcfg = TrainConfig(max_steps=total + 1, batch_size=args.batch, grad_accum=1, lr=1e-4, warmup_steps=0,
                       save_every=10**9, log_every=10**9, eval_every=10**9)
    stamps: list[float] = []

    def on_step(done: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        if done == total:
            raise _Stop  # before step total + 1, whose end would write the checkpoint

    def loss_fn(model, batch):
        ids = batch["input_ids"]
        return model(ids, teacher_targets(teacher, ids, amp))

    with tempfile.TemporaryDirectory() as tmp:
        try:
            train.fit(wrapper, cfg=tcfg, sampler=train.BlockSampler([blocks], args.batch, seed=0), loss_fn=loss_fn,
                      work_dir=tmp, accelerator=train.make_accelerator(device, amp), log=lambda m: None,
                      desc="fit", on_step=on_step)
        except _Stop:
            pass
    return (stamps[-1] - stamps[args.warmup - 1]) / args.fit_steps


def generation(args, base_cfg, student_cfg, device) -> dict:
    from downscale.ensemble import EnsembleModel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = _build(base_cfg, device, dtype, 0).eval()
    students = [_build(student_cfg, device, dtype, 10 + i).eval() for i in range(args.students)]
    ens = EnsembleModel(students, mode="logit_mean", fast=True)
    results = {"fast_path": ens.uses_fast_path, "fallback_reason": ens.fallback_reason, "rows": []}
    for batch in (1, args.gen_batch):
        prompt = torch.randint(0, base_cfg.vocab_size, (batch, args.prompt), device=device,
                               generator=torch.Generator(device=device).manual_seed(batch))

        def run_base(prompt=prompt):
            return base.generate(prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                 do_sample=False, pad_token_id=0)

        def run_ens(fast: bool, prompt=prompt):
            ens.fast = fast
            return ens.generate(prompt, max_new_tokens=args.gen_tokens, do_sample=False)

        for name, fn in (("base", run_base), ("ensemble fast path", lambda: run_ens(True)),
                         ("ensemble one by one", lambda: run_ens(False))):
            with torch.no_grad():
                fn()  # warm-up
                _sync(device)
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
            seconds = time.perf_counter() - t0
            new = (out.shape[1] - args.prompt) * batch
            results["rows"].append({"model": name, "batch": batch, "new_tokens": new, "seconds": seconds,
                                    "tokens_per_s": new / seconds})
    ens.fast = True
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="small shapes (default when there is no GPU)")
    p.add_argument("--batch", type=int, default=None, help="specialize: sequences per step (8 on CUDA)")
    p.add_argument("--seq", type=int, default=None, help="specialize: tokens per sequence (2048 on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="specialize: timed steps")
    p.add_argument("--warmup", type=int, default=2, help="specialize: untimed steps first (at least 1)")
    p.add_argument("--fit-steps", type=int, default=3,
                   help="specialize: timed steps through train.fit after the warm-up (0: skip)")
    p.add_argument("--students", type=int, default=8, help="generation: students in the ensemble")
    p.add_argument("--prompt", type=int, default=128, help="generation: prompt tokens")
    p.add_argument("--gen-tokens", type=int, default=64, help="generation: new tokens")
    p.add_argument("--gen-batch", type=int, default=8, help="generation: the larger batch")
    p.add_argument("--skip-specialize", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.fit_steps < 0:
        p.error("--warmup and --steps must be >= 1, --fit-steps >= 0")
    sys.path.insert(0, str(ROOT / "src"))
    from downscale import models

    models.quiet_transformers()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # TF32 for fp32 matmuls as the stages set it (run.tf32's default), so the fit-loop figure is the stage's
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    small = args.small or device.type != "cuda"
    if device.type == "cpu":
        models.tune_cpu_allocator()
    args.batch = args.batch or (2 if small else 8)
    args.seq = args.seq or (256 if small else 2048)
    if small:
        args.students = min(args.students, 4)
        args.prompt, args.gen_tokens = min(args.prompt, 32), min(args.gen_tokens, 16)
    base_cfg, student_cfg, plan = _configs(small)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {where}; base {plan.base_params['total']:,} params, students {plan.params['total']:,} "
          f"({plan.shape.as_dict()}){' (small shapes: a smoke run)' if small else ''}", flush=True)
    results: dict = {"device": where, "small": small}
    if not args.skip_specialize:
        r = specialize_step(args, base_cfg, student_cfg, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["specialize"] = r
        mfu = f"{r['mfu']:.1%} of {r['peak_tflops']:.0f} TFLOP/s (goal >= 35%)" if "mfu" in r else "n/a (no peak)"
        print(f"specialize step: {r['tokens_per_s']:,.0f} tokens/s ({r['seconds_per_step']:.3f} s/step, batch "
              f"{r['batch']} x {r['seq']}), {r['flops_per_token'] / 1e9:.1f} GFLOP/token "
              f"(6N+2N: {r['flops_6n_2n'] / 1e9:.1f}), {r['achieved_tflops']:.1f} TFLOP/s, MFU {mfu}; "
              f"peak memory {r['peak_memory_gb'] or 0:.1f} GB", flush=True)
        if "fit_tokens_per_s" in r:
            fit_mfu = f", MFU {r['fit_mfu']:.1%}" if "fit_mfu" in r else ""
            print(f"  through the stage's loop (train.fit): {r['fit_tokens_per_s']:,.0f} tokens/s "
                  f"({r['fit_seconds_per_step']:.3f} s/step{fit_mfu}; "
                  f"{r['fit_tokens_per_s'] / r['tokens_per_s']:.2f}x the bare step)", flush=True)
    if not args.skip_generation:
        g = generation(args, base_cfg, student_cfg, device)
        results["generation"] = g
        how = "on" if g["fast_path"] else f"off: {g['fallback_reason']}"
        print(f"generation ({args.students} students, fast path {how}):")
        by = {(row["model"], row["batch"]): row for row in g["rows"]}
        for row in g["rows"]:
            ratio = row["tokens_per_s"] / by[("base", row["batch"])]["tokens_per_s"]
            print(f"  batch {row['batch']:>2}  {row['model']:<20} {row['tokens_per_s']:>10,.1f} tokens/s  "
                  f"({ratio:.2f}x the base)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
