"""Base stage: the uncompressed model everything is measured against.

Either import ``base.name_or_path`` (a local HF folder, a hub id, or with ``base.gguf_file`` a GGUF
file, dequantized and saved as a plain HF folder) into ``<run>/base/`` with the run's tokenizer,
or build a model from ``base.init`` and pretrain it on the union of the shards (the embedded
demo). Importing copies files and never links them, so nothing here writes into the user's
folder or the hub cache. Both end with the base's validation loss per shard (an imported base on
``base.import_eval_batches`` micro-batches), written to ``<run>/base/train_summary.json`` next to
each shard's unigram entropy (the loss of a model that knows only token frequencies: a base that
has learnt anything real is well below it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from downscale._io import read_json
from downscale.data.blocks import data_meta, open_split
from downscale.pipeline import StageContext, StageError, is_main_process, recorded_content, resume_hash

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", *WEIGHT_PATTERNS)
# what is fetched from the hub: the model, and the tokenizer that the data stage reads
FILE_PATTERNS = (*MODEL_FILE_PATTERNS, "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.model",
                 "chat_template*")


def run(ctx: StageContext) -> dict:
    import torch

    from downscale import models

    cfg = ctx.cfg
    device, amp = models.setup_runtime(cfg.run)
    meta = data_meta(ctx.run_dir)
    if cfg.base.name_or_path:
        model, summary = _import(ctx, device, amp)
    else:
        if device.type == "cpu":
            models.tune_cpu_allocator()
        model, summary = _pretrain(ctx, meta, device, amp)
    eval_batches = cfg.base.import_eval_batches if cfg.base.name_or_path else cfg.base.train.eval_batches
    summary["val_loss"] = validation_losses(model, ctx.run_dir, meta["shards"], cfg.base.train.batch_size,
                                            eval_batches, device, amp)
    summary["unigram_entropy"] = {s: _shard_meta(ctx.run_dir, s).get("unigram_entropy") for s in meta["shards"]}
    summary["params"] = models.count_params(model)
    summary["model_type"] = model.config.model_type
    _log_table(ctx, summary)
    if is_main_process():
        out = ctx.output("base")
        if cfg.base.name_or_path:
            from downscale._io import write_json_atomic

            write_json_atomic(out / "train_summary.json", summary)
        else:
            model.config.use_cache = True
            models.save_causal_lm(model, out, tokenizer_dir=ctx.run_dir / "tokenizer",
                                  extra_files={"train_summary.json": summary})
            shutil.copy2(ctx.work_dir() / "metrics.jsonl", out / "metrics.jsonl")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {k: summary[k] for k in ("params", "val_loss", "unigram_entropy") if k in summary} | {
        k: summary[k] for k in ("tokens", "seconds", "tokens_per_s") if k in summary}


# --------------------------------------------------------------------------- pretraining (the demo)


def _pretrain(ctx: StageContext, meta: dict, device, amp) -> tuple[Any, dict]:
    from downscale import models, train

    cfg, tcfg = ctx.cfg, ctx.cfg.base.train
    vocab = int(meta["vocab_size"])
    eos = int(meta["eos_token_id"])
    model = models.build_model(cfg.base.init, vocab_size=vocab, max_positions=int(meta["block_size"]),
                               bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, seed=cfg.run.seed)
    model.config.use_cache = False
    work = ctx.work_dir()
    accelerator = train.make_accelerator(device, amp, tcfg.report_to, project_dir=work, run_name=f"{cfg.run.name}-base",
                                         tracker_config=cfg.model_dump(mode="json")["base"])
    shards = meta["shards"]
    sources = [open_split(ctx.run_dir, s, "train") for s in shards]
    sampler = train.BlockSampler(sources, tcfg.batch_size * tcfg.grad_accum * accelerator.num_processes,
                                 seed=cfg.run.seed)
    n_params = models.count_params(model)
    ctx.log(f"[base] pretraining a {cfg.base.init.arch} of {n_params / 1e6:.2f}M parameters on "
            f"{sum(len(s) for s in sources)} blocks of {meta['block_size']} tokens from {len(shards)} shards "
            f"({tcfg.max_steps} steps x {sampler.global_batch} blocks; precision {amp or 'fp32'})")

    def validate(m) -> dict[str, float]:
        losses = validation_losses(m, ctx.run_dir, shards, tcfg.batch_size, tcfg.eval_batches, accelerator.device,
                                   amp)
        return {f"loss/{k}": v for k, v in losses.items()}

    # the next-token CE fused with the LM head (no [B, T, V] logits); validation scores through the wrapper,
    # the FSDP root when sharded. The checkpoints' key: the stage's keys but its loop's (fit adds those that shape
    # the trajectory, and the data order: train.resume_key), the data, and the fused objective (checkpoints of the
    # unwrapped model, whose parameter names lack the wrapper's "model." prefix, are not resumed).
    wrapper = train.FusedCausalLM(model)
    ckpt_hash = resume_hash(cfg, "base", drop=("base.train",), objective="fused-ce",
                            inputs=recorded_content(ctx.run_dir, ("data",)))
    result = train.fit(wrapper, cfg=tcfg, sampler=sampler, loss_fn=train.fused_causal_lm_loss, work_dir=work,
                       accelerator=accelerator, validate=validate, desc="base", log=ctx.log, config_hash=ckpt_hash,
                       inputs=f"the data in {ctx.run_dir / 'data'} and the starting weights")
    model = accelerator.unwrap_model(wrapper).model
    if result.full_state is not None:  # trained sharded (FSDP): a plain copy with the gathered weights
        model = models.plain_copy(model, result.full_state, device, prefix="model.")
    summary = {"tokens": result.tokens, "steps": result.steps, "seconds": round(result.seconds, 2),
               "tokens_per_s": round(result.tokens_per_s, 1), "resumed_from": result.resumed_from,
               "peak_memory_mb": round(result.peak_memory_mb or 0, 1), "peak_memory_kind": result.peak_memory_kind,
               "precision": str(amp).removeprefix("torch.") if amp else "fp32", "world_size": accelerator.num_processes}
    return model, summary


# --------------------------------------------------------------------------- importing a pretrained base


def _import(ctx: StageContext, device, amp) -> tuple[Any, dict]:
    """Load ``base.name_or_path`` (an HF folder or hub id, or a GGUF file in it) and write it with the run's
    tokenizer into ``<run>/base/``. Files are copied, never linked: nothing is ever written through to the
    source folder or the hub cache."""
    from transformers import AutoConfig

    from downscale import models
    from downscale.config import ConfigError, check_block_size, remote_code_refusal, resolve_base_path

    cfg = ctx.cfg.base
    try:
        location = resolve_base_path(cfg.name_or_path, ctx.cfg._source)
    except ConfigError as exc:
        raise StageError(str(exc)) from None
    out = ctx.output("base")
    main = is_main_process()
    if cfg.gguf_file:
        model, src, check = load_gguf_as_plain(location, cfg.gguf_file, revision=cfg.revision, dtype=cfg.dtype,
                                               source=ctx.cfg._source)
        try:
            models.model_arch(model.config)
        except ValueError as exc:
            raise StageError(f"{ctx.cfg._source}: base.gguf_file: {exc}") from None
        check_block_size(ctx.cfg, getattr(model.config, "max_position_embeddings", None), str(src))
        how = (f"dequantized GGUF {cfg.gguf_file}, rebuilt as a plain {type(model).__name__} (logits on "
               f"{check['tokens']} tokens equal the GGUF model's: max |diff| {check['max_abs_diff']:.1e})")
        if main:
            model.config.use_cache = True
            models.save_causal_lm(model, out)
        model.to(device)
    else:
        src = resolve_model_folder(location, cfg.revision)
        try:
            hf_config = AutoConfig.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
            models.model_arch(hf_config)
        except ValueError as exc:
            refused = remote_code_refusal(exc, ctx.cfg._source, cfg.name_or_path)
            if refused is not None:
                raise StageError(str(refused)) from None
            raise StageError(f"{ctx.cfg._source}: base.name_or_path: {' '.join(str(exc).split())}") from None
        check_block_size(ctx.cfg, getattr(hf_config, "max_position_embeddings", None), f"{src}/config.json")
        has_safetensors = any(src.glob("*.safetensors"))
        if has_safetensors and main:  # the model's own files; the tokenizer is the run's (below)
            out.mkdir(parents=True, exist_ok=True)
            for pattern in MODEL_FILE_PATTERNS:
                for f in src.glob(pattern):
                    if f.is_file():
                        _copy_new(f, out / f.name)
        model = models.load_causal_lm(src, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                                      revision=None)
        if not has_safetensors and main:  # convert (.bin is read with weights_only=True by transformers)
            models.save_causal_lm(model, out)
        how = "copied its safetensors" if has_safetensors else "converted its .bin weights to safetensors"
        check = None
    if main:
        for f in (ctx.run_dir / "tokenizer").iterdir():
            if f.is_file():
                _copy_new(f, out / f.name)
    tok_vocab = int(data_meta(ctx.run_dir)["vocab_size"])
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < tok_vocab:
        raise StageError(f"{ctx.cfg._source}: base.name_or_path: the model has {rows} embedding rows but the run's "
                         f"tokenizer has {tok_vocab} tokens; use data.tokenizer.kind: base")
    ctx.log(f"[base] imported {cfg.name_or_path} ({models.count_params(model) / 1e9:.3f}B parameters) from {src}: "
            f"{how}; wrote it with the run's tokenizer")
    summary = {"source": str(cfg.name_or_path), "revision": cfg.revision, "gguf_file": cfg.gguf_file}
    if check is not None:
        summary["gguf_check"] = check
    return model, summary


def load_gguf_as_plain(folder: str | Path, gguf_file: str, revision: str | None = None, dtype: str = "auto",
                       source: str = "<config>", check_tokens: int = 16) -> tuple[Any, Path, dict]:
    """Load the GGUF file ``gguf_file`` in ``folder`` (a local folder or hub id) through transformers
    (dequantized), and rebuild it as a plain model of its config's class without the quantization config,
    which transformers refuses to save. Returns (the plain model on the CPU in eval mode, the GGUF file's
    path, the check: its logits on ``check_tokens`` tokens against the GGUF-loaded model's). Raises
    StageError when loading fails or the logits differ."""
    import torch
    from transformers import AutoModelForCausalLM

    from downscale.models import quiet_transformers

    quiet_transformers()
    kwargs = {"dtype": getattr(torch, dtype)} if dtype != "auto" else {}
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, revision=revision,
                                                          attn_implementation="sdpa", **kwargs)
    except ImportError as exc:  # the gguf package reads the file
        raise StageError(f"{source}: base.gguf_file: reading GGUF files needs the gguf package (pip install gguf; "
                         f"`make setup` installs it): {str(exc).splitlines()[0][:200]}") from None
    except Exception as exc:  # noqa: BLE001 - a missing file, an unsupported architecture: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"{source}: base.gguf_file: cannot load {gguf_file!r} from {folder}: {first[:300]}") from None
    gguf_model.eval()
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    try:  # no random initialisation: every weight is loaded below
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.linspace(0, vocab - 1, check_tokens).long()[None]  # [1, T], tokens across the vocabulary
    with torch.no_grad():
        want, got = gguf_model(ids).logits.float(), model(ids).logits.float()  # [1, T, V]
    diff = float((want - got).abs().max())
    scale = float(want.abs().max())
    del gguf_model
    if not diff <= 1e-5 * max(scale, 1.0):
        raise StageError(f"{source}: base.gguf_file: the plain {type(model).__name__} rebuilt from {gguf_file!r} "
                         f"does not reproduce the GGUF model's logits (max |diff| {diff:.3g}); not imported")
    path = Path(folder) / gguf_file
    return model, path, {"tokens": check_tokens, "max_abs_diff": diff, "dtype": str(model.dtype).removeprefix(
        "torch.")}


def resolve_model_folder(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder for a local path or hub id (the hub is only asked when the path does not exist)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise StageError(f"{path}: base.name_or_path: not a Hugging Face model folder (no config.json)")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=list(FILE_PATTERNS) + ["*.bin"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated model: one line for the user
        raise StageError(f"base.name_or_path: cannot get {name_or_path!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None


def _copy_new(src: Path, dst: Path) -> None:
    """Copy the bytes of ``src`` (through a symlink) into a new file ``dst``: never a hard link, and an
    existing ``dst`` is replaced rather than written through, so the source cannot be changed by any
    later write here. The copy gets default permissions (a read-only source stays read-only, not its copy)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- helpers


def validation_losses(model, run_dir: Path, shards: list[str], batch_size: int, max_batches: int, device,
                      amp) -> dict[str, float]:
    """Mean next-token loss on each shard's val split (first ``max_batches`` batches) and pooled by tokens."""
    from downscale.models import mean_nll

    out, total, count = {}, 0.0, 0
    for shard in shards:
        loss, n = mean_nll(model, open_split(run_dir, shard, "val"), batch_size, device, amp, max_batches)
        out[shard] = loss
        total, count = total + loss * n, count + n
    out["pooled"] = total / count if count else float("nan")
    return out


def _shard_meta(run_dir: Path, shard: str) -> dict:
    path = run_dir / "data" / shard / "meta.json"
    return read_json(path) if path.exists() else {}


def _log_table(ctx: StageContext, summary: dict) -> None:
    ctx.log("[base] validation loss per shard (nats/token) vs the shard's unigram entropy:")
    for shard, loss in summary["val_loss"].items():
        ent = summary["unigram_entropy"].get(shard)
        extra = f"   unigram entropy {ent:.3f}" if isinstance(ent, float) else ""
        ctx.log(f"  {shard:<12} {loss:.3f}{extra}")

