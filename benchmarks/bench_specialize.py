"""Specialize training throughput: our step vs a hand-written KD loop vs TRL's GKDTrainer; teacher cache vs online.

One student and one teacher (small LLaMAs built in code: teacher hidden 256 x 4 layers, student hidden 192 x 4
layers, vocab 8192, tied embeddings), the same random token blocks (block 256, batch 8), the same objective
(0.5 forward KL(teacher || student) at T = 1 + 0.5 next-token CE), the same optimizer (AdamW, weight decay 0.1,
gradient clipping at 1.0), fp32 on the CPU:

(a) ours: ``downscale.train.fit`` driving ``stages.specialize.DistillStudent`` with the online teacher from
    ``stages.specialize.teacher_targets`` (the fused chunked loss of ``downscale.kd``), as the specialize stage
    runs it; no validation, no checkpoint before the end (the end-of-run checkpoint is not in the timed steps).
(b) a minimal hand-written PyTorch loop: ``student(ids).logits`` and ``teacher(ids).logits`` [B, T, V],
    0.5 * F.kl_div(log_softmax) + 0.5 * F.cross_entropy, backward, clip, AdamW step.
(c) TRL's GKDTrainer as offline forward KL: lmbda = 0 (no on-policy generation), seq_kd False, beta = 0 (in
    TRL's generalized JSD, beta = 0 is KL(teacher || student), the forward KL), fp32, no gradient
    checkpointing (TRL's defaults are bf16 and checkpointing on), no logging, saving or evaluation. GKD's loss
    has no CE term, so TRL does a little less work than (a) and (b): the ours / TRL ratio is conservative.
(d) teacher cache vs online teacher, per epoch after the first: one epoch's worth of our steps with the online
    teacher vs with the teacher read from ``downscale.teacher_cache`` (top-64, built once; the one-off build time
    is printed), for the shapes above and for a teacher ~9x the student's parameters (the 8B -> <1B ratio).

(a), (b), (c) run in rounds, interleaved (a b c, then c b a, ...); each round starts a fresh optimizer (fit and
Trainer do) and times the steps after ``--warmup`` warm-up steps from per-step timestamps (fit's ``on_step``,
a TrainerCallback, the loop's own clock); tokens/s = blocks x block length per step over the median round.
It runs in a subprocess with glibc's allocator tuned as the specialize stage tunes it on CPU (``models.
tune_cpu_allocator``: every method in the process benefits, so the comparison is like for like);
``--allocator default`` or ``both`` also runs it with the default allocator (what a hand loop or TRL gets unless the
user tunes it) and prints the "as shipped" ratios across the two processes. ``--precision bf16`` runs all three
under bf16 autocast, with the teacher in bf16 as the stage loads it (``--teacher-dtype fp32``: an fp32 teacher
that autocast re-casts per forward); ``--vocab`` / ``--batch`` / ``--block`` change the shapes (the KD loss's share
grows with V).
``--compile`` adds (a') ours with ``specialize.compile`` (torch.compile of the student's and the teacher's
decoders) and (c') TRL with ``torch_compile=True`` (the Trainer compiles the student); their compilation falls in
the untimed warm-up round.
Goals (issue 6): ours / hand loop >= 1.0, ours / TRL >= 1.5, cache / online per epoch >= 2.0.

MFU (issue 18): each method's FLOP/s (6 N_student + 2 N_teacher per token, LM heads included, plus attention in
full, PaLM's convention) over the matmul peak measured in the same process (square torch.matmul, 2048 and 4096, fp32
and bf16). ``--shape real`` times SmolLM2-135M's shape as the teacher (hidden 576, 30 layers, 9/3 heads, MLP 1536,
vocab 49,152) and the 0.6 student compress cuts from it (hidden 456, MLP 1032, 6/3 heads), random weights. Goals at
that shape: bf16 >= 40% of the bf16 peak and >= 1.5x TRL under the same autocast; fp32 >= 55% of the fp32 peak.

    .venv/bin/python benchmarks/bench_specialize.py [--quick] [--threads 2] [--rounds 3] [--steps 3]
        [--allocator tuned|default|both] [--precision fp32|bf16] [--shape demo|real] [--vocab 8192] [--no-cache]
        [--compile]
        [--json FILE]

Absolute tokens/s on a shared 2-core CPU are noise (+-10-15% run to run); only ratios measured side by side in
one run mean anything. TRL is optional: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

GOALS = {"ours/hand": 1.0, "ours/trl": 1.5, "cache/online": 2.0}
MFU_GOALS = {"bf16": 0.40, "fp32": 0.55}  # issue 18, at --shape real: the step's FLOP/s over the measured matmul peak
TRL_MISSING = "TRL not installed: pip install -e .[bench]"


# --------------------------------------------------------------------------- set-up


# The real-model shape (issue 18): SmolLM2-135M as the teacher and the 0.6 student the compress stage cuts from it,
# as (hidden, layers, intermediate, heads, kv heads, head_dim); vocabulary 49,152. Random weights: only time counts.
REAL_TEACHER = (576, 30, 1536, 9, 3, 64)
REAL_STUDENT = (456, 30, 1032, 6, 3, 64)


def sizes(args: argparse.Namespace) -> dict:
    if args.quick:
        sz = dict(vocab=2048, block=128, batch=4, teacher=(128, 2), student=(96, 2), big_teacher=None, blocks=16)
    elif getattr(args, "shape", "demo") == "real":
        sz = dict(vocab=49152, block=256, batch=8, teacher=REAL_TEACHER, student=REAL_STUDENT, big_teacher=None,
                  blocks=32)
    else:
        sz = dict(vocab=8192, block=256, batch=8, teacher=(256, 4), student=(192, 4), big_teacher=(512, 8), blocks=32)
    return {**sz, **{k: getattr(args, k) for k in ("vocab", "block", "batch") if getattr(args, k)}}


def amp_dtype(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else None


def llama(hidden: int, layers: int, vocab: int, block: int, seed: int, intermediate: int | None = None,
          heads: int | None = None, kv_heads: int | None = None, head_dim: int = 32):
    """A LLaMA of this shape (defaults: MLP 2.75 x hidden, heads of 32, two query heads per KV head), tied embeddings.
    Built through a plain hidden size divisible by the heads, then given the real ``hidden`` (a pruned student's
    hidden size need not divide by its heads; its ``head_dim`` is explicit)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = heads or max(1, hidden // 32)
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=heads * head_dim,
                               intermediate_size=intermediate or int(hidden * 2.75),
                               num_hidden_layers=layers, num_attention_heads=heads,
                               num_key_value_heads=kv_heads or max(1, hidden // 64), head_dim=head_dim,
                               max_position_embeddings=block, tie_word_embeddings=True, use_cache=False)
    cfg.hidden_size = hidden
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def model_of(shape: tuple, vocab: int, block: int, seed: int):
    """``shape``: (hidden, layers) or (hidden, layers, intermediate, heads, kv heads, head_dim)."""
    hidden, layers, *rest = shape
    extra = dict(zip(("intermediate", "heads", "kv_heads", "head_dim"), rest, strict=False))
    return llama(hidden, layers, vocab, block, seed, **extra)


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def matmul_flops(model) -> int:
    """Weights that multiply per token: every parameter but an untied input embedding (a tied one is the head)."""
    cfg = model.config
    untied = 0 if getattr(cfg, "tie_word_embeddings", False) else cfg.vocab_size * cfg.hidden_size
    return n_params(model) - untied


def step_flops(student, teacher, batch: int, block: int) -> int:
    """FLOPs of one distillation step, PaLM's convention (attention counted in full, not halved for causality):
    per token 6 N_student + 12 L H hd T for the student (forward + backward), 2 N_teacher + 4 L H hd T for the
    teacher's forward, LM heads included in N."""
    def attn(m) -> int:
        c = m.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers * c.num_attention_heads * hd * block

    per_token = 6 * matmul_flops(student) + 12 * attn(student) + 2 * matmul_flops(teacher) + 4 * attn(teacher)
    return per_token * batch * block


def matmul_peak(dtype, sizes: tuple[int, ...] = (2048, 4096), reps: int = 3) -> float:
    """The practical matmul peak in FLOP/s: square torch.matmul in ``dtype`` at these sizes, the best median."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.matmul(a, b)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_cfg(steps: int, batch: int, compile: bool = False):
    from downscale.config import SpecializeConfig, TrainConfig

    big = 10**9  # no validation, no checkpoint, no metrics line before the last step
    tcfg = TrainConfig(max_steps=steps, batch_size=batch, grad_accum=1, lr=1e-4, warmup_steps=0, weight_decay=0.1,
                       max_grad_norm=1.0, eval_every=big, save_every=big, log_every=big, keep_checkpoints=1)
    return SpecializeConfig(kd_ratio=0.5, kd_loss="forward_kl", temperature=1.0, teacher="online", train=tcfg,
                            compile=compile)


def step_durations(stamps: list[float], warmup: int, timed: int) -> list[float]:
    """Durations of steps warmup+1 .. warmup+timed (1-based) from the end-of-step timestamps of steps 1.."""
    d = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # d[k-1] = duration of step k + 1
    out = d[warmup - 1:warmup - 1 + timed] if warmup >= 1 else None
    if out is None or len(out) != timed:
        raise RuntimeError(f"expected {warmup + timed} timed steps, got {len(stamps)} timestamps")
    return out


# --------------------------------------------------------------------------- (a) ours


def run_ours(student, teacher, blocks, batch: int, steps: int, work_root: Path, amp=None, cache=None,
             compile: bool = False) -> list[float]:
    """``steps`` optimizer steps of the specialize stage's training (fit + DistillStudent); end-of-step times.
    ``compile``: specialize.compile (the student's and the teacher's decoders through torch.compile)."""
    import numpy as np
    import torch

    from downscale import kd, models, train
    from downscale.stages.specialize import DistillStudent, teacher_targets

    scfg = train_cfg(steps, batch, compile)
    sampler = train.BlockSampler([blocks], batch, seed=0)
    accelerator = train.make_accelerator(torch.device("cpu"), amp)  # fit runs loss_fn under its autocast
    wrapper = DistillStudent(student, scfg)
    teacher_decoder = models.compiled_decoder(teacher) if compile else None

    def loss_fn(model, b):  # as specialize_student's loss_fn, for one source
        ids = b["input_ids"]
        if cache is not None:
            order = torch.argsort(b["source"], stable=True)
            ids = ids[order]
            src, blk = b["source"][order].numpy(), b["block"][order].numpy()
            parts = [cache.sparse_teacher(blk[src == s]) for s in np.unique(src)]
            target = kd.SparseTeacher.concat(parts) if len(parts) > 1 else parts[0]
        else:
            target = teacher_targets(teacher, ids, amp, teacher_decoder)
        return model(ids, target)

    stamps: list[float] = []
    work = Path(tempfile.mkdtemp(prefix="fit-", dir=work_root))
    try:
        train.fit(wrapper, cfg=scfg.train, sampler=sampler, loss_fn=loss_fn, work_dir=work, accelerator=accelerator,
                  validate=None, desc="bench", log=lambda s: None, config_hash="bench",
                  on_step=lambda s: stamps.append(time.perf_counter()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stamps


# --------------------------------------------------------------------------- (b) hand loop


def run_hand(student, teacher, blocks, batch: int, steps: int, amp=None) -> list[float]:
    """The minimal KD loop on full [B, T, V] logits (upcast to fp32 for the softmaxes); end-of-step times."""
    import torch
    import torch.nn.functional as F

    from downscale import models, train

    sampler = train.BlockSampler([blocks], batch, seed=0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    student.train()
    stamps = []
    for step in range(steps):
        ids = sampler.batch(step)["input_ids"]
        with models.autocast(ids.device, amp):
            s_logits = student(input_ids=ids).logits[:, :-1].float()  # [B, T-1, V]
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits[:, :-1].float()  # [B, T-1, V]
        ls = F.log_softmax(s_logits.flatten(0, 1), dim=-1)
        lt = F.log_softmax(t_logits.flatten(0, 1), dim=-1)
        kl = F.kl_div(ls, lt, log_target=True, reduction="batchmean")  # KL(p_T || p_S), mean over tokens
        ce = F.cross_entropy(s_logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = 0.5 * kl + 0.5 * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        stamps.append(time.perf_counter())
    return stamps


# --------------------------------------------------------------------------- (c) TRL


def import_gkd():
    """(GKDConfig, GKDTrainer) from trl, or None when trl is not installed."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # trl >= 1.0
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def tiny_tokenizer(vocab: int):
    """A small byte-level BPE wrapped as a fast tokenizer (SFTTrainer wants a processing_class; the data
    are token ids already, so its vocabulary does not matter)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the student learns from the teacher, token by token"] * 8, vocab_size=min(vocab, 300),
                            min_frequency=1, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")


class _Collate:
    """The batch GKDTrainer reads: input_ids, attention_mask, labels (no -100: every next-token position counts, as
    in (a) and (b)), and the prompt fields its on-policy branch would use (never taken at lmbda = 0)."""

    def __call__(self, rows):
        import torch

        ids = torch.stack([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "prompts": ids[:, :1], "prompt_attention_mask": torch.ones_like(ids[:, :1])}


def run_trl(student, teacher, blocks, batch: int, steps: int, work_root: Path, tokenizer, amp=None,
            compile: bool = False) -> list[float]:
    """``steps`` GKDTrainer steps (beta 0, lmbda 0, seq_kd False; fp32 or bf16 autocast); end-of-step times.
    ``compile``: TrainingArguments(torch_compile=True), the Trainer's own torch.compile of the student."""
    import numpy as np
    from accelerate.state import AcceleratorState, GradientState
    from datasets import Dataset
    from transformers import TrainerCallback

    from downscale import train

    GKDConfig, GKDTrainer = import_gkd()
    sampler = train.BlockSampler([blocks], batch, seed=0)
    rows = np.concatenate([blocks[sampler.indices(s)[1]] for s in range(steps)]).astype(np.int64)
    data = Dataset.from_dict({"input_ids": rows.tolist()})
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    AcceleratorState._reset_state(reset_partial_state=True)  # fit's accelerator and Trainer's: one global state
    GradientState._reset_state()
    out = Path(tempfile.mkdtemp(prefix="trl-", dir=work_root))
    args = GKDConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0,
                     weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, lmbda=0.0, beta=0.0, seq_kd=False,
                     temperature=1.0, max_length=blocks.shape[1], bf16=amp is not None, fp16=False, use_cpu=True,
                     gradient_checkpointing=False, report_to="none", logging_strategy="no", save_strategy="no",
                     eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
                     seed=0, dataset_kwargs={"skip_prepare_dataset": True}, torch_compile=compile)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tokenizer, data_collator=_Collate(), callbacks=[Stamp()])
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return stamps


