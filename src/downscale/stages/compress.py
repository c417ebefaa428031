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
                    max_cut_per_round=effective_max_cut(c))
    except PlanError as exc:
        raise StageError(f"{cfg._source}: {exc.field}: {exc}") from None


def effective_max_cut(c) -> float:
    """``max_cut_per_round`` adds rounds only when a recovery runs between them (``recover_steps``): rounds
    without recovery only re-score a damaged model, and measured on SmolLM2-135M at 0.4 they were far worse than
    one shot (10.6 vs 8.1 nats on held-out code). ``rounds`` set explicitly is always honoured."""
    return c.max_cut_per_round if c.recover_steps > 0 else 1.0


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
        from downscale.config import resolve_base_path

        kwargs = {"gguf_file": cfg.base.gguf_file} if cfg.base.gguf_file else {}
        try:
            folder = resolve_base_path(cfg.base.name_or_path, cfg._source)
            return AutoConfig.from_pretrained(folder, revision=cfg.base.revision,
                                              trust_remote_code=cfg.base.trust_remote_code, **kwargs), \
                cfg.base.name_or_path
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
    import torch

    from downscale import models
    from downscale.data.blocks import open_split, shard_names
    from downscale.pipeline import load_manifest
    from downscale.pruning.plan import plan_rounds
    from downscale.pruning.reconstruct import collect_grams, refit_student
    from downscale.pruning.surgery import extract_student, select_units, verify_student

    cfg, c, run_dir = ctx.cfg, ctx.cfg.compress, ctx.run_dir
    base_dir = run_dir / "base"
    if not (base_dir / "config.json").is_file():
        raise StageError(f"{base_dir}: base.name_or_path: no base model here (config.json missing); "
                         f"run `downscale base` first")
    hf_config, source = base_hf_config(cfg)
    the_plan = make_plan(cfg, hf_config, source)
    info = arch_info(hf_config)
    shards = shard_names(run_dir)
    if len(shards) != cfg.num_students:
        raise StageError(f"{run_dir / 'data' / 'meta.json'}: compress.num_students: the data has {len(shards)} "
                         f"shards but the config asks for {cfg.num_students} students (one per shard)")
    for s in shards:
        if len(open_split(run_dir, s, "train")) == 0:
            raise StageError(f"{run_dir / 'data' / s}: compress.calibration: shard {s!r} has no train blocks")
    if c.importance == "magnitude":
        ctx.log("[compress] warning: importance 'magnitude' ignores the scale of each weight's input and can be "
                "worse than random channels on trained LLMs (see the random baseline in compress.json)")

    device, amp = models.setup_runtime(cfg.run, tune_allocator=True)
    dtype = _load_dtype(cfg.base.dtype, device)
    t_load = time.time()
    base = models.load_causal_lm(base_dir, dtype=dtype, device=device, trust_remote_code=cfg.base.trust_remote_code)
    base.eval()
    base.config.use_cache = False
    ctx.log(f"[compress] base {the_plan.model_type} {the_plan.base_params['total']:,} params loaded in "
            f"{time.time() - t_load:.1f}s ({str(dtype).removeprefix('torch.')} on {device}); budget "
            f"{the_plan.params['total']:,} ({the_plan.params['total'] / the_plan.base_params['total']:.1%}) per "
            f"student, importance {c.importance}")

    def val_losses(model) -> dict[str, float]:
        out, tot, cnt = {}, 0.0, 0
        for s in shards:
            blocks = open_split(run_dir, s, "val")[: c.val_blocks]
            loss, n = models.mean_nll(model, blocks, c.calibration_batch_size, device, amp)
            out[s], tot, cnt = loss, tot + loss * n, cnt + n
        out["pooled"] = tot / cnt if cnt else float("nan")
        return out

    base_val = val_losses(base)
    needs_recovery = c.recover_steps > 0 or c.search.distill_steps > 0
    distill_factory = None
    if needs_recovery:
        from downscale.stages.specialize import distillation_recovery

        distill_factory = lambda steps: distillation_recovery(ctx, base, shards, device, amp, steps=steps)  # noqa: E731
    manifest = load_manifest(run_dir)["stages"]
    fingerprints = {k: manifest.get(k, {}).get("outputs", {}) for k in ("data", "base")}
    rng_seed = cfg.run.seed
    out_dir = ctx.output("students")
    out_dir.mkdir(parents=True, exist_ok=True)
    score_dir = ctx.work_dir("scores")

    # 1. importance scores of every student on the base (cached: pruning again to another shape needs no pass)
    calib = []
    for i, shard in enumerate(shards):
        t0 = time.time()
        calib_shards = [shard] if c.calibration == "own_shard" else list(shards)
        blocks, used = _calibration_blocks(run_dir, calib_shards, c.calibration_sequences, rng_seed, open_split)
        key = _score_key(fingerprints, c, calib_shards, len(blocks), rng_seed, dtype, amp, device, i)
        scores, how = _scores(base, blocks, c, device, amp, score_dir / f"{key}.safetensors",
                              desc=f"student {i} scores", seed=_seed(rng_seed, i))
        grams = None
        if c.reconstruct:
            grams = collect_grams(base, blocks, c.calibration_batch_size, device, amp,
                                  desc=f"student {i} gram matrices")
        calib.append({"shards": calib_shards, "blocks": blocks, "used": used, "key": key, "scores": scores,
                      "how": how, "grams": grams, "seconds": time.time() - t0})
    if c.reconstruct:
        ctx.log(f"[compress] reconstruct: Gram matrices of the down_proj/o_proj inputs, "
                f"{sum(x['grams'].nbytes() for x in calib) / 2**30:.2f} GiB for {len(calib)} students")

    # 2. the shape: the search's best (shared by every student), or the split policy's
    t_search = time.time()
    search_report, chosen = _choose_shape(ctx, base, info, the_plan, hf_config, shards, calib, device, amp,
                                          distill_factory(c.search.distill_steps) if c.search.distill_steps else None)
    if chosen == the_plan.shape:
        rounds = the_plan.rounds
    else:
        rounds = plan_rounds(info, chosen, c.rounds, effective_max_cut(c), policy_of(cfg))
    # later rounds' scores are cached too, unless a hook the config does not describe recovers between rounds
    cache_rounds = recover is None
    if recover is None and c.recover_steps > 0 and len(rounds) > 1:
        recover = distill_factory(c.recover_steps)
    chosen_params = count_params(info, chosen)
    if search_report is not None:
        search_report["seconds"] = round(time.time() - t_search, 2)

    # 3. cut every student, round by round
    students = []
    for i, shard in enumerate(shards):
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cal = calib[i]
        model, rounds_log = base, []
        for r, shape in enumerate(rounds):
            tr = time.time()
            if r == 0:
                scores, how = cal["scores"], cal["how"]
            else:  # scores of the previous round's (recovered) student, cached per round
                rkey = _round_key(cal["key"], r, rounds, c, cfg)
                cache = score_dir / "rounds" / f"{rkey}.safetensors" if cache_rounds else None
                scores, how = _scores(model, cal["blocks"], c, device, amp, cache,
                                      desc=f"student {i} round {r + 1} scores", seed=_seed(rng_seed, i) + r)
            norm_ms = scores.norm_ms if c.norm_rescale else None
            keep = select_units(scores, model.config, shape)
            new = extract_student(model, shape, keep, norm_ms)
            refit = 0
            if c.reconstruct:  # the previous round's student has its own Gram matrices
                grams = cal["grams"] if r == 0 else collect_grams(model, cal["blocks"], c.calibration_batch_size,
                                                                  device, amp, desc=f"student {i} round {r + 1} grams")
                refit = refit_student(new, model, keep, grams, c.reconstruct_damp)
            verify_student(new, shape)
            if model is not base:
                del model
            model = new
            predicted = count_params(info, shape)["total"]
            actual = models.count_params(model)
            if actual != predicted:
                raise RuntimeError(f"student {i} round {r + 1}: {actual:,} parameters, planner said {predicted:,}")
            rounds_log.append({"round": r + 1, "shape": shape.as_dict(), "params": actual, "scores": how,
                               "kept_layers": keep.layers, "refit_projections": refit,
                               "seconds": round(time.time() - tr, 2)})
            ctx.log(f"[compress] student {i} ({shard}) round {r + 1}/{len(rounds)}: {shape.as_dict()} "
                    f"-> {actual:,} params (scores {how})")
            if recover is not None and r < len(rounds) - 1:
                model = recover(model, r, i)
                model.eval()
        val = val_losses(model)
        entry = {
            "index": i, "path": str(i), "shard": shard, "calibration_shards": cal["shards"],
            "calibration_blocks": int(len(cal["blocks"])), "importance": c.importance,
            "shape": chosen.as_dict(), "head_dim": the_plan.head_dim, "params": chosen_params,
            "fraction_of_base": round(models.count_params(model) / the_plan.base_params["total"], 6),
            "rounds": rounds_log, "recovered_between_rounds": recover is not None and len(rounds) > 1,
            "val_loss": val, "val_loss_increase": {k: val[k] - base_val[k] for k in val},
        }
        entry.update(_baselines(ctx, base, cal, chosen, the_plan.shape, val_losses, c, i))
        entry.update({"seconds": round(time.time() - t0 + cal["seconds"], 2), **_peak_memory(device)})
        model.config.use_cache = True
        models.save_causal_lm(model, out_dir / str(i), tokenizer_dir=run_dir / "tokenizer",
                              extra_files={"compress_student.json": entry})
        entry["reload_max_abs_logit_diff"] = _reload_check(model, out_dir / str(i), open_split(run_dir, shard, "val"))
        students.append(entry)
        rb = entry.get("random_baseline", {}).get("val_loss", {}).get("pooled")
        wr = entry.get("without_reconstruct", {}).get("val_loss", {}).get("pooled")
        ctx.log(f"[compress] student {i} ({shard}): val loss pooled {val['pooled']:.3f} (base "
                f"{base_val['pooled']:.3f}" + (f"; random importance {rb:.3f}" if rb is not None else "") +
                (f"; without the refit {wr:.3f}" if wr is not None else "") +
                f") in {entry['seconds']:.1f}s")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    plan_dict = the_plan.to_dict()
    plan_dict["chosen"] = {"shape": chosen.as_dict(), "params": chosen_params,
                           "fraction_of_base": round(chosen_params["total"] / the_plan.base_params["total"], 6),
                           "by": "search" if search_report is not None else "split policy",
                           "rounds": [{"shape": r.as_dict(), "params": count_params(info, r)["total"]} for r in rounds]}
    report = {
        "base": {"path": "base", "model_type": the_plan.model_type, "shape": the_plan.base.as_dict(),
                 "head_dim": the_plan.head_dim, "params": the_plan.base_params, "val_loss": base_val},
        "plan": plan_dict,
        "search": search_report,
        "settings": {"importance": c.importance, "calibration": c.calibration,
                     "calibration_sequences": c.calibration_sequences, "head_mode": the_plan.head_mode,
                     "norm_rescale": c.norm_rescale, "reconstruct": c.reconstruct,
                     "reconstruct_damp": c.reconstruct_damp, "val_blocks": c.val_blocks, "device": str(device),
                     "dtype": str(dtype).removeprefix("torch."),
                     "precision": str(amp or "fp32").removeprefix("torch.")},
        "students": students,
    }
    from downscale._io import write_json_atomic

    write_json_atomic(out_dir / "compress.json", report)
    _log_table(ctx, shards, base_val, students)
    return {"students": len(students), "params": chosen_params["total"],
            "fraction_of_base": round(chosen_params["total"] / the_plan.base_params["total"], 6),
            "shape": chosen.as_dict(), "chosen_by": plan_dict["chosen"]["by"],
            "val_loss_pooled": [s["val_loss"]["pooled"] for s in students],
            "base_val_loss_pooled": base_val["pooled"]}


