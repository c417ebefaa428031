"""Specialize stage: make student i the expert of shard i, by distillation from the base plus CE.

    loss = kd_ratio * KD(teacher || student) + (1 - kd_ratio) * CE(next token)

computed by ``downscale.kd.distill_loss`` over chunks of tokens (the full [B, T, V] fp32 logits of
the two models never exist at once). The teacher is the base, online (bf16, or 8-/4-bit through
bitsandbytes) or offline from a per-shard cache of its top-k log-probs (``downscale.teacher_cache``).
Training is the shared loop of ``downscale.train`` (accelerate: DDP / FSDP, accumulation,
cosine schedule, clipping, validation, exact resume, NaN guard).

Students are independent jobs: ``downscale specialize CONFIG --student i`` trains one (in parallel
on other GPUs or nodes); without ``--student`` all are trained in turn. Each student is recorded
in the manifest on its own (a "part" of this incremental stage) and written atomically to
``<run>/specialized/<i>/`` with ``train_summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downscale import pipeline
from downscale._io import read_json, replace_dir
from downscale.data.blocks import open_split, shard_names
from downscale.pipeline import StageContext, StageError

STAGE = "specialize"


def run(ctx: StageContext, part: int | str | None = None, force: bool = False) -> dict:
    """Train every student, or student ``part`` alone; one that is complete with the same keys and inputs is
    skipped unless ``force`` (``--force``): then it is trained again from step 0."""
    cfg = ctx.cfg
    run_dir = ctx.run_dir
    shards = shard_names(run_dir)
    n = cfg.num_students
    if part is not None and not (str(part).isdigit() and int(part) < n):
        raise StageError(f"{cfg._source}: --student: expected a student index 0..{n - 1}, got {part!r}")
    which = range(n) if part is None else [int(part)]
    manifest = pipeline.load_manifest(run_dir)
    inputs = pipeline._inputs(run_dir, pipeline.get_stage(STAGE), manifest)
    # a student is complete when it was trained with the keys the stage reads (pipeline.stage_keys): a change in a
    # logging, checkpoint-cadence or speed key (specialize.train.log_every, kd_chunk_tokens, ...) does not retrain
    # it. (Parts recorded under the former whole-section hash are not recognised: they are trained once more.)
    part_hash = pipeline.config_hash(cfg, STAGE)
    summaries: dict[str, dict] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for i in which:
        out = run_dir / "specialized" / str(i)
        if force:  # every rank removes them before its own training starts: none can resume from one meanwhile
            pipeline.discard_checkpoints(run_dir / "work" / STAGE / f"student-{i}")
            ctx.log(f"[specialize] student {i}: --force, training from step 0")
        elif pipeline.part_is_complete(run_dir, STAGE, str(i), part_hash, inputs, out):
            ctx.log(f"[specialize] student {i} complete, skipped")
            summaries[str(i)] = read_json(out / "train_summary.json")
            continue
        main = pipeline.is_main_process()  # the manifest and the outputs belong to rank 0
        if main:
            pipeline.record_part(run_dir, STAGE, str(i), {"status": "running", "started": started,
                                                          "config_hash": part_hash, "inputs": inputs})
        try:
            staged = ctx.staging / str(i)
            summary = specialize_student(ctx, i, shards, staged)
            if main:
                replace_dir(staged, out)
        except BaseException as exc:
            if main:
                pipeline.record_part(run_dir, STAGE, str(i), {"status": "failed", "config_hash": part_hash,
                                                              "error": f"{type(exc).__name__}: {exc}"[:500]})
            raise
        if not main:
            summaries[str(i)] = summary
            continue
        from downscale._io import dir_fingerprint

        pipeline.record_part(run_dir, STAGE, str(i), {
            "status": "complete", "started": started, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config_hash": part_hash, "inputs": inputs, "output": dir_fingerprint(out), "seed": cfg.run.seed,
            "summary": _short(summary)})
        summaries[str(i)] = summary
    done = all(pipeline.part_is_complete(run_dir, STAGE, str(i), part_hash, inputs, run_dir / "specialized" / str(i))
               for i in range(n))
    return {"students": {k: _short(v) for k, v in summaries.items()}, "all_parts_complete": done,
            "started": started}


def _loss_inputs(ctx: StageContext, i: int, shards: list[str], student_dir: Path) -> str:
    """What student ``i``'s loss reads, for the message of a loss that is not finite at the first step."""
    scfg = ctx.cfg.specialize
    teacher = ("its teacher cache in " + str(Path(scfg.cache_dir) if scfg.cache_dir else ctx.run_dir / "work" /
                                              "teacher_cache") if scfg.teacher == "cache" else
               f"the teacher {ctx.run_dir / 'base'}")
    return (f"the student {student_dir}, {teacher}, the data {ctx.run_dir / 'data' / shards[i]} "
            f"(`downscale status` names files changed on disk)")


