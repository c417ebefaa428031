"""Compress stage: prune the base into n students of a planned shape, one per shard.

``downscale compress CONFIG`` reads ``<run>/base/`` and the shards' token blocks and writes
``<run>/students/<i>/`` (HF folders with the run's tokenizer) and ``<run>/students/compress.json``.
``downscale compress CONFIG --plan [--json]`` prints the plan from the HF config alone.

Per student i (shard i): calibration blocks from its own shard (or from all shards), importance
scores on the base (cached under ``<run>/work/compress/scores/`` keyed by the base and data
fingerprints and the calibration settings, so re-pruning to another shape needs no new pass), then
``k`` rounds of select -> cut (-> ``recover`` between rounds), then the validation loss on every
shard right after pruning. The base is loaded once (bf16 on a GPU by default) and is never
modified: each student is cut out of it directly, so memory holds the base plus one student (with
several rounds, briefly two: the previous round's student while the next is cut from it; measured peak
RSS 2.2-2.3x the base, see BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from downscale.pipeline import StageContext, StageError
from downscale.pruning.plan import Plan, PlanError, Policy, arch_info, count_params, plan

Recover = Callable[[Any, int, int], Any]


# --------------------------------------------------------------------------- planning (config only)


def policy_of(cfg) -> Policy:
    """The split policy of ``cfg.compress``."""
    c = cfg.compress
    return Policy(mlp=c.split_mlp, hidden=c.split_hidden, heads=c.split_heads, depth=c.split_depth,
                  prune_depth=c.prune_depth, round_to=c.round_to, head_mode=c.head_mode)


def make_plan(cfg, hf_config, source: str) -> Plan:
    """Plan the students' shape for ``hf_config``; bad input raises StageError (one line, file and field)."""
    try:
        info = arch_info(hf_config)
    except PlanError as exc:
        raise StageError(f"{source}: base.name_or_path: {exc}") from None
    c = cfg.compress
    try:
        return plan(info, c.target_params, c.shape.model_dump(), policy_of(cfg), rounds=c.rounds,
                    max_cut_per_round=c.max_cut_per_round)
    except PlanError as exc:
        raise StageError(f"{cfg._source}: {exc.field}: {exc}") from None


def base_hf_config(cfg) -> tuple[Any, str]:
    """The base's HF config without weights: ``<run>/base/config.json`` if it exists, else
    ``base.name_or_path`` (a local folder, or a hub id where the hub is reachable), else built from
    ``base.init`` on the meta device (vocabulary from ``<run>/data/meta.json`` or the tokenizer settings)."""
    from transformers import AutoConfig

    from downscale.models import quiet_transformers

    quiet_transformers()
    run_dir = cfg.run_dir
    local = run_dir / "base" / "config.json"
    if local.is_file():
        try:
            return AutoConfig.from_pretrained(local.parent, trust_remote_code=cfg.base.trust_remote_code), str(local)
        except (ValueError, KeyError, OSError) as exc:
            raise StageError(f"{local}: base.name_or_path: cannot read the base's config ({exc})") from None
    if cfg.base.name_or_path:
        try:
            return AutoConfig.from_pretrained(cfg.base.name_or_path, revision=cfg.base.revision,
                                              trust_remote_code=cfg.base.trust_remote_code), cfg.base.name_or_path
        except (ValueError, KeyError, OSError) as exc:
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise StageError(f"{cfg._source}: base.name_or_path: cannot read the config of "
                             f"{cfg.base.name_or_path!r} ({msg})") from None
    import torch

    from downscale.models import build_model

    meta_path = run_dir / "data" / "meta.json"
    vocab = int(json.loads(meta_path.read_text())["vocab_size"]) if meta_path.is_file() \
        else cfg.data.tokenizer.vocab_size
    with torch.device("meta"):
        model = build_model(cfg.base.init, vocab_size=vocab, max_positions=cfg.data.block_size)
    return model.config, f"{cfg._source} (base.init)"


def plan_command(cfg, as_json: bool = False) -> int:
    """``downscale compress CONFIG --plan [--json]``: print the plan, load no weights."""
    hf_config, source = base_hf_config(cfg)
    p = make_plan(cfg, hf_config, source)
    out = {"source": source, "num_students": cfg.num_students, **p.to_dict()}
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    base, stud = p.base_params, p.params
    print(f"base: {p.model_type} from {source}, {base['total']:,} parameters, head_dim {p.head_dim}")
    print(f"target: {p.target:,} parameters" if p.target is not None else "target: none (explicit shape)")
    print(f"{'':<20}{'base':>16}{'student':>16}")
    for k, v in p.base.as_dict().items():
        print(f"{k:<20}{v:>16,}{getattr(p.shape, k):>16,}")
    for k in ("embedding", "attention", "mlp", "norms", "head", "total"):
        print(f"params: {k:<12}{base[k]:>16,}{stud[k]:>16,}")
    print(f"{cfg.num_students} students of {stud['total']:,} parameters each ({stud['total'] / base['total']:.1%} "
          f"of the base); head mode {p.head_mode}")
    for i, (s, n) in enumerate(zip(p.rounds, p.round_params, strict=True)):
        print(f"  round {i + 1}: {s.as_dict()} -> {n['total']:,} ({n['total'] / base['total']:.1%})")
    return 0


