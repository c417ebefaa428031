"""Combine stage: the ensemble of the specialized students.

Reads ``<run>/specialized/<i>/`` (or ``students/<i>/`` with ``combine.source: students``), checks
that the students share one vocabulary and one tokenizer, estimates the Bayes router's prior on
the validation blocks of every shard, and writes ``<run>/ensemble/``: ``ensemble.json`` (student
folders relative to the run, modes, weights, prior, router settings; see downscale.ensemble_io),
the tokenizer, and a copy of the data stage's clusterer when the router is ``cluster``.

The prior (``combine.prior: em``): each student's summed log-likelihood of each validation block
(up to ``combine.prior_blocks`` blocks per shard, pooled over all shards) feeds an EM for the
mixture weights of a sequence-level mixture, the very model the Bayes router assumes (a block
comes from one student's distribution, chosen with probability prior_i), with a symmetric
Dirichlet pseudo-count ``combine.prior_smoothing`` (see downscale.routing.em_prior). The same pass
gives each student's validation loss per shard, reported in the summary.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from downscale import progress
from downscale.data.blocks import data_meta, open_split
from downscale.pipeline import StageContext, StageError


def run(ctx: StageContext, **_: object) -> dict:
    """Build ``<run>/ensemble``; returns a summary (students, modes, prior, per-student val loss)."""
    from downscale import models, routing
    from downscale.ensemble import EnsembleError, EnsembleModel, check_weights
    from downscale.ensemble_io import check_students, write_ensemble

    cfg, ccfg, run_dir = ctx.cfg, ctx.cfg.combine, ctx.run_dir
    source = cfg._source
    device, amp = models.setup_runtime(cfg.run)
    shards = data_meta(run_dir)["shards"]
    n = len(shards)
    folders = [run_dir / ccfg.source / str(i) for i in range(n)]
    for f in folders:
        if not (f / "config.json").is_file():
            raise StageError(f"{f}: missing student folder (combine.source: {ccfg.source}); run "
                             f"`downscale {'specialize' if ccfg.source == 'specialized' else 'compress'}` first")
    extra = run_dir / ccfg.source / str(n)
    if extra.exists():
        ctx.log(f"[combine] note: {extra} exists but the data has {n} shards; only students 0..{n - 1} are used")
    try:
        checked = check_students(folders, reference_tokenizer=run_dir / "tokenizer")
    except EnsembleError as exc:
        raise StageError(str(exc)) from None
    if checked["without_tokenizer"]:
        ctx.log(f"[combine] note: no tokenizer files in {', '.join(checked['without_tokenizer'])}; checked by "
                f"vocabulary size only")
    weights = None
    if ccfg.weights is not None:
        try:
            weights = check_weights(ccfg.weights, n, "combine.weights")
        except EnsembleError as exc:
            raise StageError(f"{source}: {exc}") from None
    if "sparse" in ccfg.modes and ccfg.sparse_top_k > n:
        raise StageError(f"{source}: combine.sparse_top_k: {ccfg.sparse_top_k} is more than the {n} students")
    routed = "routed" in ccfg.modes or "sparse" in ccfg.modes
    cluster_dir = None
    if routed and ccfg.router == "cluster":
        cluster_dir = run_dir / "data" / "cluster"
        if not cluster_dir.is_dir():
            raise StageError(f"{source}: combine.router: 'cluster' needs the data stage's clusterer in {cluster_dir} "
                             f"(data.shard_by: cluster)")

    students = [models.load_causal_lm(f, dtype="float32", device=device).eval() for f in folders]
    for s in students:  # scoring only: the Linear weights in the autocast dtype once (autocast's results exactly)
        models.hold_in_compute_dtype(s, amp)
    ens = EnsembleModel(students, mode="prob_mean", fast=ccfg.fast_path)
    how = "stacked fast path" if ens.uses_fast_path else f"one by one: {ens.fallback_reason}"
    ctx.log(f"[combine] {n} students from {ccfg.source}/ ({how})")

    t0 = time.time()
    seq_ll, val_loss, blocks_used = _score_val(ens, run_dir, shards, ccfg.prior_blocks, ccfg.batch_size, device, amp)
    prior = [1.0 / n] * n
    estimate: dict = {"method": "uniform"}
    if ccfg.prior == "em" and seq_ll.shape[1]:
        p, info = routing.em_prior(seq_ll, smoothing=ccfg.prior_smoothing)
        prior = [float(x) for x in p]
        estimate = {"method": "em", "smoothing": ccfg.prior_smoothing, "blocks_per_shard": blocks_used, **info}
    elif ccfg.prior == "em":
        ctx.log("[combine] no validation blocks: the prior stays uniform")
        estimate = {"method": "uniform (no validation blocks)"}
    ctx.log(f"[combine] prior {', '.join(f'{x:.3f}' for x in prior)} ({estimate['method']}, "
            f"{time.time() - t0:.1f}s)")

    out = ctx.output("ensemble")
    spec = {
        "students": [f"{ccfg.source}/{i}" for i in range(n)],
        "student_fingerprints": [_fingerprint(f) for f in folders],
        "shards": shards,
        "vocab_size": checked["vocab_size"],
        "modes": list(ccfg.modes),
        "default_mode": ccfg.default_mode or ccfg.modes[0],
        "weights": weights,
        "router": {"kind": ccfg.router, "prefix": ccfg.router_prefix, "temperature": ccfg.router_temperature,
                   "top_k": ccfg.router_top_k},
        "sparse": {"top_k": ccfg.sparse_top_k, "prefix": ccfg.sparse_prefix},
        "prior": prior,
        "prior_estimate": estimate,
        "val_loss": val_loss,
        "fast_path": ccfg.fast_path,
    }
    write_ensemble(out, spec, checked["tokenizer_dir"], cluster_dir=cluster_dir)
    ctx.log(f"[combine] wrote {out.name}/ensemble.json: modes {', '.join(ccfg.modes)}")
    return {"students": spec["students"], "modes": spec["modes"], "default_mode": spec["default_mode"],
            "prior": prior, "val_loss": val_loss, "fast_path": ens.uses_fast_path}


def _fingerprint(folder) -> str:
    from downscale._io import dir_fingerprint

    return dir_fingerprint(folder)


@torch.no_grad()
def _score_val(ens, run_dir, shards: list[str], max_blocks: int, batch_size: int, device,
               amp) -> tuple[np.ndarray, dict, dict]:
    """Each student's summed log-likelihood of each validation block [n, M] (blocks of all shards
    pooled), each student's mean val NLL per shard, and the blocks used per shard."""
    from downscale.models import autocast

    columns, val_loss, used = [], {f"student {i}": {} for i in range(ens.n)}, {}
    total = sum(min(len(open_split(run_dir, s, "val")), max_blocks) for s in shards)
    bar = progress.bar(total=total, desc="combine: val blocks", unit="block", leave=False)
    for shard in shards:
        blocks = open_split(run_dir, shard, "val")[:max_blocks]
        used[shard] = len(blocks)
        sums = np.zeros(ens.n)
        count = 0
        for start in range(0, len(blocks), batch_size):
            ids = torch.as_tensor(np.asarray(blocks[start:start + batch_size], dtype=np.int64), device=device)
            with autocast(device, amp):
                lp = ens.student_logprobs(ids)  # [n, B, T-1]
            per_block = lp.double().sum(-1).cpu().numpy()  # [n, B]
            columns.append(per_block)
            sums += per_block.sum(1)
            count += lp.shape[1] * lp.shape[2]
            bar.update(ids.shape[0])
        for i in range(ens.n):
            val_loss[f"student {i}"][shard] = float(-sums[i] / count) if count else None
    bar.close()
    seq_ll = np.concatenate(columns, axis=1) if columns else np.zeros((ens.n, 0))
    return seq_ll, val_loss, used