def _short(summary: dict) -> dict:
    keys = ("shard", "tokens", "steps", "seconds", "tokens_per_s", "before", "after")
    return {k: summary[k] for k in keys if k in summary}


# --------------------------------------------------------------------------- one student


def specialize_student(ctx: StageContext, i: int, shards: list[str], out: Path) -> dict:
    """Distil student i on shard i; write the HF folder to ``out``; return its train summary."""
    from downscale import kd, models, train

    cfg, scfg = ctx.cfg, ctx.cfg.specialize
    tcfg = scfg.train
    device, amp = models.setup_runtime(cfg.run, tune_allocator=True)
    run_dir = ctx.run_dir
    shard = shards[i]
    student_dir, base_dir = run_dir / "students" / str(i), run_dir / "base"
    if not (student_dir / "config.json").exists():
        raise StageError(f"{student_dir}: missing student {i}; run `downscale compress` first")
    teacher = load_teacher(base_dir, scfg, device, amp)  # also gives the validation KL
    student = models.load_causal_lm(student_dir, dtype="float32", device=device)
    try:
        kd.check_same_vocab(student, teacher, student_dir if _has_tokenizer(student_dir) else None,
                            base_dir if _has_tokenizer(base_dir) else None)
    except ValueError as exc:
        raise StageError(f"{student_dir}: specialize: {exc}") from None
    student.config.use_cache = False
    t_start = time.time()

    if len(open_split(run_dir, shard, "train")) == 0:
        raise StageError(f"{run_dir / 'data' / shard}: specialize: shard {shard!r} of student {i} has no train "
                         f"blocks (an empty shard); give it more text or drop it from data.sources")
    val_blocks = {s: open_split(run_dir, s, "val") for s in shards}
    eval_kw = dict(batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches, device=device, amp=amp,
                   chunk_tokens=kd.auto_chunk_tokens(student.config.vocab_size, scfg.kd_chunk_tokens, device))
    before = evaluate_student(student, teacher, val_blocks, **eval_kw)
    ctx.log(f"[specialize] student {i} ({shard}) before: CE {before[shard]['ce']:.4f}, "
            f"KL to teacher {before[shard]['kl']:.4f} on its own shard")

    if scfg.lora:
        # the adapters' random init from the run's seed and the student's index, not from whatever ran before in
        # this process: reproducible, and the same on every rank (FSDP keeps each rank's own init of its shard)
        torch.manual_seed(cfg.run.seed + 1000 * (i + 1))
        student = _apply_lora(student, scfg)
    # the starting weights, on the host (a 1B student's fp32 copy would take 4 GB of the GPU), to count what trained
    trainable = {n: p.detach().to("cpu", copy=True) for n, p in student.named_parameters() if p.requires_grad}
    accelerator = train.make_accelerator(device, amp, tcfg.report_to, project_dir=ctx.work_dir(f"student-{i}"),
                                         run_name=f"{cfg.run.name}-student-{i}",
                                         tracker_config=cfg.model_dump(mode="json")["specialize"])
    own, quality_info = open_split(run_dir, shard, "train"), None
    if cfg.quality.enabled:  # data pruning: the documents of the shard inside the band of the base's NLL
        own, quality_info = prune_by_quality(ctx, shard, teacher, device, amp)
    sources, fractions = [own], None
    others = [s for s in shards if s != shard]
    if scfg.replay_fraction > 0 and others:
        sources += [open_split(run_dir, s, "train") for s in others]
        fractions = [1 - scfg.replay_fraction] + [scfg.replay_fraction / len(others)] * len(others)
    source_shards = [shard] + (others if fractions else [])
    sampler = train.BlockSampler(sources, tcfg.batch_size * tcfg.grad_accum * accelerator.num_processes,
                                 seed=cfg.run.seed + 1000 * (i + 1), fractions=fractions)
    caches = None
    if scfg.teacher == "cache":
        caches = [ensure_teacher_cache(ctx, s, teacher, device, amp) for s in source_shards]
    teacher_decoder = None
    if scfg.compile:
        try:
            models.check_compile(device, f"{cfg._source}: specialize.compile")
        except ValueError as exc:
            raise StageError(str(exc)) from None
        if scfg.teacher == "online" and scfg.teacher_quant == "none" and scfg.kd_ratio > 0:
            teacher_decoder = models.compiled_decoder(teacher)
    wrapper = DistillStudent(student, scfg, amp)

    def loss_fn(model, batch):
        ids = batch["input_ids"]
        if caches is not None:
            order = torch.argsort(batch["source"], stable=True)
            ids = ids[order]
            src, blk = batch["source"][order].cpu().numpy(), batch["block"][order].cpu().numpy()
            parts = [caches[s].sparse_teacher(blk[src == s]) for s in np.unique(src)]
            target = kd.SparseTeacher.concat(parts).to(ids.device) if len(parts) > 1 else parts[0].to(ids.device)
        elif scfg.kd_ratio > 0:
            target = teacher_targets(teacher, ids, amp, teacher_decoder)
        else:
            target = None
        return model(ids, target)

    def validate(m) -> dict[str, float]:
        # sharded (FSDP): every rank scores its copy of the same blocks through the wrapper (the sharded root)
        score = (lambda ids: m(ids, None, score_with=teacher)) if train.is_sharded(m) else None
        res = evaluate_student(m.student, teacher, {shard: val_blocks[shard]}, score=score, **eval_kw)[shard]
        return {f"ce/{shard}": res["ce"], f"kl/{shard}": res["kl"]}

    work = ctx.work_dir(f"student-{i}")
    # the checkpoints' key: the stage's keys but its loop's (fit adds those that shape the trajectory, and the data
    # order: train.resume_key), the student and what it starts from (the student, the base, the data). A logging
    # or checkpoint-cadence change resumes; an lr, batch or KD change starts afresh.
    ckpt_hash = pipeline.resume_hash(cfg, STAGE, drop=("specialize.train",), student=i,
                                     inputs=pipeline.recorded_content(run_dir, pipeline.get_stage(STAGE).upstream))
    result = train.fit(wrapper, cfg=tcfg, sampler=sampler, loss_fn=loss_fn, work_dir=work, accelerator=accelerator,
                       validate=validate, desc=f"student {i} ({shard})", log=ctx.log, config_hash=ckpt_hash,
                       inputs=_loss_inputs(ctx, i, shards, student_dir))
    wrapper = accelerator.unwrap_model(wrapper)
    student = wrapper.student
    if result.full_state is not None:  # trained sharded (FSDP): a plain copy with the gathered weights
        student = models.load_causal_lm(student_dir, dtype="float32", device=device)
        student = _apply_lora(student, scfg) if scfg.lora else student
        student.load_state_dict({k.removeprefix("student."): v for k, v in result.full_state.items()}, strict=True)
    rank_digests = _rank_digests(student, accelerator)
    changed = sum(not torch.equal(trainable[n], p.detach().cpu()) for n, p in student.named_parameters()
                  if n in trainable)
    if scfg.lora:
        student = student.merge_and_unload()
    student.eval()
    after = evaluate_student(student, teacher, val_blocks, **eval_kw)
    ctx.log(f"[specialize] student {i} ({shard}) after: CE {after[shard]['ce']:.4f}, "
            f"KL to teacher {after[shard]['kl']:.4f} on its own shard")
    summary = {
        "student": i, "shard": shard, "tokens": result.tokens, "steps": result.steps,
        "seconds": round(time.time() - t_start, 2), "train_seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1), "teacher_tokens": result.tokens if scfg.kd_ratio > 0 else 0,
        "peak_memory_mb": round(result.peak_memory_mb or 0, 1), "peak_memory_kind": result.peak_memory_kind,
        "trainable_tensors": len(trainable), "trainable_tensors_changed": int(changed),
        "trainable_params": int(sum(t.numel() for t in trainable.values())),
        "params": models.count_params(student), "resumed_from": result.resumed_from,
        "kd": {"ratio": scfg.kd_ratio, "loss": scfg.kd_loss, "temperature": scfg.temperature,
               "teacher": scfg.teacher, "teacher_quant": scfg.teacher_quant},
        "lora": scfg.lora, "compiled": scfg.compile, "replay_fraction": scfg.replay_fraction,
        "world_size": accelerator.num_processes,
        "rank_weight_digests": rank_digests,
        "before": before, "after": after,
    }
    if quality_info is not None:
        summary["quality"] = quality_info
    if pipeline.is_main_process():
        student.config.use_cache = True
        models.save_causal_lm(student, out, tokenizer_dir=run_dir / "tokenizer",
                              extra_files={"train_summary.json": summary})
        import shutil

        shutil.copy2(work / "metrics.jsonl", out / "metrics.jsonl")
    return summary


