"""Fused chunked KD loss (downscale.kd.distill_loss) vs the naive full-vocabulary computation.

1. Memory at a LLaMA-3-sized vocabulary (V = 128,256): forward + backward of 0.5 CE + 0.5 forward KL
   for N tokens (student hidden H, teacher hidden H, both heads [V, H]). Naive = student logits [N, V] and
   teacher logits [N, V] in fp32, log_softmax, F.kl_div + F.cross_entropy, backward. Each variant runs in
   its own subprocess; peak memory = peak RSS (ru_maxrss) minus the RSS after set-up (inputs, weights)
   on CPU, or torch.cuda.max_memory_allocated minus the allocation after set-up on GPU. Goal: fused peak
   <= 0.5x naive. Both variants' losses are printed (they must agree).
2. Speed at the demo's vocabulary (V = 8192, N = 16 x 255 tokens, H = 256) on this machine: naive vs fused,
   in fp32 and under bf16 autocast (where the fused loss's head matmuls run in bf16, as HF's lm_head does),
   interleaved, median of repeats, once with glibc's default allocator and once tuned as the specialize stage
   tunes it on CPU (each in its own subprocess); the ratios say whether the fused loss slows training.
3. Teacher-cache precision: the KD (value and gradient) from a top-64 cache stored as float16 vs float32,
   against the truncation error of top-64 itself (vs the full teacher).
4. Scoring memory at V = 128,256 (what base validation, compress calibration and evaluation do): the summed
   next-token NLL of --score-tokens tokens (8 rows) of a 1-layer LLaMA (hidden H, untied head) through
   ``models.block_nll`` (the head applied in fp32 chunk by chunk) vs the obvious way (the model's [B, T, V]
   logits, log_softmax, gather); each in its own subprocess, peak as in 1. The NLLs must agree.

    .venv/bin/python benchmarks/bench_kd_memory.py [--tokens 1024] [--hidden 512] [--vocab 128256]
        [--threads 2] [--reps 3] [--skip memory,speed,cache,scoring]

Timings on a shared machine are noisy (+-10-15%); only ratios measured side by side in one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class _Peak:
    """Peak memory of the code in its ``with`` block, above what was held when it began: CUDA max allocated, or
    on a CPU the process's peak RSS minus the RSS at entry; ``.mb`` and ``.seconds`` after the block."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = _rss_mb()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.mb, self.seconds = peak - self.base, time.perf_counter() - self.t0


