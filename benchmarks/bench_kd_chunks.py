"""The fused KD loss's chunk size, measured: forward + backward time of ``kd.distill_loss`` per chunk size.

At the real-model shape of issue 18 (a pruned SmolLM2-135M student, hidden 456, distilled from the 576-wide base at a
49,152 vocabulary; 8 x 255 tokens, 0.5 forward KL + 0.5 CE, dense online teacher), fp32 and under bf16 autocast,
the loss's forward + backward for chunk sizes from ~128 to the whole batch, interleaved, medians of ``--reps``.
Prints the time of each chunk size relative to the best and to the default ``kd.auto_chunk_tokens`` picks for that
dtype, and the memory of the chunk's fp32 temporaries (one [chunk, V] fp32 tensor; a few live at once). This is the
measurement behind ``kd.AUTO_CHUNK_BYTES`` (the table of chunk budgets per device and dtype).

    .venv/bin/python benchmarks/bench_kd_chunks.py [--threads 2] [--reps 3] [--vocab 49152] [--tokens 2040]

Timings on a shared machine are noisy (+-10-15%); only ratios measured side by side in one run mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    from downscale import kd, models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", type=int, default=8 * 255)
    ap.add_argument("--hidden", type=int, default=456, help="student hidden size (the teacher's is 576)")
    ap.add_argument("--chunks", default="128,170,256,512,1024,2040")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models.tune_cpu_allocator()
    g = torch.Generator().manual_seed(0)
    V, N, H, HT = args.vocab, args.tokens, args.hidden, 576
    w = (torch.randn(V, H, generator=g) * 0.02).requires_grad_(True)
    tw = torch.randn(V, HT, generator=g) * 0.02
    hs = torch.randn(N, H, generator=g)
    ht = torch.randn(N, HT, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    dev = torch.device("cpu")
    results = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; V {V}, {N} tokens, student hidden {H}, "
          f"teacher {HT}; forward + backward of 0.5 forward KL + 0.5 CE", flush=True)
    for precision, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        chunks = sorted({int(c) for c in args.chunks.split(",")} | {kd.auto_chunk_tokens(V, dtype=amp)})
        h = hs.to(amp) if amp else hs
        t_hidden = ht.to(amp) if amp else ht
        teacher = kd.DenseTeacher(t_hidden, tw.to(amp) if amp else tw)

        def run(c, h=h, teacher=teacher, amp=amp):
            x = h.clone().requires_grad_(True)
            t0 = time.perf_counter()
            with models.autocast(dev, amp):
                loss, _ = kd.distill_loss(x, w, labels, teacher, kd_ratio=0.5, chunk_tokens=c)
            loss.backward()
            w.grad = None
            return time.perf_counter() - t0

        times: dict[int, list[float]] = {c: [] for c in chunks}
        for c in chunks:
            run(c)  # warm-up
        for r in range(args.reps):
            for c in (chunks if r % 2 == 0 else chunks[::-1]):
                times[c].append(run(c))
        med = {c: statistics.median(v) for c, v in times.items()}
        best = min(med.values())
        auto = kd.auto_chunk_tokens(V, dtype=amp)
        print(f"\n{precision}: default chunk {auto} tokens", flush=True)
        print(f"{'chunk':>7}{'seconds':>9}{'vs best':>9}{'vs default':>12}{'MiB per [chunk, V] fp32':>26}")
        for c in chunks:
            print(f"{c:>7}{med[c]:>9.3f}{med[c] / best:>8.2f}x{med[c] / med[auto]:>11.2f}x{4 * c * V / 2**20:>26.0f}"
                  + ("   <- default" if c == auto else ""))
        results[precision] = {"seconds": med, "default": auto}
    return results


if __name__ == "__main__":
    main()