def prune_by_quality(ctx: StageContext, shard: str, base, device, amp) -> tuple[np.ndarray, dict]:
    """The shard's training blocks re-packed from its documents inside ``quality.band`` of the base's mean NLL per
    token (``downscale.data.quality``), and what was kept and dropped. The scores are cached (resumable) under
    ``<run>/work/quality/<shard>/``, keyed by the base, the data and the scoring settings."""
    import hashlib

    from downscale.data import quality
    from downscale.data.blocks import data_meta

    qcfg, run_dir = ctx.cfg.quality, ctx.run_dir
    meta = data_meta(run_dir)
    sep = int((meta.get("doc_separator") or {}).get("id", meta["eos_token_id"]))  # older runs: EOS between docs
    block = int(meta["block_size"])
    blocks = open_split(run_dir, shard, "train")
    docs = quality.split_documents(blocks, sep)
    inputs = pipeline.recorded_content(run_dir, ("data", "base"))
    key = hashlib.sha256(json.dumps({"inputs": inputs, "shard": shard, "score_tokens": qcfg.score_tokens,
                                     "precision": ctx.cfg.run.precision}, sort_keys=True, default=str).encode()
                         ).hexdigest()[:16]
    t0 = time.time()
    scores = quality.score_documents(base, docs, qcfg.score_tokens, qcfg.batch_size, device, amp,
                                     cache=ctx.work_dir("quality") / shard, key=key)
    keep, lo, hi = quality.select_band(scores, tuple(qcfg.band))
    kept = quality.repack([d for d, k in zip(docs, keep.tolist(), strict=True) if k], sep, block, blocks.dtype)
    if len(kept) == 0:
        raise StageError(f"{ctx.cfg._source}: quality.band: [{qcfg.band[0]}, {qcfg.band[1]}] keeps "
                         f"{int(keep.sum())} of the {len(docs)} documents of shard {shard!r}, not one full block "
                         f"of {block} tokens; widen the band")
    info = quality.summary(docs, scores, keep, lo, hi, tuple(qcfg.band), len(blocks), len(kept))
    info["seconds"] = round(time.time() - t0, 2)
    d, t = info["documents"], info["tokens"]
    ctx.log(f"[specialize] quality {shard}: kept {d['kept']} of {len(docs)} documents ({t['kept']:,} of "
            f"{t['before']:,} tokens; band {qcfg.band[0]:g}-{qcfg.band[1]:g} percentiles of the base's NLL = "
            f"{lo:.3f}-{hi:.3f} nats/token; dropped {d['dropped_low']} below, {d['dropped_high']} above); "
            f"{len(kept)} of {len(blocks)} blocks, in {info['seconds']:.1f}s")
    return kept, info