def _choose_shape(ctx: StageContext, base, info, the_plan: Plan, hf_config, shards: list[str], calib: list[dict],
                  device, amp, distill) -> tuple[dict | None, Any]:
    """(the search's report, the chosen shape); without a search (off, or every shape field fixed) the split
    policy's shape and None."""
    from downscale.data.blocks import open_split
    from downscale.pruning import search
    from downscale.pruning.plan import config_refusal

    cfg, c = ctx.cfg, ctx.cfg.compress
    fixed = {k: v for k, v in c.shape.model_dump().items() if v is not None}
    if not c.search.enabled or len(fixed) == 5 or the_plan.target is None:
        return None, the_plan.shape
    grid = search.candidate_shapes(info, the_plan.target, c.round_to, depth=c.prune_depth, fixed=fixed,
                                   refusal=lambda s: config_refusal(hf_config, s))
    policy = search.as_candidates([the_plan.shape], info, family="policy")[0]
    for cand in grid:
        if cand.shape == policy.shape:
            cand.family = f"policy ({cand.family})"
            policy = cand
    candidates = search.spread(grid, c.search.max_candidates, keep=policy)
    students = []
    for i, shard in enumerate(shards):
        data = open_split(ctx.run_dir, shard, "train")
        idx = _draw(len(data), c.search.blocks, [cfg.run.seed, 104729, i, len(data)], calib[i]["used"].get(shard))
        students.append(search.SearchStudent(calib[i]["scores"], data[idx], c.norm_rescale, calib[i]["grams"],
                                             c.reconstruct_damp))
    ctx.log(f"[compress] shape search: {len(candidates)} candidates at {the_plan.target:,} parameters, "
            f"{len(students)} students, up to {c.search.blocks} held-out blocks each")
    finalists = search.run_search(base, candidates, students, blocks=c.search.blocks,
                                  start_blocks=c.search.start_blocks, finalists=c.search.finalists,
                                  batch_size=c.calibration_batch_size, device=device, amp=amp,
                                  log=lambda m: ctx.log("[compress]" + m),
                                  distill=None if distill is None else (lambda model, j: distill(model, 0, j)))
    best = finalists[0]
    base_total = the_plan.base_params["total"]
    for line in search.describe(candidates, base_total, limit=12):
        ctx.log("[compress]   " + line)
    ctx.log(f"[compress] chosen: {best.family} {best.shape.as_dict()} (policy shape {policy.loss:.3f}, best "
            f"{best.loss:.3f} on the search blocks)")
    report = {"candidates": [cand.to_dict(base_total) for cand in search.ranked(candidates)],
              "grid_size": len(grid), "blocks": c.search.blocks, "start_blocks": c.search.start_blocks,
              "finalists": c.search.finalists, "distill_steps": c.search.distill_steps,
              "chosen": best.to_dict(base_total), "policy": policy.to_dict(base_total),
              "ranked_by": "loss after distillation" if distill is not None else "loss right after pruning",
              "loss": "mean over students of the mean NLL on each student's held-out train blocks of its own shard"}
    return report, best.shape


