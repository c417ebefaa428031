"""Ensemble fast path (stacked, batched students) vs the students run one after another.

For n = 2, 4, 8 students of one shape (a small LLaMA: hidden 256, 4 layers, vocab 8192), scores a
batch of 8 x 256 tokens (forward, eval) with both paths, interleaved, repeated, and prints the
median time of each and their ratio; then the same for a small batch (1 x 64 tokens, n = 8), and
greedy generation tokens/s for both paths (n = 2, 8). The goal: the fast path >= 1.5x the
sequential one at n = 8 on CPU (forward, 8 x 256).

Sparse generation (mode ``sparse``, top-1, Bayes router: every student reads the prompt, then the chosen one
decodes alone) against dense routed generation (every student every step, the fast path), one student's own
``generate`` and a base of about 1.7x a student's size, at n = 3 and 8: tokens/s for the same prompt and length.
Goals: sparse top-1 within 1.3x of one student's own generation time, and >= 2x faster than dense routed at n = 3.

    .venv/bin/python benchmarks/bench_ensemble.py [--quick] [--modes logit_mean,prob_mean] [--threads 2]
    .venv/bin/python benchmarks/bench_ensemble.py --ensemble RUN/ensemble   # sparse vs dense routed, saved students

Timings on a shared machine are noisy (+-10-15%); only ratios measured side by side in one run
mean anything.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def _students(n: int, hidden: int, layers: int, vocab: int, seed: int = 0) -> list:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                               num_hidden_layers=layers, num_attention_heads=hidden // 32,
                               num_key_value_heads=hidden // 64, head_dim=32, max_position_embeddings=1024,
                               tie_word_embeddings=True)
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out.append(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval())
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_forward(ns: list[int], modes: list[str], repeats: int, batch: int, seq: int, hidden: int, layers: int,
                  vocab: int) -> list[dict]:
    from downscale.ensemble import EnsembleModel

    rows = []
    students = _students(max(ns), hidden, layers, vocab)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    for n in ns:
        ens = EnsembleModel(students[:n], mode=modes[0])
        assert ens.uses_fast_path, ens.fallback_reason
        for mode in modes:
            ens.mode = mode
            times: dict[bool, list[float]] = {True: [], False: []}
            with torch.no_grad():
                for fast in (True, False):  # warm-up, and the two paths must agree
                    ens.fast = fast
                    out = ens(ids).logits
                    if fast:
                        ref = out
                    else:
                        diff = float((out - ref).abs().max())
                for r in range(repeats):
                    for fast in ((True, False) if r % 2 == 0 else (False, True)):  # interleaved, alternating order
                        ens.fast = fast
                        times[fast].append(_time(lambda e=ens: e(ids)))
            fast_s, seq_s = statistics.median(times[True]), statistics.median(times[False])
            row = {"n": n, "mode": mode, "fast_s": fast_s, "sequential_s": seq_s, "ratio": seq_s / fast_s,
                   "tokens_per_s_fast": batch * seq / fast_s, "tokens_per_s_sequential": batch * seq / seq_s,
                   "max_abs_diff": diff, "repeats": repeats}
            rows.append(row)
            print(f"forward n={n} {mode:10s}: fast {fast_s * 1e3:8.1f} ms  sequential {seq_s * 1e3:8.1f} ms  "
                  f"ratio {row['ratio']:.2f}x  (max |diff| {diff:.1e})", flush=True)
        ens.fast = True
    return rows


def bench_generate(n: int, mode: str, repeats: int, batch: int, prompt: int, new: int, hidden: int, layers: int,
                   vocab: int) -> dict:
    from downscale.ensemble import EnsembleModel

    ens = EnsembleModel(_students(n, hidden, layers, vocab), mode=mode)
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(1))
    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for r in range(repeats + 1):
        for fast in ((True, False) if r % 2 == 0 else (False, True)):
            ens.fast = fast
            t = _time(lambda f=fast: outs.__setitem__(f, ens.generate(ids, max_new_tokens=new, eos_token_id=[])))
            if r:  # the first round warms up
                times[fast].append(t)
    same = bool(torch.equal(outs[True], outs[False]))
    fast_s, seq_s = statistics.median(times[True]), statistics.median(times[False])
    row = {"n": n, "mode": mode, "batch": batch, "new_tokens": new, "tokens_per_s_fast": batch * new / fast_s,
           "tokens_per_s_sequential": batch * new / seq_s, "ratio": seq_s / fast_s, "same_tokens": same}
    print(f"generate n={n} {mode:10s} batch {batch}, {new} new tokens: fast {row['tokens_per_s_fast']:7.1f} tok/s  "
          f"sequential {row['tokens_per_s_sequential']:7.1f} tok/s  ratio {row['ratio']:.2f}x  "
          f"(same tokens: {same})", flush=True)
    return row


def bench_sparse_generate(n: int, repeats: int, batch: int, prompt: int, new: int, hidden: int, layers: int,
                          vocab: int) -> dict:
    """Greedy generation of ``new`` tokens after the same prompt: sparse top-1, dense routed, one student's own
    HF generate, and the base (hidden x 1.25, one more layer); interleaved rounds, medians."""
    from downscale.ensemble import EnsembleModel

    students = _students(n, hidden, layers, vocab)
    base = _students(1, hidden + hidden // 4, layers + 1, vocab, seed=100)[0]
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(2))
    # Each contender owns its weights, as a user's would: an ensemble's fast path re-points its students' parameters
    # into one stack, so two ensembles over the same student objects would re-stack each other's weights on every
    # call (~130 ms at hidden 512 x 8 layers, n = 3), and a stacked student's own head is a strided view.
    one = copy.deepcopy(students[0])
    dense = EnsembleModel(copy.deepcopy(students), mode="routed")
    sparse = EnsembleModel(students, mode="sparse", sparse_top_k=1)

    def hf(model):
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                              eos_token_id=None)

    runs = {"sparse top-1": lambda: sparse.generate(ids, max_new_tokens=new, eos_token_id=[]),
            "dense routed": lambda: dense.generate(ids, max_new_tokens=new, eos_token_id=[]),
            "one student": lambda: hf(one), "base": lambda: hf(base)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for r in range(repeats + 1):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t = _time(runs[name])
                if r:  # the first round warms up
                    times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"n": n, "batch": batch, "prompt": prompt, "new_tokens": new,
           "tokens_per_s": {k: batch * new / v for k, v in med.items()},
           "sparse_vs_one_student": med["sparse top-1"] / med["one student"],
           "dense_vs_sparse": med["dense routed"] / med["sparse top-1"],
           "sparse_vs_base": med["sparse top-1"] / med["base"],
           "params": {"student": sum(p.numel() for p in one.parameters()),
                      "base": sum(p.numel() for p in base.parameters())}}
    print(f"generate n={n} batch {batch}, prompt {prompt}, {new} new tokens: "
          + ", ".join(f"{k} {v:6.1f} tok/s" for k, v in row["tokens_per_s"].items())
          + f"; sparse / one student time {row['sparse_vs_one_student']:.2f}x, dense routed / sparse "
            f"{row['dense_vs_sparse']:.2f}x, sparse / base {row['sparse_vs_base']:.2f}x", flush=True)
    return row


def bench_saved_ensemble(path: str, repeats: int, prompt: int = 32, new: int = 32) -> dict:
    """Sparse top-1 against dense routed generation on a saved ensemble (e.g. a run's ``ensemble/`` of real
    students), each mode its own load of the students: batch 1, a ``prompt``-token prompt, ``new`` greedy tokens;
    also whether the fast path's text equals the Hugging Face path's."""
    from downscale.ensemble_io import load_ensemble

    sparse, dense = load_ensemble(path, mode="sparse"), load_ensemble(path, mode="routed")
    prompts = ["def parse_config(path):\n    \"\"\"Read the file", "The function returns a list of",
               "The Licensee shall not, without prior written consent,"]
    with torch.no_grad():
        fast_text = sparse.generate_text(prompts, max_new_tokens=24)
        sparse.fast = False
        same = fast_text == sparse.generate_text(prompts, max_new_tokens=24)
        sparse.fast = True
        ids = sparse.tokenizer(" ".join(prompts * 8), return_tensors="pt").input_ids[:, :prompt]
        runs = {"sparse top-1": lambda: sparse.generate(ids, max_new_tokens=new, eos_token_id=[]),
                "dense routed": lambda: dense.generate(ids, max_new_tokens=new, eos_token_id=[])}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(repeats + 1):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t = _time(runs[name])
                if r:
                    times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"ensemble": path, "n": sparse.n, "fast_path": sparse.uses_fast_path, "prompt": prompt, "new_tokens": new,
           "tokens_per_s": {k: new / v for k, v in med.items()},
           "dense_vs_sparse": med["dense routed"] / med["sparse top-1"], "fast_text_equals_hf_path": same}
    print(f"saved ensemble {path} (n={sparse.n}, fast path {sparse.uses_fast_path}): "
          + ", ".join(f"{k} {v:6.1f} tok/s" for k, v in row["tokens_per_s"].items())
          + f"; dense routed / sparse {row['dense_vs_sparse']:.2f}x; fast path text == HF path text: {same}",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (a smoke run)")
    p.add_argument("--modes", default="logit_mean,prob_mean", help="comma-separated ensemble modes to time")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--sparse-only", action="store_true", help="only the sparse generation comparison")
    p.add_argument("--gen-size", default=None, help="HIDDEN,LAYERS of the sparse generation students (default: the "
                   "forward benchmark's; e.g. 512,8 for students whose weights do not fit in the CPU's caches)")
    p.add_argument("--ensemble", default=None, help="only sparse vs dense routed generation on this saved ensemble "
                   "(a run's ensemble/ folder, e.g. of the real SmolLM2 students)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from downscale.models import quiet_transformers

    quiet_transformers()
    if args.ensemble:
        result = {"saved_ensemble": bench_saved_ensemble(args.ensemble, args.repeats or 3),
                  "threads": torch.get_num_threads()}
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)
        return result
    size = dict(hidden=128, layers=2, vocab=2048) if args.quick else dict(hidden=256, layers=4, vocab=8192)
    repeats = args.repeats or (2 if args.quick else 3)
    modes = [m for m in args.modes.split(",") if m]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LLaMA hidden {size['hidden']}, "
          f"{size['layers']} layers, vocab {size['vocab']}; batch 8 x {128 if args.quick else 256} tokens", flush=True)
    t0 = time.time()
    fwd, small, gen = [], [], []
    if not args.sparse_only:
        fwd = bench_forward([2, 4, 8], modes, repeats, 8, 128 if args.quick else 256, **size)
        print("small batches (1 x 64 tokens: per-op overhead matters more than FLOPs):", flush=True)
        small = bench_forward([8], modes[:1], repeats + 2, 1, 64, **size)
        gen = [bench_generate(n, modes[0], max(1, repeats - 1), 4, 16, 8 if args.quick else 24, **size)
               for n in (2, 8)]
    gsize = dict(size)
    if args.gen_size:
        gsize["hidden"], gsize["layers"] = (int(x) for x in args.gen_size.split(","))
        print(f"sparse generation students: hidden {gsize['hidden']}, {gsize['layers']} layers", flush=True)
    sparse_gen = [bench_sparse_generate(n, repeats, 1, 32, 8 if args.quick else 32, **gsize) for n in (3, 8)]
    at3 = next(r for r in sparse_gen if r["n"] == 3)
    sparse_goal = at3["sparse_vs_one_student"] <= 1.3 and at3["dense_vs_sparse"] >= 2.0
    print(f"goal (sparse top-1 generation <= 1.3x one student's time and >= 2x faster than dense routed, n=3): "
          f"{'MET' if sparse_goal else 'NOT MET'} ({at3['sparse_vs_one_student']:.2f}x, "
          f"{at3['dense_vs_sparse']:.2f}x); {time.time() - t0:.0f}s", flush=True)
    at8 = [r for r in fwd if r["n"] == 8]
    goal = bool(at8) and all(r["ratio"] >= 1.5 for r in at8)
    detail = ", ".join(f"{r['mode']} {r['ratio']:.2f}x" for r in at8)
    if at8:
        print(f"goal (fast path >= 1.5x sequential at n=8, forward): {'MET' if goal else 'NOT MET'} ({detail})",
              flush=True)
    result = {"forward": fwd, "forward_small_batch": small, "generate": gen, "goal_met": goal,
              "sparse_generate": sparse_gen, "sparse_goal_met": sparse_goal,
              "threads": torch.get_num_threads(), **size}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