def _rank_digests(model, accelerator) -> list[str]:
    """A digest of the trained weights from every rank (one entry per process): equal digests show that
    the data-parallel ranks really stayed in sync."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    if accelerator.num_processes == 1:
        return [h.hexdigest()[:16]]
    from accelerate.utils import gather_object

    return list(gather_object([h.hexdigest()[:16]]))


class DistillStudent(torch.nn.Module):
    """Student + the distillation objective in one forward, so DDP / FSDP see a single module call."""

    def __init__(self, student: torch.nn.Module, scfg: Any, amp: Any = None):
        super().__init__()
        self.student = student
        self.scfg = scfg
        self.amp = amp  # the autocast dtype of validation scoring (training runs under fit's autocast)
        # accelerate's FSDP auto-wrap (TRANSFORMER_BASED_WRAP) reads the top module's _no_split_modules:
        # without them it would shard the whole student as one unit (no per-layer sharding)
        self._no_split_modules = list(getattr(student, "_no_split_modules", None) or [])
        # specialize.compile: a compiled handle on the student's decoder, kept out of the module tree (no
        # state_dict or parameter change; the student itself, used for validation and saving, stays eager)
        object.__setattr__(self, "_decoder", None)
        if getattr(scfg, "compile", False):
            from downscale import models

            object.__setattr__(self, "_decoder", models.compiled_decoder(student))

    def forward(self, input_ids: torch.Tensor, teacher: Any, score_with: Any = None):
        """(loss, stats) of one micro-batch against ``teacher`` targets; with ``score_with`` (the teacher model,
        under no_grad) the validation sums of ``score_batch`` instead: through this forward, FSDP gathers the
        wrapper's own shards (embeddings, head) as it does for training."""
        from downscale import kd

        if score_with is not None:
            return score_batch(self.student, score_with, input_ids, self.amp,
                               kd.auto_chunk_tokens(self.student.config.vocab_size, self.scfg.kd_chunk_tokens,
                                                    input_ids.device))
        s = self.scfg
        decoder = self._decoder if self._decoder is not None else self.student.get_decoder()
        hidden = decoder(input_ids=input_ids).last_hidden_state  # [B, T, H]
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [B*(T-1), H]: position t predicts token t+1
        labels = input_ids[:, 1:].reshape(-1)
        head = self.student.get_output_embeddings().weight  # [V, H]
        return kd.distill_loss(h, head, labels, teacher, kd_ratio=s.kd_ratio, kind=s.kd_loss,
                               temperature=s.temperature, beta=s.jsd_beta, alpha=s.skew_alpha,
                               chunk_tokens=s.kd_chunk_tokens)


