"""Evaluate stage: the honest comparison of the ensemble with the uncompressed base.

Rows (every one scored on the same test blocks of every shard: identical tokenization and context):
the base; each pruned student before specialization; each specialized student; each ensemble mode
of ``<run>/ensemble/``; the oracle (for each domain the best specialized student on it); and, with
``evaluate.control``, a compute-matched control: the base trained further on as many tokens as all
the students consumed together. Losses are pooled over tokens (total NLL / total tokens), never
averages of perplexities.

Also: the ensemble-size curve (mean loss over subsets of m students, m = 1..n) with the fitted
ensemble law, the downscaling guarantee for this base, and the compute ledger. Writes
``<run>/eval/results.json`` (schema in the README), ``report.md`` and PNG plots.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downscale import pipeline
from downscale._io import read_json, write_json_atomic
from downscale.data.blocks import data_meta, open_split
from downscale.pipeline import StageContext, StageError

CURVE_MODES = ("logit_mean", "prob_mean")  # always on the curve; routed and sparse too when the ensemble has them
ROUTED_CURVE_MODES = ("routed", "sparse")


def run(ctx: StageContext) -> dict:
    from downscale import models, report

    cfg, ecfg = ctx.cfg, ctx.cfg.evaluate
    device, amp = models.setup_runtime(cfg.run)
    run_dir = ctx.run_dir
    meta = data_meta(run_dir)
    shards = meta["shards"]
    test = {s: _cap(open_split(run_dir, s, "test"), ecfg.max_test_tokens_per_shard) for s in shards}
    empty = [s for s, b in test.items() if len(b) == 0]
    if empty:
        raise StageError(f"{run_dir / 'data' / empty[0]}: the test split has no complete block; "
                         f"lower data.block_size or give the shard more text")
    out = ctx.output("eval")
    out.mkdir(parents=True, exist_ok=True)
    n = ctx.cfg.num_students
    rows: list[dict] = []
    ev = _Evaluator(test, ecfg.batch_size, device, amp, int(meta["block_size"]), log=ctx.log)

    ctx.log(f"[evaluate] scoring on {sum(len(b) for b in test.values())} test blocks of {meta['block_size']} tokens "
            f"from {len(shards)} shards")
    # scoring only: the Linear weights held in the autocast dtype once (bit for bit autocast's results)
    base = models.load_causal_lm(run_dir / "base", dtype="float32", device=device)
    models.hold_in_compute_dtype(base, amp)
    rows.append(ev.score_model("base", "base", base, ["base"]))
    base_params = models.count_params(base)
    del base
    for i in range(n):
        m = models.load_causal_lm(run_dir / "students" / str(i), dtype="float32", device=device)
        models.hold_in_compute_dtype(m, amp)
        rows.append(ev.score_model(f"student {i} (pruned)", "pruned", m, [f"students/{i}"]))
    specialized = []
    for i in range(n):
        m = models.load_causal_lm(run_dir / "specialized" / str(i), dtype="float32", device=device)
        models.hold_in_compute_dtype(m, amp)
        rows.append(ev.score_model(f"student {i} ({shards[i]})", "specialized", m, [f"specialized/{i}"]))
        specialized.append(m)
    rows.append(_oracle_row([r for r in rows if r["kind"] == "specialized"], shards))

    ens_json = run_dir / "ensemble" / "ensemble.json"
    ens_meta = read_json(ens_json)
    from downscale.ensemble import load_ensemble

    # the ensemble's students are (by default) the specialized ones just scored: reused, not loaded a second time
    ens = load_ensemble(run_dir / "ensemble", device=device, dtype=torch.float32,
                        loaded={run_dir / "specialized" / str(i): m for i, m in enumerate(specialized)})
    ens_params = _ensemble_params(ens, specialized)
    for mode in ens_meta["modes"]:
        ens.mode = mode
        ens.sparse_stats.reset()
        row = ev.score_model(f"ensemble ({mode})", "ensemble", ens, list(ens_meta["students"]),
                             mode=mode, params=ens_params, active=_active_params(ens, specialized, mode))
        if mode == "sparse":
            _count_sparse(row, ens, specialized, ev.context)
            ctx.log(f"[evaluate] ensemble (sparse): {row['active_params'] / 1e6:.2f}M parameters active per token on "
                    f"average (top {ens.sparse_top_k} of {ens.n} after a {ens.sparse_prefix}-token prefix; "
                    f"sequences per student {row['sparse']['sequences_routed']})")
        rows.append(row)
    curve = ensemble_size_curve(specialized, test, ecfg, device, amp, seed=cfg.run.seed, log=ctx.log, ens=ens,
                                routed_modes=tuple(m for m in ROUTED_CURVE_MODES if m in ens_meta["modes"]))
    del ens, specialized

    if ecfg.quality_ablation:
        rows += quality_ablation(ctx, ev, shards, out)
        for r in (r for r in rows if r["kind"] == "ablation"):
            pruned = next(p for p in rows if p["name"] == r["pairs_with"])
            ctx.log(f"[evaluate] quality ablation: {pruned['name']} pooled {pruned['loss']['pooled']:.4f} on the "
                    f"pruned shard vs {r['loss']['pooled']:.4f} on the unpruned one "
                    f"({pruned['loss']['pooled'] - r['loss']['pooled']:+.4f})")

    control_info = None
    if ecfg.control:
        control, control_info = train_control(ctx, device, amp)
        rows.append(ev.score_model("control (base + matched tokens)", "control", control, ["eval/control"]))
        models.save_causal_lm(control, out / "control", tokenizer_dir=run_dir / "tokenizer",
                              extra_files={"train_summary.json": control_info})
        del control

    results = assemble_results(ctx, rows, curve, shards, base_params, control_info, test)
    write_json_atomic(out / "results.json", results)
    report.write_report(results, out)
    ctx.log("\n" + report.main_table(results))
    ctx.log(report.verdict(results))
    ctx.log(f"[evaluate] report: {run_dir / 'eval' / 'report.md'} (results.json and plots beside it)")
    return {"pooled_loss": {r["name"]: r["loss"]["pooled"] for r in rows}, "verdict": results["verdict"]}


# --------------------------------------------------------------------------- scoring


def _cap(blocks: np.ndarray, max_tokens: int | None) -> np.ndarray:
    if max_tokens is None or len(blocks) == 0:
        return blocks
    return blocks[: max(1, max_tokens // blocks.shape[1])]


class _Evaluator:
    """Scores a model (HF causal LM or EnsembleModel) on every shard's test blocks."""

    def __init__(self, test: dict[str, np.ndarray], batch_size: int, device, amp, context: int, log=None):
        self.test, self.batch_size, self.device, self.amp, self.context = test, batch_size, device, amp, context
        self.log = log or (lambda msg: None)

    @torch.no_grad()
    def score_model(self, name: str, kind: str, model, paths: list[str], mode: str | None = None,
                    params: int | None = None, active: int | None = None) -> dict:
        from downscale import cost, models

        model.eval()
        loss, tokens_by_shard, nll_sum, count = {}, {}, 0.0, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.time()
        for shard, blocks in self.test.items():
            s_sum, s_count = 0.0, 0
            for start in range(0, len(blocks), self.batch_size):
                ids = torch.as_tensor(np.asarray(blocks[start:start + self.batch_size], dtype=np.int64),
                                      device=self.device)
                s_sum += _sum_nll(model, ids, self.amp)
                s_count += ids[:, 1:].numel()
            loss[shard] = s_sum / s_count
            tokens_by_shard[shard] = s_count
            nll_sum, count = nll_sum + s_sum, count + s_count
        seconds = time.time() - t0
        loss["pooled"] = nll_sum / count
        configs = _configs(model)
        total = params if params is not None else models.count_params(model)
        row = {
            "name": name, "kind": kind, "mode": mode, "paths": paths, "loss": loss,
            "perplexity": {k: math.exp(min(v, 50)) for k, v in loss.items()},
            "params": total, "active_params": active if active is not None else total,
            "flops_per_token": sum(cost.flops_per_token(c, self.context) for c in configs)
            if active is None or active == total else
            sum(cost.flops_per_token(c, self.context) for c in configs) * active / max(total, 1),
            "tokens": count, "tokens_by_shard": tokens_by_shard, "throughput_tokens_per_s": count / max(seconds, 1e-9),
            "peak_memory_mb": (torch.cuda.max_memory_allocated(self.device) / 2**20
                               if self.device.type == "cuda" else None),
            "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        }
        self.log(f"[evaluate] {name}: pooled test loss {loss['pooled']:.4f} ({count:,} tokens, {seconds:.1f}s)")
        return row


def _sum_nll(model, ids: torch.Tensor, amp) -> float:
    """Total next-token NLL of ``ids`` [B, T], never holding the [B, T, V] scores at once (a 128k vocabulary
    stays cheap): an ensemble through ``EnsembleModel.sum_nll`` over its combination's chunks, a plain HF
    model through ``models.block_nll`` (its LM head applied chunk by chunk in fp32)."""
    from downscale import models

    if hasattr(model, "sum_nll"):  # the ensemble: its combination is consumed chunk by chunk
        with models.autocast(ids.device, amp):
            return model.sum_nll(ids)[0]
    return models.block_nll(model, ids, ids.device, amp)[0]


def _configs(model) -> list[Any]:
    students = getattr(model, "students", None)
    if students is not None:
        return [s.config for s in students]
    return [model.config]


def _ensemble_params(ens, specialized) -> int:
    from downscale.models import count_params

    return sum(count_params(s) for s in specialized)


def _active_params(ens, specialized, mode: str) -> int:
    """Parameters that run for each token. Every student runs in every mode (the Bayes router needs every
    student's likelihood, and the routed top-k drops students only after they ran); only fixed weights of
    zero take a student out."""
    from downscale.models import count_params

    sizes = [count_params(s) for s in specialized]
    if mode == "weighted" and getattr(ens, "weights", None) is not None:
        return sum(sz for sz, wi in zip(sizes, list(ens.weights), strict=False) if float(wi) > 0)
    return sum(sizes)


def _count_sparse(row: dict, ens, specialized, context: int) -> None:
    """The sparse row's active parameters and FLOPs per token: what really ran (``ens.sparse_stats``, student x
    position pairs), averaged over the positions scored, the prefix included."""
    from downscale import cost
    from downscale.models import count_params

    st = ens.sparse_stats
    row["active_params"] = int(round(st.active([count_params(s) for s in specialized])))
    row["flops_per_token"] = st.active([cost.flops_per_token(s.config, context) for s in specialized])
    row["sparse"] = {"router": ens.router, "top_k": ens.sparse_top_k, "prefix": ens.sparse_prefix,
                     "active_fraction": [round(x, 6) for x in st.active_fraction()], **st.as_dict()}


def _oracle_row(spec_rows: list[dict], shards: list[str]) -> dict:
    """For each domain, the specialized student that is best on it (chosen on the test set: an upper bound
    for any router that picks one student per domain)."""
    loss, picks, nll, count = {}, {}, 0.0, 0
    for shard in shards:
        best = min(spec_rows, key=lambda r: r["loss"][shard])
        loss[shard] = best["loss"][shard]
        picks[shard] = best["name"]
        tokens = best["tokens_by_shard"][shard]
        nll, count = nll + loss[shard] * tokens, count + tokens
    loss["pooled"] = nll / count
    params = max(r["params"] for r in spec_rows)
    return {"name": "oracle (best student per domain)", "kind": "oracle", "mode": None, "paths": [],
            "loss": loss, "perplexity": {k: math.exp(min(v, 50)) for k, v in loss.items()}, "picks": picks,
            "params": sum(r["params"] for r in spec_rows), "active_params": params,
            "flops_per_token": max(r["flops_per_token"] for r in spec_rows), "tokens": count,
            "tokens_by_shard": {s: spec_rows[0]["tokens_by_shard"][s] for s in shards},
            "throughput_tokens_per_s": None, "peak_memory_mb": None, "weights_mb": None}


# --------------------------------------------------------------------------- ensemble-size curve


@torch.no_grad()
def ensemble_size_curve(students: list, test: dict[str, np.ndarray], ecfg: Any, device, amp, seed: int,
                        log=print, ens=None, routed_modes: tuple[str, ...] = ()) -> dict:
    """Mean pooled test loss over subsets of m students, m = 1..n, for each of CURVE_MODES, and for
    ``routed_modes`` (routed, sparse) with the router, prior and settings of ``ens`` (the EnsembleModel).

    Every student runs once per batch; every subset's combined loss is computed from those logits (all subsets
    when there are at most ``evaluate.curve_max_subsets`` of a size, else that many random ones, seeded). A
    routed subset is the routed ensemble of those students: the Bayes router's prior restricted to them and
    renormalised (the cluster router's weights likewise), its top-k at most m; computed from each student's
    log-probability of each next token, so at m = n it is the ensemble's own routed / sparse row.
    """
    from downscale import models

    n = len(students)
    rng = np.random.default_rng(seed)
    subsets: list[tuple[int, ...]] = []
    for m in range(1, n + 1):
        combos = math.comb(n, m)
        if combos <= ecfg.curve_max_subsets:
            subsets += list(itertools.combinations(range(n), m))
        else:
            seen: set[tuple[int, ...]] = set()
            while len(seen) < ecfg.curve_max_subsets:
                seen.add(tuple(sorted(rng.choice(n, size=m, replace=False).tolist())))
            subsets += sorted(seen)
    routed_modes = [m for m in ROUTED_CURVE_MODES if ens is not None and m in routed_modes]
    modes = [*CURVE_MODES, *routed_modes]
    # summed on the device (float64) and read once at the end: no host sync per subset and chunk
    sums = {mode: torch.zeros(len(subsets), dtype=torch.float64, device=device) for mode in modes}
    count = 0
    for blocks in test.values():
        for start in range(0, len(blocks), ecfg.batch_size):
            ids = torch.as_tensor(np.asarray(blocks[start:start + ecfg.batch_size], dtype=np.int64), device=device)
            all_labels = ids[:, 1:].reshape(-1)
            hidden = []
            for s in students:  # final hidden states [N, H] of every student; logits are made per chunk
                with models.autocast(device, amp):
                    h = s.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
                hidden.append(h.reshape(-1, h.shape[-1]))
            heads = [s.get_output_embeddings().weight.float() for s in students]
            step = models.nll_chunk_tokens(heads[0].shape[0], n)
            target = torch.empty(n, len(all_labels), device=device) if routed_modes else None  # log p_i(next token)
            for c in range(0, len(all_labels), step):
                labels = all_labels[c:c + step]
                z = torch.stack([h[c:c + step].float() @ w.T for h, w in zip(hidden, heads, strict=True)])  # [n,C,V]
                logp = torch.log_softmax(z, dim=-1)
                if target is not None:
                    target[:, c:c + step] = logp.gather(-1, labels[None, :, None].expand(n, -1, 1)).squeeze(-1)
                for j, sub in enumerate(subsets):
                    idx = list(sub)
                    mean_logits = z[idx].mean(0)
                    nll = -(torch.log_softmax(mean_logits, -1).gather(-1, labels[:, None]))
                    sums["logit_mean"][j] += nll.sum().double()
                    mix = torch.logsumexp(logp[idx], dim=0) - math.log(len(idx))
                    sums["prob_mean"][j] -= mix.gather(-1, labels[:, None]).sum().double()
            if target is not None:
                lp = target.view(n, ids.shape[0], -1)  # [n, B, T-1]
                raw = _router_scores(ens, ids, lp, routed_modes)
                for j, sub in enumerate(subsets):
                    for mode in routed_modes:
                        sums[mode][j] -= _routed_target(ens, mode, lp, raw[mode], list(sub)).sum().double()
            count += all_labels.numel()
    sums = {mode: v.cpu().numpy() for mode, v in sums.items()}
    curve = {}
    for mode in modes:
        points = []
        for m in range(1, n + 1):
            js = [j for j, sub in enumerate(subsets) if len(sub) == m]
            losses = sums[mode][js] / count
            points.append({"m": m, "loss": float(losses.mean()), "min": float(losses.min()),
                           "max": float(losses.max()), "subsets": len(js)})
        curve[mode] = points
    log(f"[evaluate] ensemble-size curve over {len(subsets)} subsets: " + "; ".join(
        f"{mode}: " + ", ".join(f"m={p['m']} {p['loss']:.3f}" for p in pts) for mode, pts in curve.items()))
    return curve


def _router_scores(ens, ids: torch.Tensor, lp: torch.Tensor, modes: list[str]) -> dict[str, torch.Tensor]:
    """Per routed mode, the router's unnormalised log weights of every student at every predicting position
    [n, B, T-1], before any top-k: Bayes, log prior + evidence of the tokens seen (up to the router's prefix);
    cluster, minus the scaled distances of the text seen (normalised over all n students, which a subset's
    renormalisation undoes)."""
    from downscale.routing import causal_evidence
    from downscale.sparse import cluster_router

    n, B, T1 = lp.shape
    out = {}
    for mode in modes:
        prefix = ens.sparse_prefix if mode == "sparse" else ens.router_prefix
        if ens.router == "cluster":
            cr = cluster_router(ens, prefix)
            mask = torch.ones(B, T1, dtype=torch.long, device=ids.device)
            pos = torch.arange(T1, device=ids.device)[None].expand(B, T1)
            out[mode] = cr.log_weights(ids[:, :T1], mask, pos, start=0).double()
            continue
        evidence = causal_evidence(lp, T1, None if prefix is None else prefix - 1)
        log_prior = torch.tensor(ens.prior or [1.0 / n] * n, dtype=torch.float64).log().to(lp.device)
        out[mode] = log_prior[:, None, None] + evidence / ens.router_temperature
    return out


def _routed_target(ens, mode: str, lp: torch.Tensor, raw: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """log p(next token) [B, T-1] of the routed (or sparse) ensemble of the students ``idx``."""
    from downscale.routing import normalise_log_weights

    sub = raw[idx]
    if mode == "routed":
        k = None if ens.top_k is None else min(ens.top_k, len(idx))
        log_w = normalise_log_weights(sub, k)
    else:  # the prefix: the full posterior; from column P-1 on: the top-k at P-1, frozen
        c = ens.sparse_prefix - 1
        log_w = normalise_log_weights(sub, None)
        if c < sub.shape[-1]:
            frozen = normalise_log_weights(sub[:, :, c], min(ens.sparse_top_k, len(idx)))
            log_w[:, :, c:] = frozen[:, :, None]
    return torch.logsumexp(log_w.float() + lp[idx], dim=0)


# --------------------------------------------------------------------------- compute-matched control


def train_control(ctx: StageContext, device, amp):
    """The base trained further, on the union of the shards, for as many tokens as all students consumed
    together (resumable; its checkpoints live in ``<run>/work/evaluate/control``)."""
    from downscale import models, train

    cfg = ctx.cfg
    run_dir = ctx.run_dir
    tcfg = cfg.specialize.train.model_copy(deep=True)
    student_tokens = sum(int(read_json(run_dir / "specialized" / str(i) / "train_summary.json")["tokens"])
                         for i in range(cfg.num_students))
    block = int(data_meta(run_dir)["block_size"])
    if device.type == "cpu":
        models.tune_cpu_allocator()
    model = models.load_causal_lm(run_dir / "base", dtype="float32", device=device)
    model.config.use_cache = False
    accelerator = train.make_accelerator(device, amp)
    global_batch = tcfg.batch_size * tcfg.grad_accum * accelerator.num_processes
    tcfg.max_steps = max(1, math.ceil(student_tokens / (global_batch * block)))
    tcfg.warmup_steps = min(tcfg.warmup_steps, tcfg.max_steps // 2)
    if cfg.evaluate.control_lr is not None:
        tcfg.lr = cfg.evaluate.control_lr
    shards = data_meta(run_dir)["shards"]
    sampler = train.BlockSampler([open_split(run_dir, s, "train") for s in shards], global_batch,
                                 seed=cfg.run.seed + 77)
    tokens = tcfg.max_steps * global_batch * block
    ctx.log(f"[evaluate] control: the base trained for {tcfg.max_steps} more steps ({tokens} tokens; "
            f"the students consumed {student_tokens})")
    # the fused CE: no [B, T, V] logits (the control of an 8B base at a 128k vocabulary is where they hurt)
    wrapper = train.FusedCausalLM(model)
    # the checkpoints' key: the run's seed and precision, the base and data it trains on, the fused objective; fit
    # adds the loop settings that shape the trajectory (specialize.train's, its lr the control_lr, its step count
    # its own) and the data order (train.resume_key). The rest of the evaluate section does not touch it.
    ckpt_hash = pipeline.resume_hash(cfg, "evaluate", drop=("evaluate", "specialize.train"),
                                     objective="control-fused-ce",
                                     inputs=pipeline.recorded_content(run_dir, ("data", "base")))
    result = train.fit(wrapper, cfg=tcfg, sampler=sampler, loss_fn=train.fused_causal_lm_loss,
                       work_dir=ctx.work_dir("control"), accelerator=accelerator, validate=None, desc="control",
                       log=ctx.log, config_hash=ckpt_hash, inputs=f"the data in {run_dir / 'data'}")
    model = accelerator.unwrap_model(wrapper).model
    if result.full_state is not None:  # trained sharded (FSDP): a plain copy with the gathered weights
        model = models.plain_copy(model, result.full_state, device, prefix="model.")
    model.eval()
    model.config.use_cache = True
    info = {"tokens": result.tokens, "student_tokens": student_tokens, "steps": result.steps, "lr": tcfg.lr,
            "seconds": round(result.seconds, 2), "tokens_per_s": round(result.tokens_per_s, 1),
            "params": models.count_params(model)}
    return model, info


def quality_ablation(ctx: StageContext, ev: _Evaluator, shards: list[str], out) -> list[dict]:
    """The data-pruning ablation (``evaluate.quality_ablation``): every pruned student specialized again exactly as
    the specialize stage did, but on its unpruned shard (the same steps, tokens, seed and settings; checkpoints
    under ``<run>/work/evaluate/``), saved in ``eval/unpruned/<i>`` and scored. Each row names the row it pairs
    with (``pairs_with``) and the difference of their pooled losses is logged."""
    from dataclasses import replace

    from downscale import models
    from downscale.stages.specialize import specialize_student

    cfg = ctx.cfg
    plain = cfg.model_copy(update={"quality": cfg.quality.model_copy(update={"enabled": False})})
    sub = replace(ctx, cfg=plain)
    rows = []
    for i, shard in enumerate(shards[:cfg.num_students]):
        folder = out / "unpruned" / str(i)
        ctx.log(f"[evaluate] quality ablation: student {i} ({shard}) specialized again on its unpruned shard")
        specialize_student(sub, i, shards, folder)
        m = models.load_causal_lm(folder, dtype="float32", device=ev.device)
        models.hold_in_compute_dtype(m, ev.amp)
        row = ev.score_model(f"student {i} ({shard}, unpruned data)", "ablation", m, [f"eval/unpruned/{i}"])
        row["pairs_with"] = f"student {i} ({shard})"
        rows.append(row)
        del m
    return rows


# --------------------------------------------------------------------------- results


def assemble_results(ctx: StageContext, rows: list[dict], curve: dict, shards: list[str], base_params: int,
                     control_info: dict | None, test: dict[str, np.ndarray]) -> dict:
    from downscale import law

    cfg = ctx.cfg
    base = next(r for r in rows if r["kind"] == "base")
    # the downscaling-law comparison (results' ensemble_size_curve, what `downscale law` reads): the routed
    # ensemble's curve when there is one (its law is the one that matters for routing by domain), else logit_mean
    default_mode = next((m for m in ("routed", "logit_mean") if m in curve), next(iter(curve)))
    results: dict[str, Any] = {
        "schema": 1, "run": cfg.run.name, "shards": shards,
        "test_tokens": {s: int(b.size - len(b)) for s, b in test.items()},
        "context": int(next(iter(test.values())).shape[1]),
        "rows": rows,
        "base": {"loss": base["loss"]["pooled"], "params": base_params},
        "ensemble_size_curves": curve, "curve_mode": default_mode,
        "ensemble_size_curve": curve[default_mode],
        "control": control_info,
    }
    winners = {}
    for shard in [*shards, "pooled"]:
        cands = [r for r in rows if r["kind"] not in ("oracle", "ablation")]
        best = min(cands, key=lambda r: r["loss"][shard])
        winners[shard] = {"name": best["name"], "loss": best["loss"][shard]}
    results["winners"] = winners
    fits = {}
    for mode, pts in curve.items():
        try:
            fits[mode] = law.fit_results({"ensemble_size_curve": pts, "base": {"loss": base["loss"]["pooled"]}})
        except (ValueError, RuntimeError) as exc:  # too few points, or a curve the law cannot describe
            fits[mode] = {"error": str(exc)}
    results["law_fit"] = fits
    results["downscaling_guarantee"] = law.downscaling_guarantee(n0=base_params / 1e9, l0=base["loss"]["pooled"])
    results["ledger"] = compute_ledger(ctx, rows, control_info)
    from downscale.report import compression_summary

    results["compression"] = compression_summary(_maybe_json(ctx.run_dir / "students" / "compress.json"))
    quality = {}  # data pruning by quality (quality.enabled): what each student's shard kept and dropped
    for i in range(ctx.cfg.num_students):
        q = (_maybe_json(ctx.run_dir / "specialized" / str(i) / "train_summary.json") or {}).get("quality")
        if q:
            quality[str(i)] = {"shard": shards[i], **q}
    if quality:
        results["data_quality"] = quality
    results["verdict"] = _verdict(rows)
    return results


def inference_cost_statement(loss: float, base_loss: float, ratio: float) -> str:
    """How a model compares with the base at its inference cost (FLOPs per token as a multiple of the base's)."""
    if loss < base_loss:
        return (f"beats the base at {ratio:.2f}x its inference cost" if ratio <= 1 else
                f"beats the base, but at {ratio:.2f}x its inference cost")
    return (f"loses to the base at {ratio:.2f}x its inference cost" if ratio <= 1 else
            f"loses to the base even at {ratio:.2f}x its inference cost")


def _verdict(rows: list[dict]) -> dict:
    base = next(r for r in rows if r["kind"] == "base")
    ensembles = [r for r in rows if r["kind"] == "ensemble"]
    control = next((r for r in rows if r["kind"] == "control"), None)
    best = min(ensembles, key=lambda r: r["loss"]["pooled"]) if ensembles else None
    out = {"base_loss": base["loss"]["pooled"], "best_ensemble": best["name"] if best else None,
           "best_ensemble_loss": best["loss"]["pooled"] if best else None}
    base_flops = base["flops_per_token"]
    # each ensemble against the base at its inference FLOPs per token (what it costs to run, not its size)
    out["at_inference_cost"] = [
        {"name": r["name"], "loss": r["loss"]["pooled"], "flops_ratio": r["flops_per_token"] / base_flops,
         "active_params_ratio": r["active_params"] / base["params"],
         "beats_base": r["loss"]["pooled"] < base["loss"]["pooled"],
         "statement": inference_cost_statement(r["loss"]["pooled"], base["loss"]["pooled"],
                                               r["flops_per_token"] / base_flops)}
        for r in ensembles]
    cheap = [e for e in out["at_inference_cost"] if e["flops_ratio"] <= 1]
    out["best_at_most_base_cost"] = min(cheap, key=lambda e: e["loss"]) if cheap else None
    if best:
        out["ensemble_beats_base"] = best["loss"]["pooled"] < base["loss"]["pooled"]
        out["margin_vs_base"] = base["loss"]["pooled"] - best["loss"]["pooled"]
        out["ensemble_params_fraction_of_base"] = best["params"] / base["params"]
        out["best_ensemble_flops_ratio"] = best["flops_per_token"] / base_flops
    if control and best:
        out["control_loss"] = control["loss"]["pooled"]
        out["ensemble_beats_control"] = best["loss"]["pooled"] < control["loss"]["pooled"]
    return out


def compute_ledger(ctx: StageContext, rows: list[dict], control_info: dict | None) -> dict:
    """What each stage cost: FLOPs (6 N D training, 2 N D teacher / forward passes), wall time, tokens, energy."""
    from downscale import cost

    cfg, run_dir = ctx.cfg, ctx.run_dir
    manifest = pipeline.load_manifest(run_dir)
    secs = {k: float(v.get("seconds") or 0) for k, v in manifest["stages"].items()}
    base_row = next(r for r in rows if r["kind"] == "base")
    n_base = base_row["params"]
    entries = []
    base_summary = _maybe_json(run_dir / "base" / "train_summary.json")
    if base_summary.get("tokens"):
        entries.append(cost.stage_entry("base (pretraining)", seconds=secs.get("base", 0), train_n=n_base,
                                        train_tokens=base_summary["tokens"]))
    else:
        entries.append(cost.stage_entry("base (imported, pretrained elsewhere)", seconds=secs.get("base", 0)))
    comp = _maybe_json(run_dir / "students" / "compress.json")
    block = int(data_meta(run_dir)["block_size"])
    calib_tokens = sum(int(s.get("calibration_blocks", 0)) * block * max(1, len(s.get("rounds", [])))
                       for s in comp.get("students", []))
    entries.append(cost.stage_entry("compress", seconds=secs.get("compress", 0), forward_n=n_base,
                                    forward_tokens=calib_tokens))
    for i in range(cfg.num_students):
        ts = _maybe_json(run_dir / "specialized" / str(i) / "train_summary.json")
        if not ts:
            continue
        teacher_tokens = ts.get("teacher_tokens", ts.get("tokens", 0))
        entries.append(cost.stage_entry(f"specialize student {i}", seconds=ts.get("seconds", 0),
                                        train_n=ts.get("params", 0), train_tokens=ts.get("tokens", 0),
                                        teacher_n=n_base, teacher_tokens=teacher_tokens))
    if control_info:
        entries.append(cost.stage_entry("control (not part of the pipeline's cost)", seconds=control_info["seconds"],
                                        train_n=n_base, train_tokens=control_info["tokens"]))
    led = cost.ledger(entries, device_watts=cfg.evaluate.device_watts,
                      grid_gco2_per_kwh=cfg.evaluate.grid_gco2_per_kwh)
    pipeline_rows = [r for r in led["stages"] if not r["stage"].startswith("control")]
    led["pipeline_total"] = {k: sum(r[k] for r in pipeline_rows) for k in ("flops", "tokens", "seconds", "kwh",
                                                                          "co2_kg")}
    led["from_scratch"] = {fit: cost.from_scratch_cost(n_base, None, fit) for fit in ("hoffmann", "besiroglu")}
    led["device"] = str(ctx.cfg.run.device)
    return led


def _maybe_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}