def _baselines(ctx, base, cal: dict, chosen, policy_shape, val_losses, c, i: int) -> dict:
    """The random-importance student of the chosen shape, and the split policy's shape when the search chose
    another: their validation losses right after one-shot pruning, beside the real student's."""
    from downscale.pruning.importance import random_scores
    from downscale.pruning.reconstruct import refit_student
    from downscale.pruning.surgery import extract_student, select_units

    out: dict = {}
    norm_ms = cal["scores"].norm_ms if c.norm_rescale else None

    def cut(scores, shape, refit: bool = True):  # what the stage does to the student, with other scores or shape
        keep = select_units(scores, base.config, shape)
        model = extract_student(base, shape, keep, norm_ms, share=True)
        if refit and cal["grams"] is not None:
            refit_student(model, base, keep, cal["grams"], c.reconstruct_damp)
        return model

    if c.search.random_baseline and c.importance != "random":
        model = cut(random_scores(base, _seed(ctx.cfg.run.seed, i) + 1), chosen)
        out["random_baseline"] = {"importance": "random", "shape": chosen.as_dict(), "one_shot": True,
                                  "reconstruct": c.reconstruct, "val_loss": val_losses(model)}
        del model
    if policy_shape != chosen:
        model = cut(cal["scores"], policy_shape)
        out["unsearched"] = {"shape": policy_shape.as_dict(), "one_shot": True, "reconstruct": c.reconstruct,
                             "val_loss": val_losses(model),
                             "note": "the split policy's shape (what compress chose before the search)"}
        del model
    if c.reconstruct:  # what the refit buys: the same student without it
        model = cut(cal["scores"], chosen, refit=False)
        out["without_reconstruct"] = {"shape": chosen.as_dict(), "one_shot": True, "val_loss": val_losses(model),
                                      "note": "the chosen student cut from the same scores, not refit"}
        del model
    return out


