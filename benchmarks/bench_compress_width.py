"""Compress at LLaMA-3-8B width on the CPU: importance, selection and surgery of the pruning path, timed.

The base is a random LLaMA with the published Meta-Llama-3-8B config (tests/fixtures/hf_configs/llama3-8b: hidden
4096, MLP 14336, 32 heads, 8 KV heads, vocab 128,256, untied) cut to ``--layers`` decoder layers (default 2:
1.49B parameters, of which 1.05B are the embedding and the head; 6 GB in fp32, the compress stage's dtype on a
CPU). The student shape is what the planner gives for configs/llama3-8b_to_8x1b.yaml (every student < 1B at full
depth, no depth pruning) with the depth reduced the same way: the same widths, ``--layers`` layers.

For one student (the stage repeats it per shard), as ``stages/compress.py`` runs it: per round (the config asks for
2 rounds with ``max_cut_per_round`` 0.6; the planner makes 3 so that no round cuts more than 60%), activation
importance on ``--calib`` random calibration blocks of ``--calib-len`` tokens (``_scores`` ->
``pruning.importance.calibration_scores``), ``pruning.surgery.select_units``, ``extract_student`` (with the
RMSNorm rescale) and ``verify_student``; the distillation between rounds (``recover_steps``) is not timed. Peak RSS
is printed, and the RSS of the base alone.

The alternative: torch-pruning 1.6's DependencyGraph on the same base and the same kept indices (base -> final
shape in one cut), with the two workarounds of NOTES.md: the rotary embedding patched to an identity while the
graph is traced (it hangs otherwise, VainF/Torch-Pruning#527), and GQA heads cut by hand (its head pruning does
nothing with num_key_value_heads < num_attention_heads). It prunes in place, so each student first needs a copy of
the base. Its MetaPruner is not used: one pruning ratio per group cannot give the planner's exact per-dimension
sizes, and MetaPruner's head pruning is the GQA no-op. Each approach runs in its own process (its own peak RSS) and
cuts right after the base is built, so both pay for touching fresh memory (slow in this VM: first-touch page faults
ran at ~0.3 GB/s); the two students are checked to be identical tensor by tensor.

    .venv/bin/python benchmarks/bench_compress_width.py [--layers 2] [--vocab 128256] [--dtype float32]
        [--calib 4] [--calib-len 256] [--threads 2] [--device cpu] [--skip-tp] [--head-cost] [--json FILE]

On a GPU (not yet run there), the full base: ``--device cuda --layers 32 --dtype bfloat16 --calib 1024
--calib-len 2048`` (memory is then CUDA max allocated).

Times are wall-clock on whatever CPU runs it (2 cores in CI); they say how the steps compare, and what a GPU
run must beat, not what an H100 gives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HF_CONFIG = ROOT / "tests" / "fixtures" / "hf_configs" / "llama3-8b"
RUN_CONFIG = ROOT / "configs" / "llama3-8b_to_8x1b.yaml"
os.environ.setdefault("DOWNSCALE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


DEVICE = "cpu"  # set by --device in the child processes


def clock() -> float:
    """perf_counter after the device finished its queued work."""
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def mem_mb() -> float:
    """Memory in use now: CUDA allocated on a GPU, this process's RSS on the CPU."""
    if DEVICE == "cuda":
        import torch

        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """Peak memory so far: CUDA max allocated on a GPU, this process's peak RSS on the CPU."""
    if DEVICE == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def the_plan(layers: int) -> tuple[object, list, object]:
    """(run config, round shapes at ``layers`` layers, full-depth plan) for configs/llama3-8b_to_8x1b.yaml."""
    from transformers import AutoConfig

    from downscale.config import load_config
    from downscale.stages.compress import make_plan

    cfg = load_config(RUN_CONFIG, [], check_paths=False)
    full = AutoConfig.from_pretrained(HF_CONFIG)
    plan = make_plan(cfg, full, str(HF_CONFIG))
    return cfg, [replace(s, num_layers=layers) for s in plan.rounds], plan


def build_base(args: argparse.Namespace):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(HF_CONFIG)
    config.num_hidden_layers = args.layers
    config.vocab_size = args.vocab
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it runs (an 8B-wide base is not built on the CPU and then moved)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=getattr(torch, args.dtype))
    return model.eval()