# --------------------------------------------------------------------------- the child: one allocator setting


def quiet_progress_bars() -> None:
    """fit's tqdm bar (it passes ``disable`` itself, so TQDM_DISABLE does not reach it) off: stderr stays readable."""
    import tqdm.auto

    class Quiet(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            kw["disable"] = True
            super().__init__(*a, **kw)

    tqdm.auto.tqdm = Quiet


def child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from downscale import models

    tuned = models.tune_cpu_allocator() if args.child == "tuned" else False
    quiet_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    models.quiet_transformers()
    import warnings

    warnings.filterwarnings("ignore")
    sz = sizes(args)
    amp = amp_dtype(args.precision)
    vocab, block, batch = sz["vocab"], sz["block"], sz["batch"]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, vocab, (max(sz["blocks"], batch * (args.warmup + args.steps + 1)), block),
                          dtype=np.int64)
    teacher = frozen(model_of(sz["teacher"], vocab, block, seed=1))
    if amp == torch.bfloat16 and args.teacher_dtype == "auto":  # as the stage's load_teacher; the same for all
        teacher.to(torch.bfloat16)
    methods = ("ours", "hand", "trl") + (("ours+compile", "trl+compile") if args.compile else ())
    students = {m: model_of(sz["student"], vocab, block, seed=2) for m in methods}
    gkd = import_gkd()
    tokenizer = tiny_tokenizer(vocab) if gkd else None
    if gkd is None:
        print(TRL_MISSING, file=sys.stderr, flush=True)
    tok_step = batch * block
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731 - the parent reads stdout (JSON)
    say(f"[{args.child} allocator{' (tuned)' if tuned else ''}] torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; teacher {n_params(teacher):,} params (hidden {sz['teacher'][0]} x "
        f"{sz['teacher'][1]}), student {n_params(students['ours']):,} (hidden {sz['student'][0]} x "
        f"{sz['student'][1]}), vocab {vocab}, batch {batch} x {block} tokens, {args.precision}")
    root = Path(tempfile.mkdtemp(prefix="bench_specialize_"))
    steps = args.warmup + args.steps + 1  # + 1: fit's end-of-run checkpoint lands in the last step, not timed
    runners = {
        "ours": lambda: run_ours(students["ours"], teacher, blocks, batch, steps, root, amp),
        "hand": lambda: run_hand(students["hand"], teacher, blocks, batch, steps, amp),
    }
    if gkd is not None:
        runners["trl"] = lambda: run_trl(students["trl"], teacher, blocks, batch, steps, root, tokenizer, amp)
    if args.compile:  # torch.compile on both sides; the warm-up round below holds the compilation
        runners["ours+compile"] = lambda: run_ours(students["ours+compile"], teacher, blocks, batch, steps, root, amp,
                                                   compile=True)
        if gkd is not None:
            runners["trl+compile"] = lambda: run_trl(students["trl+compile"], teacher, blocks, batch, steps, root,
                                                     tokenizer, amp, compile=True)
    per_round: dict[str, list[float]] = {m: [] for m in runners}  # tokens/s of each round
    try:
        for name, fn in runners.items():  # warm-up round: first-touch allocations, lazy imports, kernels
            t0 = time.perf_counter()
            fn()
            say(f"  warm-up {name}: {time.perf_counter() - t0:.1f}s")
        order = list(runners)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                d = step_durations(runners[name](), args.warmup, args.steps)
                per_round[name].append(tok_step * len(d) / sum(d))
            say(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {v[-1]:.0f} tok/s" for m, v in per_round.items()))
        peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
        say("  matmul peak (square, 2048-4096): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
        result = {"allocator": args.child, "tuned": tuned, "precision": args.precision, "shape": args.shape,
                  "teacher_dtype": str(next(teacher.parameters()).dtype),
                  "peak_flops": peaks, "step_flops": step_flops(students["ours"], teacher, batch, block),
                  "threads": torch.get_num_threads(), "sizes": sz,
                  "params": {"teacher": n_params(teacher), "student": n_params(students["ours"])},
                  "tokens_per_step": tok_step, "rounds": args.rounds, "timed_steps": args.steps,
                  "warmup_steps": args.warmup, "per_round": per_round,
                  "tokens_per_s": {m: statistics.median(v) for m, v in per_round.items()},
                  "trl": gkd is not None}
        if args.cache:
            result["cache"] = [cache_vs_online(sz["teacher"], sz, blocks[:sz["blocks"]], args, root, say)]
            if sz["big_teacher"]:
                result["cache"].append(cache_vs_online(sz["big_teacher"], sz, blocks[:sz["blocks"]], args, root, say))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def cache_vs_online(teacher_shape, sz: dict, blocks, args: argparse.Namespace, root: Path, say) -> dict:
    """(d): one epoch's worth of our steps, online teacher vs teacher cache (interleaved rounds), and the build."""
    import torch

    from downscale.teacher_cache import TeacherCache, build_teacher_cache

    vocab, block, batch = sz["vocab"], sz["block"], sz["batch"]
    teacher = frozen(model_of(teacher_shape, vocab, block, seed=3))
    if amp_dtype(args.precision) == torch.bfloat16 and args.teacher_dtype == "auto":  # as the stage loads it
        teacher.to(torch.bfloat16)
    epoch_steps = len(blocks) // batch
    path = root / f"cache-{teacher_shape[0]}x{teacher_shape[1]}"
    t0 = time.perf_counter()
    amp = amp_dtype(args.precision)  # the cache is built under the training's autocast, as the stage builds it
    build_teacher_cache(teacher, blocks, path, top_k=64, temperature=1.0, batch_size=batch, device="cpu",
                        amp_dtype=amp, progress=False)
    build_s = time.perf_counter() - t0
    cache = TeacherCache.open(path)
    student = model_of(sz["student"], vocab, block, seed=2)
    steps = 1 + epoch_steps + 1  # a warm-up step, the epoch, and the step holding fit's final checkpoint
    runs = {"online": lambda: run_ours(student, teacher, blocks, batch, steps, root, amp),
            "cache": lambda: run_ours(student, teacher, blocks, batch, steps, root, amp, cache=cache)}
    epochs: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for r in range(args.rounds):
        for name in (("online", "cache") if r % 2 == 0 else ("cache", "online")):
            epochs[name].append(sum(step_durations(runs[name](), 1, epoch_steps)))
    online, cached = statistics.median(epochs["online"]), statistics.median(epochs["cache"])
    saved = online - cached
    row = {"teacher_shape": list(teacher_shape), "teacher_params": n_params(teacher), "blocks": len(blocks),
           "epoch_steps": epoch_steps, "online_epoch_s": online, "cache_epoch_s": cached, "ratio": online / cached,
           "build_s": build_s, "break_even_epochs": (build_s / saved) if saved > 0 else None, "epochs": epochs,
           "top_k": 64}
    say(f"  cache vs online, teacher {n_params(teacher):,} params: epoch online {online:.1f}s, cache {cached:.1f}s, "
        f"ratio {online / cached:.2f}x; build {build_s:.1f}s")
    return row


# --------------------------------------------------------------------------- the parent: report


def verdict(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return f"{'MET' if value >= goal else 'MISSED'} (goal >= {goal})"


def report(res: dict) -> dict:
    tps = res["tokens_per_s"]
    label = {"ours": "(a) ours: fit + DistillStudent (fused KD)", "hand": "(b) hand-written loop, full logits",
             "trl": "(c) TRL GKDTrainer (beta=0, lmbda=0)", "ours+compile": "(a') ours, specialize.compile",
             "trl+compile": "(c') TRL GKDTrainer, torch_compile=True"}
    print(f"\nSpecialize training throughput, {res['allocator']} allocator ({res['threads']} threads, "
          f"{res['precision']} on the CPU, teacher weights {res.get('teacher_dtype', '?')}, "
          f"vocab {res['sizes']['vocab']}, "
          f"teacher {res['params']['teacher']:,} / student {res['params']['student']:,} params, "
          f"{res['tokens_per_step']} tokens per step; median of {res['rounds']} interleaved rounds of "
          f"{res['timed_steps']} timed steps after {res['warmup_steps']} warm-up)")
    peak = res["peak_flops"][res["precision"]]
    print(f"FLOPs per step {res['step_flops'] / 1e12:.2f} T (6 N_s + 2 N_t + attention, heads included); measured "
          f"{res['precision']} matmul peak {peak / 1e9:.0f} GFLOP/s (fp32 {res['peak_flops']['fp32'] / 1e9:.0f}, "
          f"bf16 {res['peak_flops']['bf16'] / 1e9:.0f})")
    print(f"{'method':<46}{'tok/s':>9}{'ms/step':>10}{'GFLOP/s':>9}{'MFU':>7}   per round tok/s")
    mfu = {}
    for m, v in tps.items():
        rounds = " ".join(f"{x:.0f}" for x in res["per_round"][m])
        flops = res["step_flops"] * v / res["tokens_per_step"]
        mfu[m] = flops / peak
        print(f"{label[m]:<46}{v:>9.0f}{1e3 * res['tokens_per_step'] / v:>10.0f}{flops / 1e9:>9.0f}{mfu[m]:>7.0%}"
              f"   {rounds}")
    if not res["trl"]:
        print(f"(c) {TRL_MISSING}")
    ratios = {"ours/hand": tps["ours"] / tps["hand"], "ours/trl": tps["ours"] / tps["trl"] if "trl" in tps else None,
              "mfu": mfu}
    for k in ("ours/hand", "ours/trl"):
        v = ratios[k]
        print(f"ratio {k:<10} = {f'{v:.2f}x' if v is not None else '-':>7}   {verdict(v, GOALS[k])}")
    mfu_goal = MFU_GOALS.get(res["precision"])
    if mfu_goal is not None:
        met = mfu["ours"] >= mfu_goal
        where = "" if res.get("shape") == "real" else " (the goal is set at --shape real)"
        print(f"MFU of ours = {mfu['ours']:.0%} of the measured {res['precision']} peak   "
              f"{'MET' if met else 'MISSED'} (goal >= {mfu_goal:.0%}){where}")
    if "ours+compile" in tps:
        extra = {"ours+compile/ours": tps["ours+compile"] / tps["ours"],
                 "ours+compile/trl": tps["ours+compile"] / tps["trl"] if "trl" in tps else None,
                 "ours+compile/trl+compile": (tps["ours+compile"] / tps["trl+compile"]) if "trl+compile" in tps
                 else None}
        for k, v in extra.items():
            goal = f"   {verdict(v, GOALS['ours/trl'])}" if k.endswith("/trl+compile") else ""
            print(f"ratio {k:<24} = {f'{v:.2f}x' if v is not None else '-':>7}{goal}")
        ratios.update(extra)
    for row in res.get("cache", []):
        ratios.setdefault("cache/online", row["ratio"])
        be = row["break_even_epochs"]
        print(f"(d) teacher cache vs online, teacher {row['teacher_params']:,} params "
              f"({row['teacher_params'] / res['params']['student']:.1f}x the student), one epoch = "
              f"{row['epoch_steps']} steps ({row['blocks']} blocks), top-{row['top_k']} cache:")
        print(f"    online {row['online_epoch_s']:.2f}s, cache {row['cache_epoch_s']:.2f}s per epoch: ratio "
              f"cache/online = {row['ratio']:.2f}x   {verdict(row['ratio'], GOALS['cache/online'])}; "
              f"one-off build {row['build_s']:.2f}s"
              + (f" (repaid after {be:.2f} epochs)" if be is not None else " (never repaid)"))
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 rounds of 2 steps (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; 2 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 3; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps per round, not timed (>= 1)")
    ap.add_argument("--allocator", choices=("both", "tuned", "default"), default="tuned",
                    help="glibc allocator settings to run, each in its own process (default: tuned, as the stage)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="fp32, or bf16 autocast for all three methods (TRL: bf16=True)")
    ap.add_argument("--teacher-dtype", choices=("auto", "fp32"), default="auto",
                    help="auto: the teacher as the specialize stage loads it (bf16 under bf16 autocast), given to all "
                         "three methods; fp32: an fp32 teacher that autocast re-casts per forward (runs before "
                         "2026-12-07 evening)")
    ap.add_argument("--shape", choices=("demo", "real"), default="demo",
                    help="demo: small LLaMAs (teacher 256 x 4, student 192 x 4, vocab 8192); real: SmolLM2-135M's "
                         "shape as the teacher and the 0.6 student compress cuts from it (vocab 49,152)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 8192; 2048 with --quick)")
    ap.add_argument("--batch", type=int, default=None, help="blocks per step (default 8; 4 with --quick)")
    ap.add_argument("--block", type=int, default=None, help="tokens per block (default 256; 128 with --quick)")
    ap.add_argument("--no-cache", dest="cache", action="store_false", help="skip (d), teacher cache vs online")
    ap.add_argument("--compile", action="store_true",
                    help="also time (a') ours with specialize.compile and (c') TRL with torch_compile=True "
                         "(each compiles for about a minute on a CPU first)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--child", choices=("tuned", "default"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.steps = args.steps or (2 if args.quick else 3)
    args.warmup = max(1, args.warmup)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    allocators = ["tuned", "default"] if args.allocator == "both" else [args.allocator]
    t0 = time.time()
    results = {}
    for alloc in allocators:
        cmd = [sys.executable, __file__, "--child", alloc, "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        cmd += (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
        cmd += ["--precision", args.precision, "--shape", args.shape, "--teacher-dtype", args.teacher_dtype]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("vocab", "batch", "block") if getattr(args, k)]
        cmd += [] if (args.cache and alloc == allocators[0]) else ["--no-cache"]
        cmd += ["--compile"] if args.compile else []
        env = dict(os.environ)
        if alloc == "default":
            env["DOWNSCALE_NO_MALLOC_TUNING"] = "1"
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode:
            print(f"benchmark child ({alloc} allocator) failed with exit {proc.returncode}")
            return 1
        results[alloc] = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = {alloc: report(res) for alloc, res in results.items()}
    if "tuned" in results and "default" in results:
        shipped = results["tuned"]["tokens_per_s"]["ours"]
        others = results["default"]["tokens_per_s"]
        print("\nAs shipped (ours tunes the allocator itself; the others with the default one; across two processes, "
              "so noisier): " + ", ".join(f"ours/{m} = {shipped / v:.2f}x" for m, v in others.items() if m != "ours"))
    print(f"\n{time.time() - t0:.0f}s in all. Ratios are the result; absolute CPU tokens/s are noise.")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratios": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