# --------------------------------------------------------------------------- teacher-cache pass


def build_caches(cfg: Any, student: int | None = None, log=None) -> list[str]:
    """``downscale specialize CONFIG --cache-only [--student i]``: build (or check) the teacher caches that
    student i needs (its shard, plus the other shards with replay), or those of every shard, then exit. Run it
    as one job per shard / student in parallel (each loads the base once); training later finds them built."""
    import sys

    from downscale import models
    from downscale.data.blocks import shard_names

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    scfg = cfg.specialize
    if scfg.teacher != "cache":
        raise StageError(f"{cfg._source}: specialize.teacher: --cache-only needs 'cache', the config has "
                         f"{scfg.teacher!r}")
    run_dir = cfg.run_dir
    shards = shard_names(run_dir)
    if student is not None and not 0 <= student < len(shards):
        raise StageError(f"{cfg._source}: --student: expected a student index 0..{len(shards) - 1}, got {student}")
    if student is None:
        wanted = list(shards)
    else:
        wanted = [shards[student]] + ([s for s in shards if s != shards[student]] if scfg.replay_fraction > 0 else [])
    from downscale import locks

    with locks.hold(run_dir, exclusive=[], shared=["data", "base"], what="downscale specialize --cache-only"):
        stage = pipeline.get_stage(STAGE)
        manifest = pipeline.load_manifest(run_dir)
        pipeline.check_inputs(cfg, stage, manifest, only=("data", "base"))  # what the caches are made from
        device, amp = models.setup_runtime(cfg.run)
        teacher = load_teacher(run_dir / "base", scfg, device, amp)
        ctx = StageContext(cfg=cfg, run_dir=run_dir, staging=run_dir / ".staging" / "cache", stage=STAGE, log=log)
        for shard in wanted:
            cache = ensure_teacher_cache(ctx, shard, teacher, device, amp)
            log(f"[specialize] teacher cache of shard {shard}: {cache.n_blocks} blocks x {cache.block_size} "
                f"positions, top-{cache.top_k}, in {cache.path}")
    return wanted


# --------------------------------------------------------------------------- compress recovery