# --------------------------------------------------------------------------- helpers


def _load_dtype(name: str, device) -> str:
    """``base.dtype`` for compress: auto = bf16 on a GPU that has it (fp16 otherwise), fp32 on CPU."""
    import torch

    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _reload_check(model, folder: Path, val) -> float:
    """Reload the saved student with plain transformers and compare its logits with the in-memory student's on a
    validation block: they must be identical (a student that does not reload exactly is an error, not a
    warning)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    if len(val) == 0:
        return 0.0
    device = next(model.parameters()).device
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).to(device).eval()
    ids = torch.as_tensor(np.asarray(val[:1], dtype=np.int64), device=device)
    was = model.training
    model.eval()
    with torch.no_grad():
        diff = float((again(input_ids=ids).logits.float() - model(input_ids=ids).logits.float()).abs().max())
    model.train(was)
    del again
    if diff != 0.0:
        raise StageError(f"{folder}: compress: the saved student does not reload exactly (max |logit diff| "
                         f"{diff:.3g}); please report this with the config")
    return diff


def _draw(n: int, take: int, seed: list[int], exclude=None):
    """``take`` sorted indices below ``n`` drawn without replacement (seeded), avoiding ``exclude`` while enough
    others remain."""
    import numpy as np

    pool = np.arange(n)
    if exclude is not None and n - len(exclude) >= min(take, n):
        pool = np.setdiff1d(pool, np.asarray(exclude))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(take, len(pool)), replace=False))


def _calibration_blocks(run_dir: Path, shards: list[str], n: int, seed: int, open_split):
    """``n`` train blocks drawn without replacement (seeded), split evenly over ``shards``; and the indices used
    per shard."""
    import numpy as np

    per = [n // len(shards) + (1 if k < n % len(shards) else 0) for k in range(len(shards))]
    parts, used = [], {}
    for k, (s, want) in enumerate(zip(shards, per, strict=True)):
        data = open_split(run_dir, s, "train")
        idx = _draw(len(data), want, [seed, k, len(data)])
        used[s] = idx
        parts.append(np.asarray(data[idx], dtype=np.int64))
    return np.concatenate(parts, axis=0), used


def _seed(seed: int, student: int) -> int:
    return seed * 1_000_003 + 7919 * (student + 1)


def _score_key(fingerprints: dict, c, shards: list[str], n_blocks: int, seed: int, dtype, amp, device,
               student: int) -> str:
    payload = {"fingerprints": fingerprints, "method": c.importance, "shards": shards, "blocks": n_blocks,
               "seed": seed, "dtype": str(dtype), "amp": str(amp), "device": device.type,
               "batch_size": c.calibration_batch_size}
    if c.importance == "random":  # drawn per student
        payload["student"] = student
    if c.importance == "taylor":  # MLP, head and layer scores were |grad x weight| sums before: not reused
        payload["taylor"] = "removal of mlp channels, heads, layers"
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _round_key(key: str, r: int, rounds: list, c, cfg) -> str:
    """Cache key of round ``r``'s scores: the first round's key, every earlier round's shape, and what the
    recovery between rounds did (its steps and specialize's KD and training settings, as the pipeline lists the
    keys compress reads: logging keys never invalidate scores)."""
    from downscale.pipeline import content_hash

    payload = {"key": key, "round": r, "shapes": [s.as_dict() for s in rounds[:r]],
               "recover_steps": c.recover_steps, "norm_rescale": c.norm_rescale,
               "recovery": content_hash(cfg, "compress") if c.recover_steps else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _scores(model, blocks, c, device, amp, cache: Path | None, desc: str, seed: int = 0):
    """Scores from the cache or a new calibration pass; returns (scores, how)."""
    from downscale.pruning.importance import calibration_scores, load_scores, save_scores

    if cache is not None and cache.is_file():
        return load_scores(cache), "cached"
    scores = calibration_scores(model, blocks, c.importance, c.calibration_batch_size, device, amp, desc=desc,
                                seed=seed)
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