# --------------------------------------------------------------------------- the stage


def run(ctx: StageContext, recover: Recover | None = None) -> dict:
    """Prune the base into ``cfg.num_students`` students; ``recover(model, round_index, student_index)
    -> model`` runs between iterative rounds (not after the last)."""
    import numpy as np
    import torch

    from downscale import models
    from downscale.data.blocks import open_split, shard_names
    from downscale.pipeline import load_manifest
    from downscale.pruning.surgery import extract_student, select_units, verify_student

    cfg, c, run_dir = ctx.cfg, ctx.cfg.compress, ctx.run_dir
    base_dir = run_dir / "base"
    if not (base_dir / "config.json").is_file():
        raise StageError(f"{base_dir}: base.name_or_path: no base model here (config.json missing); "
                         f"run `downscale base` first")
    hf_config, source = base_hf_config(cfg)
    the_plan = make_plan(cfg, hf_config, source)
    shards = shard_names(run_dir)
    if len(shards) != cfg.num_students:
        raise StageError(f"{run_dir / 'data' / 'meta.json'}: compress.num_students: the data has {len(shards)} "
                         f"shards but the config asks for {cfg.num_students} students (one per shard)")
    for s in shards:
        if len(open_split(run_dir, s, "train")) == 0:
            raise StageError(f"{run_dir / 'data' / s}: compress.calibration: shard {s!r} has no train blocks")

    device, amp = models.setup_runtime(cfg.run, tune_allocator=True)
    dtype = _load_dtype(cfg.base.dtype, device)
    t_load = time.time()
    base = models.load_causal_lm(base_dir, dtype=dtype, device=device, trust_remote_code=cfg.base.trust_remote_code)
    base.eval()
    base.config.use_cache = False
    ctx.log(f"[compress] base {the_plan.model_type} {the_plan.base_params['total']:,} params loaded in "
            f"{time.time() - t_load:.1f}s ({str(dtype).removeprefix('torch.')} on {device}); students of "
            f"{the_plan.params['total']:,} ({the_plan.params['total'] / the_plan.base_params['total']:.1%}) "
            f"in {len(the_plan.rounds)} round(s), importance {c.importance}")

    def val_losses(model) -> dict[str, float]:
        out, tot, cnt = {}, 0.0, 0
        for s in shards:
            blocks = open_split(run_dir, s, "val")[: c.val_blocks]
            loss, n = models.mean_nll(model, blocks, c.calibration_batch_size, device, amp)
            out[s], tot, cnt = loss, tot + loss * n, cnt + n
        out["pooled"] = tot / cnt if cnt else float("nan")
        return out

    base_val = val_losses(base)
    if recover is None and c.recover_steps > 0 and len(the_plan.rounds) > 1:
        from downscale.stages.specialize import distillation_recovery

        recover = distillation_recovery(ctx, base, shards, device, amp)
    manifest = load_manifest(run_dir)["stages"]
    fingerprints = {k: manifest.get(k, {}).get("outputs", {}) for k in ("data", "base")}
    rng_seed = cfg.run.seed
    out_dir = ctx.output("students")
    out_dir.mkdir(parents=True, exist_ok=True)
    score_dir = ctx.work_dir("scores")
    students = []
    for i, shard in enumerate(shards):
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        calib_shards = [shard] if c.calibration == "own_shard" else list(shards)
        blocks = _calibration_blocks(run_dir, calib_shards, c.calibration_sequences, rng_seed, open_split, np)
        key = _score_key(fingerprints, c, calib_shards, len(blocks), rng_seed, dtype, amp, device)
        model, rounds_log = base, []
        for r, shape in enumerate(the_plan.rounds):
            tr = time.time()
            scores, how = _scores(model, blocks, c, device, amp, score_dir / f"{key}.safetensors" if r == 0 else None,
                                  desc=f"student {i} round {r + 1} scores")
            norm_ms = scores.norm_ms if c.norm_rescale else None
            keep = select_units(scores, model.config, shape)
            new = extract_student(model, shape, keep, norm_ms)
            verify_student(new, shape)
            if model is not base:
                del model
            model = new
            predicted = count_params(arch_info(hf_config), shape)["total"]
            actual = models.count_params(model)
            if actual != predicted:
                raise RuntimeError(f"student {i} round {r + 1}: {actual:,} parameters, planner said {predicted:,}")
            rounds_log.append({"round": r + 1, "shape": shape.as_dict(), "params": actual, "scores": how,
                               "kept_layers": keep.layers, "seconds": round(time.time() - tr, 2)})
            ctx.log(f"[compress] student {i} ({shard}) round {r + 1}/{len(the_plan.rounds)}: {shape.as_dict()} "
                    f"-> {actual:,} params (scores {how})")
            if recover is not None and r < len(the_plan.rounds) - 1:
                model = recover(model, r, i)
                model.eval()
        val = val_losses(model)
        entry = {
            "index": i, "path": str(i), "shard": shard, "calibration_shards": calib_shards,
            "calibration_blocks": int(len(blocks)), "importance": c.importance,
            "shape": the_plan.shape.as_dict(), "head_dim": the_plan.head_dim,
            "params": count_params(arch_info(hf_config), the_plan.shape),
            "fraction_of_base": round(models.count_params(model) / the_plan.base_params["total"], 6),
            "rounds": rounds_log, "recovered_between_rounds": recover is not None and len(the_plan.rounds) > 1,
            "val_loss": val, "val_loss_increase": {k: val[k] - base_val[k] for k in val},
            "seconds": round(time.time() - t0, 2), **_peak_memory(device),
        }
        model.config.use_cache = True
        models.save_causal_lm(model, out_dir / str(i), tokenizer_dir=run_dir / "tokenizer",
                              extra_files={"compress_student.json": entry})
        students.append(entry)
        ctx.log(f"[compress] student {i} ({shard}): val loss pooled {val['pooled']:.3f} (base "
                f"{base_val['pooled']:.3f}) in {entry['seconds']:.1f}s")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {
        "base": {"path": "base", "model_type": the_plan.model_type, "shape": the_plan.base.as_dict(),
                 "head_dim": the_plan.head_dim, "params": the_plan.base_params, "val_loss": base_val},
        "plan": the_plan.to_dict(),
        "settings": {"importance": c.importance, "calibration": c.calibration,
                     "calibration_sequences": c.calibration_sequences, "head_mode": the_plan.head_mode,
                     "norm_rescale": c.norm_rescale, "val_blocks": c.val_blocks, "device": str(device),
                     "dtype": str(dtype).removeprefix("torch."),
                     "precision": str(amp or "fp32").removeprefix("torch.")},
        "students": students,
    }
    from downscale._io import write_json_atomic

    write_json_atomic(out_dir / "compress.json", report)
    _log_table(ctx, shards, base_val, students)
    return {"students": len(students), "params": the_plan.params["total"],
            "fraction_of_base": round(the_plan.params["total"] / the_plan.base_params["total"], 6),
            "shape": the_plan.shape.as_dict(), "val_loss_pooled": [s["val_loss"]["pooled"] for s in students],
            "base_val_loss_pooled": base_val["pooled"]}