def distillation_recovery(ctx: StageContext, teacher, shards: list[str], device, amp, steps: int | None = None):
    """The compress stage's recovery hook: ``steps`` (default ``compress.recover_steps``) steps of distillation
    from the base (already loaded as ``teacher``) on the student's own shard, with specialize's KD settings.
    Also the shape search's short distillation of its finalists (``compress.search.distill_steps``)."""
    from downscale import models, train

    cfg, scfg = ctx.cfg, ctx.cfg.specialize
    steps, tcfg = (cfg.compress.recover_steps if steps is None else steps), scfg.train

    def recover(model, round_index: int, student_index: int):
        model = model.float()  # fp32 master weights for the few optimizer steps
        model.train()
        sampler = train.BlockSampler([open_split(ctx.run_dir, shards[student_index], "train")], tcfg.batch_size,
                                     seed=cfg.run.seed + 7919 * (student_index + 1) + round_index)
        opt = train.make_optimizer(model, tcfg)
        wrapper = DistillStudent(model, scfg)
        sched = tcfg.model_copy(update={"max_steps": steps, "warmup_steps": min(tcfg.warmup_steps, steps // 5)})
        t0, last = time.time(), {}
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = train.lr_at(step, sched)
            ids = torch.as_tensor(sampler.batch(step)["input_ids"], device=device)
            target = teacher_targets(teacher, ids, amp) if scfg.kd_ratio > 0 else None
            with models.autocast(device, amp):
                loss, last = wrapper(ids, target)
            if not torch.isfinite(loss):
                raise train.TrainingDiverged(f"compress recovery of student {student_index}: loss {float(loss)} "
                                             f"at step {step + 1}")
            loss.backward()
            if tcfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        ctx.log(f"[compress] student {student_index} recovered after round {round_index + 1}: {steps} KD steps, "
                f"loss {last.get('loss', float('nan')):.3f} (CE {last.get('ce', float('nan')):.3f}) in "
                f"{time.time() - t0:.1f}s")
        model.eval()
        return model

    return recover


# --------------------------------------------------------------------------- teacher


def load_teacher(base_dir: Path, scfg: Any, device, amp):
    """The base as a frozen teacher: bf16 on GPU (or under bf16 autocast), 8-/4-bit via bitsandbytes."""
    import torch

    from downscale import models

    if not (base_dir / "config.json").exists():
        raise StageError(f"{base_dir}: missing base model; run `downscale base` first")
    if scfg.teacher_quant != "none":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = (BitsAndBytesConfig(load_in_8bit=True) if scfg.teacher_quant == "8bit" else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=amp or torch.float32))
        try:
            teacher = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, attn_implementation="sdpa",
                                                           device_map={"": device})
        except (ImportError, RuntimeError, ValueError) as exc:  # bitsandbytes' own errors are long and cryptic
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise StageError(f"{base_dir}: specialize.teacher_quant: bitsandbytes could not load the base in "
                             f"{scfg.teacher_quant} on {torch.device(device).type} ({type(exc).__name__}: {first}); "
                             f"use none") from None
    else:
        dtype = "bfloat16" if (device.type == "cuda" or amp == torch.bfloat16) else "float32"
        teacher = models.load_causal_lm(base_dir, dtype=dtype, device=device)
    teacher.eval()
    teacher.config.use_cache = False
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_targets(teacher, ids, amp, decoder=None):
    """Dense teacher targets for a batch: final hidden states (logits are made per chunk in the loss).
    ``decoder``: a compiled handle on the teacher's decoder (specialize.compile), else the teacher's own."""
    import torch

    from downscale import kd, models

    with torch.no_grad(), models.autocast(ids.device, amp):
        hidden = (decoder if decoder is not None else teacher.get_decoder())(input_ids=ids).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return kd.DenseTeacher(h, teacher.get_output_embeddings().weight)


def ensure_teacher_cache(ctx: StageContext, shard: str, teacher, device, amp):
    """Open (or build, then open) the teacher cache of ``shard``; rebuilt when the base or data changed."""
    from downscale import teacher_cache

    scfg = ctx.cfg.specialize
    root = Path(scfg.cache_dir) if scfg.cache_dir else ctx.run_dir / "work" / "teacher_cache"
    path = root / shard
    expect = teacher_cache.cache_fingerprints(ctx.run_dir, shard, top_k=scfg.cache_top_k,
                                              temperature=scfg.temperature)
    try:
        return teacher_cache.TeacherCache.open(path, expect=expect)
    except (FileNotFoundError, ValueError) as exc:
        if scfg.cache_dir and "another" in str(exc):
            # A user-given cache folder is never overwritten behind the user's back.
            raise StageError(f"{ctx.cfg._source}: specialize.cache_dir: {exc}") from None
        ctx.log(f"[specialize] building the teacher cache of shard {shard} ({exc})")
    if pipeline.is_main_process():
        # Parallel student jobs with replay need the same shard's cache: one builds it, the others wait.
        with pipeline.file_lock(path.parent / f".{shard}.lock"):
            try:
                teacher_cache.TeacherCache.open(path, expect=expect)  # built by another job meanwhile
            except (FileNotFoundError, ValueError):
                teacher_cache.build_teacher_cache(teacher, open_split(ctx.run_dir, shard, "train"), path,
                                                  top_k=scfg.cache_top_k, temperature=scfg.temperature,
                                                  batch_size=scfg.train.batch_size, device=device, amp_dtype=amp,
                                                  fingerprints=expect, logprob_dtype=scfg.cache_logprob_dtype)
    _barrier()
    return teacher_cache.TeacherCache.open(path, expect=expect)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


# --------------------------------------------------------------------------- evaluation


def evaluate_student(student, teacher, blocks_by_shard: dict[str, np.ndarray], *, batch_size: int,
                     max_batches: int | None, device, amp, chunk_tokens: int = 1024,
                     score: Any = None) -> dict[str, dict[str, float]]:
    """Per shard: mean next-token CE of the student and forward KL(teacher || student), pooled by tokens,
    computed chunk by chunk from hidden states (never the full [B, T, V] logits of both). ``score(ids)``
    replaces the per-batch computation (an FSDP-sharded student is scored through its wrapper's forward)."""
    import torch

    was_training = student.training
    student.eval()
    score = score or (lambda ids: score_batch(student, teacher, ids, amp, chunk_tokens))
    out = {}
    with torch.no_grad():
        for shard, blocks in blocks_by_shard.items():
            ce_sum, kl_sum, count = 0.0, 0.0, 0
            n = len(blocks) if max_batches is None else min(len(blocks), max_batches * batch_size)
            for start in range(0, n, batch_size):
                ids = torch.as_tensor(np.asarray(blocks[start:start + batch_size], dtype=np.int64), device=device)
                ce, kl, c = score(ids)
                ce_sum, kl_sum, count = ce_sum + ce, kl_sum + kl, count + c
            out[shard] = {"ce": ce_sum / max(count, 1), "kl": kl_sum / max(count, 1) if teacher else None,
                          "tokens": count}
    if was_training:
        student.train()
    return out


def score_batch(student, teacher, ids, amp, chunk_tokens: int) -> tuple[float, float, int]:
    """Summed next-token CE of ``student`` and forward KL(teacher || student) over the tokens of ``ids``, and
    the token count; the LM heads are applied chunk by chunk."""
    import torch

    from downscale import kd, models

    # fp32 copies of the heads made once per batch (not once per chunk: at a 128k vocabulary each is ~1-2 GB)
    s_head = student.get_output_embeddings().weight.detach().float()
    t_head = teacher.get_output_embeddings().weight.detach().float() if teacher is not None else None
    with models.autocast(ids.device, amp):
        hs = student.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
        ht = teacher.get_decoder()(input_ids=ids).last_hidden_state[:, :-1] if teacher else None
    hs = hs.reshape(-1, hs.shape[-1])
    labels = ids[:, 1:].reshape(-1)
    sums = torch.zeros(2, dtype=torch.float64, device=ids.device)  # [CE, KL], read once at the end
    for c in range(0, len(labels), chunk_tokens):
        ls = (hs[c:c + chunk_tokens].float() @ s_head.T)
        sums[0] += torch.nn.functional.cross_entropy(ls, labels[c:c + chunk_tokens], reduction="sum").double()
        if ht is not None:
            lt = ht.reshape(-1, ht.shape[-1])[c:c + chunk_tokens].float() @ t_head.T
            sums[1] += kd.kd_divergence(ls, lt, "forward_kl").sum().double()
    ce_sum, kl_sum = sums.tolist()
    return ce_sum, kl_sum, len(labels)


def _apply_lora(student, scfg):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = LoraConfig(r=scfg.lora_rank, lora_alpha=scfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(student, lcfg)