def digest(model) -> dict[str, str]:
    """sha256 of every tensor (name -> hex prefix): equal digests = identical students."""
    import torch

    return {name: hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()[:16]
            for name, t in sorted(model.state_dict().items())}


# --------------------------------------------------------------------------- ours


def child_ours(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from downscale import models
    from downscale.pruning.plan import arch_info, count_params
    from downscale.pruning.surgery import extract_student, select_units, verify_student
    from downscale.stages.compress import _scores

    if args.device == "cpu":
        models.tune_cpu_allocator()  # as the compress stage does on a CPU
    cfg, shapes, plan = the_plan(args.layers)
    c = cfg.compress.model_copy(update={"calibration_batch_size": min(cfg.compress.calibration_batch_size,
                                                                       args.calib)})
    mem0 = mem_mb()
    t0 = clock()
    base = build_base(args)
    build_s = clock() - t0
    base_mem = mem_mb() - mem0
    info = arch_info(base.config)
    blocks = np.random.default_rng(0).integers(0, args.vocab, (args.calib, args.calib_len), dtype=np.int64)
    device = torch.device(args.device)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731 - stdout carries the JSON
    log(f"[ours] base: {models.count_params(base):,} params ({args.dtype} on {args.device}), built in {build_s:.1f}s, "
        f"+{base_mem:.0f} MB; rounds {[s.as_dict() for s in shapes]}")
    # Base -> final shape in one cut, first, in fresh memory as torch-pruning's process cuts it (the kept indices
    # come from round 1's scores on the base, which round 1 below then uses).
    t = clock()
    scores0, _ = _scores(base, blocks, c, device, None, None, desc="round 1")
    scores0_s = clock() - t
    final = shapes[-1]
    keep = select_units(scores0, base.config, final)
    t = clock()
    direct = extract_student(base, final, keep, None)
    direct_s = clock() - t
    direct_digest = digest(direct)
    del direct
    Path(args.keep_file).write_text(json.dumps(_plain({"hidden": keep.hidden, "layers": keep.layers,
                                                       "mlp": keep.mlp, "kv": keep.kv, "heads": keep.heads,
                                                       "shape": final.as_dict()})))
    log(f"[ours] one cut base -> final shape: {direct_s:.2f}s")

    rounds, model = [], base
    for r, shape in enumerate(shapes):
        if r == 0:
            scores, t_scores = scores0, scores0_s
        else:
            t = clock()
            scores, _ = _scores(model, blocks, c, device, None, None, desc=f"round {r + 1}")
            t_scores = clock() - t
        t = clock()
        keep = select_units(scores, model.config, shape)
        t_select = clock() - t
        t = clock()
        new = extract_student(model, shape, keep, scores.norm_ms if c.norm_rescale else None)
        t_extract = clock() - t
        t = clock()
        verify_student(new, shape)
        t_verify = clock() - t
        predicted = count_params(info, shape)["total"]
        actual = models.count_params(new)
        if actual != predicted:
            raise RuntimeError(f"round {r + 1}: {actual:,} parameters, the planner says {predicted:,}")
        if model is not base:
            del model
        model = new
        rounds.append({"round": r + 1, "shape": shape.as_dict(), "params": actual, "scores_s": t_scores,
                       "select_s": t_select, "extract_s": t_extract, "verify_s": t_verify})
        log(f"[ours] round {r + 1}: scores {t_scores:.2f}s, select {t_select:.3f}s, surgery {t_extract:.2f}s, "
            f"verify {t_verify:.3f}s -> {actual:,} params")
    student_params = models.count_params(model)
    del model
    peak_compress = peak_mb()

    full_s = decoder_s = None
    if args.head_cost:  # the LM head's share of a calibration pass: activation scores never read the logits
        x = torch.as_tensor(blocks[: c.calibration_batch_size], device=device)
        with torch.no_grad():
            t = clock()
            base(input_ids=x, use_cache=False)
            full_s = clock() - t
            t = clock()
            base.get_decoder()(input_ids=x, use_cache=False)
            decoder_s = clock() - t
    return {"approach": "ours", "build_s": build_s, "base_mem_mb": base_mem, "base_params": models.count_params(base),
            "student_params": student_params, "rounds": rounds, "device": args.device,
            "scores_s": sum(r["scores_s"] for r in rounds), "select_s": sum(r["select_s"] for r in rounds),
            "extract_s": sum(r["extract_s"] for r in rounds), "peak_mb": peak_compress,
            "calib_forward_s": full_s, "calib_decoder_only_s": decoder_s,
            "direct_extract_s": direct_s, "direct_digest": direct_digest, "final_shape": final.as_dict(),
            "memory_kind": "cuda_max_allocated" if args.device == "cuda" else "peak RSS",
            "plan_full_depth": plan.to_dict()["student"], "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- torch-pruning


def child_tp(args: argparse.Namespace) -> dict:
    import copy
    import importlib

    import torch
    import torch_pruning as tp

    from downscale import models

    if args.device == "cpu":
        models.tune_cpu_allocator()
    keep = json.loads(Path(args.keep_file).read_text())  # JSON, no pickle
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    base = build_base(args)
    mem_base = mem_mb()
    t = clock()
    model = copy.deepcopy(base)  # torch-pruning cuts in place: one copy of the base per student
    copy_s = clock() - t
    mod = importlib.import_module(type(model).__module__)
    original = mod.apply_rotary_pos_emb
    mod.apply_rotary_pos_emb = lambda q, k, *a, **kw: (q, k)  # NOTES.md: the rotary trace hangs otherwise
    norms = [(m.weight, 0) for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    t = clock()
    try:
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs={"input_ids": torch.randint(0, args.vocab, (1, 8), device=args.device)},
            unwrapped_parameters=norms,
            verbose=False)
    finally:
        mod.apply_rotary_pos_emb = original
    graph_s = clock() - t
    c = model.config
    hd = c.head_dim
    t = clock()

    def drop(n: int, kept: torch.Tensor) -> list[int]:
        mask = torch.ones(n, dtype=torch.bool)
        mask[kept] = False
        return mask.nonzero().flatten().tolist()

    def channels(heads: list[int]) -> list[int]:
        return [h * hd + j for h in heads for j in range(hd)]

    with torch.no_grad():
        dg.get_pruning_group(model.model.embed_tokens, tp.prune_embedding_out_channels,
                             idxs=drop(c.hidden_size, keep["hidden"])).prune()
        for j, layer in enumerate(model.model.layers):
            dg.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels,
                                 idxs=drop(c.intermediate_size, keep["mlp"][j])).prune()
            a = layer.self_attn  # GQA heads by hand (torch-pruning's head pruning is a no-op with GQA)
            q_drop = channels(drop(c.num_attention_heads, keep["heads"][j]))
            kv_drop = channels(drop(c.num_key_value_heads, keep["kv"][j]))
            if q_drop:
                tp.prune_linear_out_channels(a.q_proj, q_drop)
                tp.prune_linear_in_channels(a.o_proj, q_drop)
            if kv_drop:
                tp.prune_linear_out_channels(a.k_proj, kv_drop)
                tp.prune_linear_out_channels(a.v_proj, kv_drop)
    shape = keep["shape"]
    c.hidden_size, c.intermediate_size = shape["hidden_size"], shape["intermediate_size"]
    c.num_attention_heads, c.num_key_value_heads, c.head_dim = shape["num_heads"], shape["num_kv_heads"], hd
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = shape["num_heads"] // shape["num_kv_heads"]
    prune_s = clock() - t
    log(f"[torch-pruning] copy {copy_s:.2f}s, dependency graph {graph_s:.2f}s, prune {prune_s:.2f}s")
    return {"approach": "torch-pruning", "copy_s": copy_s, "graph_s": graph_s, "prune_s": prune_s,
            "total_s": copy_s + graph_s + prune_s, "peak_mb": peak_mb(), "base_mem_mb": mem_base,
            "digest": digest(model), "student_params": models.count_params(model), "version": tp.__version__}


# --------------------------------------------------------------------------- parent


def run_child(kind: str, args: argparse.Namespace, keep_file: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", kind, "--keep-file", keep_file, "--layers", str(args.layers),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--calib", str(args.calib), "--calib-len",
           str(args.calib_len), "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    cmd += ["--head-cost"] if args.head_cost else []
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{kind}: no result within {args.timeout}s (killed)")
        return None
    if proc.returncode:
        print(f"{kind}: failed with exit {proc.returncode}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plain(x):
    """Tensors and nested containers as JSON-ready lists and numbers."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the base (LLaMA-3-8B has 32)")
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary (LLaMA-3: 128,256)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="dtype of the base (compress loads fp32 on a CPU)")
    ap.add_argument("--calib", type=int, default=4, help="calibration blocks (the config: 1024 of 2048 tokens)")
    ap.add_argument("--calib-len", type=int, default=256, help="tokens per calibration block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the base is built and cut (cuda: memory = max allocated; not yet run on a GPU)")
    ap.add_argument("--skip-tp", action="store_true", help="skip the torch-pruning comparison")
    ap.add_argument("--head-cost", action="store_true",
                    help="also time one calibration batch with and without the LM head (~1 minute more)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed to each approach's process")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--child", choices=("ours", "tp"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--keep-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        global DEVICE
        DEVICE = args.device
        if args.threads:
            torch.set_num_threads(args.threads)
        from downscale.models import quiet_transformers

        quiet_transformers()
        print(json.dumps((child_ours if args.child == "ours" else child_tp)(args)))
        return 0

    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_compress_width_") as tmp:
        keep_file = str(Path(tmp) / "keep.json")
        ours = run_child("ours", args, keep_file)
        if ours is None:
            return 1
        tpr = None if args.skip_tp else run_child("tp", args, keep_file)
    full = ours["plan_full_depth"]
    print(f"\nCompress at LLaMA-3-8B width: base {ours['base_params']:,} params ({args.layers} layers, vocab "
          f"{args.vocab:,}, {args.dtype} on {args.device}, {ours['threads']} threads); student shape "
          f"{ours['final_shape']} = {ours['student_params']:,} params (at 32 layers the planner's student: "
          f"{full['params']['total']:,}, {full['fraction_of_base']:.1%} of 8.03B); {args.calib} calibration blocks "
          f"x {args.calib_len} tokens")
    mem = ours["memory_kind"]
    print(f"  building the random base (not compress): {ours['build_s']:.1f}s, memory of the base "
          f"{ours['base_mem_mb']:.0f} MB")
    print(f"{'':<10}{'shape':<70}{'scores s':>10}{'select s':>10}{'surgery s':>11}")
    for r in ours["rounds"]:
        print(f"  round {r['round']:<2}{json.dumps(r['shape']):<70}{r['scores_s']:>10.2f}{r['select_s']:>10.3f}"
              f"{r['extract_s']:>11.2f}")
    total = ours["scores_s"] + ours["select_s"] + ours["extract_s"]
    print(f"  total: {total:.1f}s for one student (scores {ours['scores_s']:.1f}s, select {ours['select_s']:.2f}s, "
          f"surgery {ours['extract_s']:.2f}s); {mem} {ours['peak_mb']:.0f} MB "
          f"({ours['peak_mb'] / ours['base_mem_mb']:.2f}x the base's memory)")
    if ours["calib_forward_s"]:
        head_share = 1 - ours["calib_decoder_only_s"] / ours["calib_forward_s"]
        print(f"  one calibration batch: full forward {ours['calib_forward_s']:.2f}s, decoder only "
              f"{ours['calib_decoder_only_s']:.2f}s: the LM head (logits unused by activation scores) is "
              f"{head_share:.0%} of the pass at this depth")
    print(f"  surgery base -> final shape in one cut, in fresh memory (the comparison below): "
          f"{ours['direct_extract_s']:.2f}s")
    if args.skip_tp:
        print("torch-pruning: skipped (--skip-tp)")
    elif tpr is None:
        print("torch-pruning: no result (see above)")
    else:
        same = tpr["digest"] == ours["direct_digest"]
        ratio = tpr["total_s"] / ours["direct_extract_s"]
        print(f"torch-pruning {tpr['version']} DependencyGraph, same kept indices: copy of the base "
              f"{tpr['copy_s']:.2f}s + graph {tpr['graph_s']:.2f}s + prune {tpr['prune_s']:.2f}s = "
              f"{tpr['total_s']:.2f}s; {mem} {tpr['peak_mb']:.0f} MB; identical student: {same}")
        print(f"  surgery time torch-pruning / ours = {ratio:.1f}x; {mem} torch-pruning / ours = "
              f"{tpr['peak_mb'] / ours['peak_mb']:.2f}x (ours includes its three rounds and calibration passes)")
        if not same:
            diff = [k for k in ours["direct_digest"] if tpr["digest"].get(k) != ours["direct_digest"][k]]
            print(f"  tensors that differ: {diff[:5]}")
    print(f"{time.time() - t_all:.0f}s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours, "torch_pruning": tpr}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