# --------------------------------------------------------------------------- helpers


def _load_dtype(name: str, device) -> str:
    """``base.dtype`` for compress: auto = bf16 on a GPU that has it (fp16 otherwise), fp32 on CPU."""
    import torch

    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _calibration_blocks(run_dir: Path, shards: list[str], n: int, seed: int, open_split, np):
    """``n`` train blocks drawn without replacement (seeded), split evenly over ``shards``."""
    per = [n // len(shards) + (1 if k < n % len(shards) else 0) for k in range(len(shards))]
    parts = []
    for k, (s, want) in enumerate(zip(shards, per, strict=True)):
        data = open_split(run_dir, s, "train")
        take = min(want, len(data))
        rng = np.random.default_rng([seed, k, len(data)])
        idx = np.sort(rng.choice(len(data), size=take, replace=False))
        parts.append(np.asarray(data[idx], dtype=np.int64))
    return np.concatenate(parts, axis=0)


def _score_key(fingerprints: dict, c, shards: list[str], n_blocks: int, seed: int, dtype, amp, device) -> str:
    payload = {"fingerprints": fingerprints, "method": c.importance, "shards": shards, "blocks": n_blocks,
               "seed": seed, "dtype": str(dtype), "amp": str(amp), "device": device.type,
               "batch_size": c.calibration_batch_size}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _scores(model, blocks, c, device, amp, cache: Path | None, desc: str):
    """Scores from the cache (round 1 on the base) or a new calibration pass; returns (scores, how)."""
    from downscale.pruning.importance import calibration_scores, load_scores, save_scores

    if cache is not None and cache.is_file():
        return load_scores(cache), "cached"
    scores = calibration_scores(model, blocks, c.importance, c.calibration_batch_size, device, amp, desc=desc)
    if cache is not None:
        save_scores(scores, cache)
    return scores, "computed"


def _peak_memory(device) -> dict:
    import resource

    import torch

    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda_max_allocated (this student)"}
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "process_peak_rss (so far)"}


def _log_table(ctx: StageContext, shards: list[str], base_val: dict, students: list[dict]) -> None:
    cols = [*shards, "pooled"]
    ctx.log("[compress] validation loss right after pruning (nats/token):")
    ctx.log("  " + f"{'model':<12}" + "".join(f"{s[:10]:>11}" for s in cols))
    ctx.log("  " + f"{'base':<12}" + "".join(f"{base_val[s]:>11.3f}" for s in cols))
    for st in students:
        ctx.log("  " + f"{'student ' + str(st['index']):<12}" + "".join(f"{st['val_loss'][s]:>11.3f}" for s in cols))


__all__ = ["run", "plan_command", "make_plan", "base_hf_config", "policy_of"]