def _run_child(variant: str, args: argparse.Namespace, *extra: str) -> dict:
    """Run ``--child variant`` in a fresh process (its own peak memory); its last stdout line as JSON."""
    cmd = [sys.executable, __file__, "--child", variant, "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--threads", str(args.threads), "--device", args.device, *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _inputs(n: int, h: int, v: int, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hid = (torch.randn(n, h, generator=g)).to(device).requires_grad_()
    w = (torch.randn(v, h, generator=g) * h**-0.5 * 3).to(device).requires_grad_()
    th = torch.randn(n, h, generator=g).to(device)
    tw = (torch.randn(v, h, generator=g) * h**-0.5 * 4).to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hid, w, th, tw, labels


def naive_loss(hid, w, th, tw, labels, kd_ratio: float = 0.5):
    """The obvious computation: full fp32 logits of both models, log_softmax, kl_div + cross_entropy."""
    z = hid @ w.T  # [N, V]
    with torch.no_grad():
        t = th @ tw.T  # [N, V]
    ls = torch.log_softmax(z, dim=-1)
    lt = torch.log_softmax(t, dim=-1)
    kl = F.kl_div(ls, lt, log_target=True, reduction="batchmean")  # KL(p_T || p_S), mean over tokens
    ce = F.cross_entropy(z, labels)
    return kd_ratio * kl + (1 - kd_ratio) * ce


def fused_loss(hid, w, th, tw, labels, kd_ratio: float = 0.5, chunk: int | None = None, mm=None):
    from downscale import kd

    loss, _ = kd.distill_loss(hid, w, labels, kd.DenseTeacher(th, tw), kd_ratio=kd_ratio, kind="forward_kl",
                              chunk_tokens=chunk, matmul_dtype=mm)
    return loss


def child(args: argparse.Namespace) -> None:
    """One variant in this process: print {"loss", "peak_mb", "seconds"} as JSON."""
    torch.set_num_threads(args.threads)
    hid, w, th, tw, labels = _inputs(args.tokens, args.hidden, args.vocab, args.device)
    with _Peak(args.device) as m:
        if args.child == "naive":
            loss = naive_loss(hid, w, th, tw, labels)
        else:
            loss = fused_loss(hid, w, th, tw, labels, chunk=args.chunk)
        loss.backward()
    print(json.dumps({"loss": float(loss), "peak_mb": m.mb, "seconds": m.seconds, "grad_norm": float(w.grad.norm())}))


def scoring_child(args: argparse.Namespace) -> None:
    """Scoring variant in this process: print {"nll", "peak_mb", "seconds"} as JSON."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from downscale import models

    torch.set_num_threads(args.threads)
    cfg = AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=2 * args.hidden, num_hidden_layers=1,
                               num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
                               max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(args.device).eval()
    rows = 8
    ids = torch.randint(0, args.vocab, (rows, args.score_tokens // rows), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    with _Peak(args.device) as m, torch.no_grad():
        if args.child == "score-full":
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
            nll = float(-logp.gather(-1, ids[:, 1:, None]).sum())
        else:
            nll = models.block_nll(model, ids, torch.device(args.device))[0]
    print(json.dumps({"nll": nll, "peak_mb": m.mb, "seconds": m.seconds}))


def scoring_table(args: argparse.Namespace) -> None:
    res = {v: _run_child(v, args, "--score-tokens", str(args.score_tokens)) for v in ("score-full", "score-chunked")}
    print(f"\n4. Scoring memory, summed next-token NLL: N={args.score_tokens} tokens, 1-layer LLaMA H={args.hidden}, "
          f"V={args.vocab}, device={args.device}")
    print(f"{'variant':<16}{'peak MB':>10}{'seconds':>10}{'NLL':>16}")
    for v, r in res.items():
        print(f"{v:<16}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}{r['nll']:>16.4f}")
    print(f"peak-memory ratio block_nll/full-logits = "
          f"{res['score-chunked']['peak_mb'] / res['score-full']['peak_mb']:.3f}; NLL relative difference "
          f"{abs(res['score-chunked']['nll'] / res['score-full']['nll'] - 1):.1e}")


def memory_table(args: argparse.Namespace) -> bool:
    from downscale import kd

    chunk = args.chunk or kd.auto_chunk_tokens(args.vocab)
    res = {v: _run_child(v, args, "--tokens", str(args.tokens), "--chunk", str(chunk)) for v in ("naive", "fused")}
    ratio = res["fused"]["peak_mb"] / res["naive"]["peak_mb"]
    kind = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS - RSS after set-up"
    print(f"\n1. Memory, 0.5 CE + 0.5 forward KL, forward + backward: N={args.tokens} tokens, H={args.hidden}, "
          f"V={args.vocab}, fused chunk={chunk} tokens, device={args.device} ({kind})")
    print(f"{'variant':<10}{'peak MB':>10}{'seconds':>10}{'loss':>14}{'|grad W|':>12}")
    for v in ("naive", "fused"):
        r = res[v]
        print(f"{v:<10}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}{r['loss']:>14.6f}{r['grad_norm']:>12.5f}")
    ok = ratio <= 0.5
    print(f"peak-memory ratio fused/naive = {ratio:.3f} (goal <= 0.5: {'MET' if ok else 'NOT MET'}); "
          f"time ratio fused/naive = {res['fused']['seconds'] / res['naive']['seconds']:.2f} (one run each)")
    return ok


def _autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)


def speed_child(args: argparse.Namespace) -> None:
    """The speed variants in this process (allocator as asked): print {variant: median seconds} as JSON."""
    if args.child == "speed-tuned":
        from downscale.models import tune_cpu_allocator

        tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    n, h, v = 16 * 255, 256, 8192
    hid, w, th, tw, labels = _inputs(n, h, v, args.device)

    def auto(fn):
        def run():
            with _autocast(args.device):
                return fn()
        return run

    variants = {
        "naive fp32": lambda: naive_loss(hid, w, th, tw, labels),
        "fused fp32 c=256": lambda: fused_loss(hid, w, th, tw, labels, chunk=256),
        "fused fp32 c=auto": lambda: fused_loss(hid, w, th, tw, labels),
        "naive bf16 autocast": auto(lambda: naive_loss(hid, w, th, tw, labels)),
        "fused bf16 autocast": auto(lambda: fused_loss(hid, w, th, tw, labels)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn().backward()
    for _ in range(args.reps):
        for name, fn in variants.items():
            hid.grad = w.grad = None
            t0 = time.perf_counter()
            fn().backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    print(json.dumps({k: statistics.median(ts) for k, ts in times.items()}))


def speed_table(args: argparse.Namespace) -> None:
    from downscale import kd

    n = 16 * 255
    res = {}
    for alloc in ("default", "tuned"):
        cmd = [sys.executable, __file__, "--child", f"speed-{alloc}", "--threads", str(args.threads), "--device",
               args.device, "--reps", str(args.reps)]
        res[alloc] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"\n2. Speed at the demo's vocabulary: N={n} tokens (16 x 255), H=256, V=8192 (auto chunk = "
          f"{kd.auto_chunk_tokens(8192)}), forward + backward of 0.5 CE + 0.5 forward KL, median of {args.reps} "
          f"interleaved repeats, {args.threads} threads; malloc 'tuned' = models.tune_cpu_allocator() as the "
          f"specialize stage does on CPU. Ratios are against naive at the same precision.")
    print(f"{'variant':<22}{'ms (default malloc)':>21}{'vs naive':>10}{'ms (tuned malloc)':>19}{'vs naive':>10}")
    for name in res["default"]:
        ref = "naive bf16 autocast" if "bf16" in name else "naive fp32"
        cells = "".join(f"{res[a][name] * 1e3:>{19 if a == 'tuned' else 21}.1f}{res[a][name] / res[a][ref]:>10.2f}"
                        for a in ("default", "tuned"))
        print(f"{name:<22}{cells}")


def cache_precision_table(args: argparse.Namespace) -> None:
    from downscale import kd

    torch.set_num_threads(args.threads)
    n, v, k, h = 2048, 8192, 64, 64
    g = torch.Generator().manual_seed(1)
    rows = []
    for scale in (2.0, 4.0, 8.0):  # flatter to peakier teachers
        w = torch.randn(v, h, generator=g) * h**-0.5
        t = torch.randn(n, h, generator=g) @ w.T * scale  # teacher logits [N, V]
        s = (torch.randn(n, h, generator=g) * scale).requires_grad_()  # student hidden [N, H]
        labels = torch.randint(0, v, (n,), generator=g)
        logp = torch.log_softmax(t, -1)
        vals, ids = torch.topk(logp, k, -1)
        tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1)

        def kd_and_grad(teacher, s=s, w=w, labels=labels):
            loss, st = kd.distill_loss(s, w, labels, teacher, kd_ratio=1.0)
            (gs,) = torch.autograd.grad(loss, [s])
            return st["kd"], gs

        full, g_full = kd_and_grad(kd.LogitTeacher(t))
        d32, g32 = kd_and_grad(kd.SparseTeacher(ids, vals, tail))
        d16, g16 = kd_and_grad(kd.SparseTeacher(ids, vals.half(), tail))
        ent = float(-(logp.exp() * logp).sum(-1).mean())
        mass = float(vals.exp().sum(-1).mean())
        rows.append((scale, ent, mass, full, d32, d16, abs(d16 - d32) / d32, float((g16 - g32).norm() / g32.norm()),
                     abs(d32 - full) / full, float((g32 - g_full).norm() / g_full.norm())))
    print(f"\n3. Teacher-cache precision: top-{k} of V={v}, forward KL, N={n} tokens, random teachers of three "
          f"sharpnesses")
    print(f"{'scale':>6}{'H(p_T)':>8}{'top-k mass':>11}{'KD full':>10}{'KD fp32':>10}{'KD fp16':>10}"
          f"{'fp16 vs fp32: KD':>18}{'grad':>9}{'top-k vs full: KD':>19}{'grad':>9}")
    for r in rows:
        print(f"{r[0]:>6.1f}{r[1]:>8.3f}{r[2]:>11.3f}{r[3]:>10.4f}{r[4]:>10.4f}{r[5]:>10.4f}{r[6]:>18.2e}"
              f"{r[7]:>9.2e}{r[8]:>19.2e}{r[9]:>9.2e}")
    print("(relative errors; fp16 storage is a good choice where its error is far below the top-k truncation's)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-tokens", type=int, default=4096, help="tokens scored in part 4 (8 rows)")
    ap.add_argument("--chunk", type=int, default=0, help="fused chunk tokens; 0: kd.auto_chunk_tokens(vocab)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3, help="timed repeats of each speed variant")
    ap.add_argument("--child", choices=("naive", "fused", "speed-default", "speed-tuned", "score-full",
                                        "score-chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: memory,speed,cache,scoring")
    args = ap.parse_args()
    if args.child in ("speed-default", "speed-tuned"):
        speed_child(args)
        return
    if args.child in ("score-full", "score-chunked"):
        scoring_child(args)
        return
    if args.child:
        args.chunk = args.chunk or None
        child(args)
        return
    skip = set(filter(None, args.skip.split(",")))
    if "memory" not in skip:
        memory_table(args)
    if "speed" not in skip:
        speed_table(args)
    if "cache" not in skip:
        cache_precision_table(args)
    if "scoring" not in skip:
        scoring_table(args)


if __name__ == "__main__":
    main()
