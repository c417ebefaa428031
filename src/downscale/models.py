"""Shared model helpers: device and precision choice, building, loading and saving causal LMs.

Every stage goes through these functions so that models are built, loaded and written the same
way everywhere: Hugging Face folders with safetensors, ``trust_remote_code`` off unless the
config turns it on, SDPA attention, and the run's tokenizer copied next to the weights so each
folder is a self-contained model (``AutoModelForCausalLM`` / ``AutoTokenizer`` /
``lm_eval --model hf`` load it as it is).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downscale import integrity

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")


# --------------------------------------------------------------------------- runtime


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else cpu. Asking for cuda without one is an error.

    Under a launcher (``accelerate launch`` / ``torchrun`` set ``LOCAL_RANK``) with several visible GPUs, each
    process gets its own, ``cuda:<LOCAL_RANK>``, made the current device before any model is loaded (accelerate
    would do it only when the Accelerator is built, after the stages have loaded their models, so every rank
    would put its teacher and student on GPU 0). One visible GPU per process (``CUDA_VISIBLE_DEVICES`` set per
    job, as ``scripts/launch_students.sh`` does): ``cuda``, that GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device is 'cuda' but torch sees no CUDA device")
        local, count = os.environ.get("LOCAL_RANK", "").strip(), torch.cuda.device_count()
        if local and count > 1:
            if not local.isdigit() or int(local) >= count:
                raise RuntimeError(f"LOCAL_RANK is {local!r} but torch sees {count} CUDA devices (0..{count - 1})")
            index = int(local)
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True where bf16 matmuls are fast on this CPU (AVX512-bf16 or AMX)."""
    cpu = torch.cpu
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None:
            with contextlib.suppress(Exception):
                if fn():
                    return True
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``run.precision`` on ``device``; None means plain fp32.

    ``auto``: bf16 on CUDA devices that support it and on CPUs with fast bf16, else fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise RuntimeError("run.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` (for products that must stay in the dtype they are given, e.g. fp32 LM
    heads scored inside a caller's bf16 autocast), or a no-op where torch has no autocast for the device."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def hold_in_compute_dtype(model: torch.nn.Module, amp: torch.dtype | None) -> int:
    """For a model that only infers under autocast ``amp``: its Linear weights (and biases) held in ``amp`` once,
    so that autocast stops casting every weight again on every forward (measured 1.34x faster forwards at
    SmolLM2-135M's shape in bf16 on a CPU). The results are those of autocast bit for bit: autocast casts an fp32
    weight to ``amp`` per call with the same rounding. Norms, embeddings and the output head (tied or not) stay
    fp32: the residual stream and the fp32 head products of the scorers are unchanged. Such a model must run
    under autocast from now on. Returns the number of Linear layers cast; none when ``amp`` is None."""
    if amp is None:
        return 0
    keep = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, get, lambda: None)()
        if mod is not None and getattr(mod, "weight", None) is not None:
            keep.add(id(mod.weight))
    cast = 0
    for mod in model.modules():
        if type(mod) is not torch.nn.Linear or id(mod.weight) in keep:
            continue
        if not mod.weight.is_floating_point() or mod.weight.dtype == amp:
            continue
        mod.weight.data = mod.weight.data.to(amp)
        if mod.bias is not None:
            mod.bias.data = mod.bias.data.to(amp)
        cast += 1
    return cast


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_MALLOC_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS every step.

    Measured on 2-core CI machines (shared/NOTES.md): minor page faults per training step fall
    from ~400k to ~0 and CPU training throughput rises 1.5-2.6x, for ~0.1-1 GB more peak memory.
    Same effect as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64GiB MALLOC_TOP_PAD_=1GiB, set at
    run time through mallopt. A no-op off glibc or when DOWNSCALE_NO_MALLOC_TUNING is set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("DOWNSCALE_NO_MALLOC_TUNING"):
        return _MALLOC_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    ok = all(libc.mallopt(opt, val) == 1 for opt, val in (
        (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**30)))
    _MALLOC_TUNED = ok
    return ok


# torch.compile backend of ``compiled_decoder`` (tests swap in a recording one).
COMPILE_BACKEND: Any = "inductor"


def compiled_decoder(model: torch.nn.Module):
    """``torch.compile`` of ``model``'s decoder (the body before the output head) as a separate callable: the
    module itself, its parameters and state_dict keys stay as they are, and calls through the module (validation,
    saving) stay uncompiled. Shapes become dynamic after the first recompilation (dynamo's default)."""
    return torch.compile(model.get_decoder(), backend=COMPILE_BACKEND)


def check_compile(device: torch.device, where: str) -> None:
    """Inductor on a CPU generates C++: fail early, with one line, when no compiler is on PATH."""
    if COMPILE_BACKEND == "inductor" and device.type == "cpu" and not any(
            shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise ValueError(f"{where}: torch.compile on the CPU needs a C++ compiler (c++, g++ or clang++) on PATH; "
                         f"install one or set it to false")


def configure_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def check_runtime(cfg: Any, stages: tuple[str, ...] | list[str] = ()) -> None:
    """Before a stage touches the run directory: can this machine do what the config's ``run.device`` and
    ``run.precision`` ask (and, when ``specialize`` is among ``stages``, ``specialize.teacher_quant``: bitsandbytes
    installed; its pinned version runs 8-/4-bit on the CPU too)? A ``ConfigError`` naming the key (one line, exit 2
    in the CLI) where it cannot, instead of a traceback from deep inside torch once the stage has started."""
    import importlib.util

    from downscale.config import ConfigError

    run = cfg.run
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(cfg.origin("run.device"), "run.device", "torch sees no CUDA device on this machine; use auto "
                          "or cpu", run.device)
    try:
        device = resolve_device(run.device)
    except RuntimeError as exc:  # LOCAL_RANK beyond the visible GPUs
        raise ConfigError(cfg.origin("run.device"), "run.device", str(exc), run.device) from None
    if run.precision == "fp16" and device.type != "cuda":
        raise ConfigError(cfg.origin("run.precision"), "run.precision", "fp16 needs a CUDA device (this run is on "
                          f"the {device.type}); use bf16, fp32 or auto", run.precision)
    quant = cfg.specialize.teacher_quant
    if "specialize" in stages and quant != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(cfg.origin("specialize.teacher_quant"), "specialize.teacher_quant",
                          f"a teacher quantized to {quant} needs the bitsandbytes package (pip install "
                          f"bitsandbytes); or use none", quant)


def setup_runtime(run: Any, tune_allocator: bool = False) -> tuple[torch.device, torch.dtype | None]:
    """What every stage does first with the config's ``run`` section: quiet transformers' logs, set the thread
    count, allow TF32 for fp32 matmuls on CUDA or not (``run.tf32``; PyTorch's default is not: fp32 LM-head
    products would then run ~8x below the bf16 rate on an H100), resolve the device and the autocast dtype; with
    ``tune_allocator``, tune glibc's allocator on a CPU (``tune_cpu_allocator``: process-wide, so only stages that
    train call it). Returns (device, autocast dtype)."""
    quiet_transformers()
    configure_threads(run.threads)
    torch.backends.cuda.matmul.allow_tf32 = bool(run.tf32)  # global flags; CUDA kernels only read them
    torch.backends.cudnn.allow_tf32 = bool(run.tf32)
    device = resolve_device(run.device)
    amp = autocast_dtype(run.precision, device)
    if tune_allocator and device.type == "cpu":
        tune_cpu_allocator()
    return device, amp


# --------------------------------------------------------------------------- building


def build_model(init: Any, vocab_size: int, max_positions: int, bos_token_id: int | None = None,
                eos_token_id: int | None = None, pad_token_id: int | None = None, seed: int = 0):
    """A freshly initialised causal LM from a ``ModelInitConfig`` (the demo's base)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if init.arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {init.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    head_dim = init.head_dim or init.hidden_size // init.num_heads
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=init.hidden_size, intermediate_size=init.intermediate_size,
        num_hidden_layers=init.num_layers, num_attention_heads=init.num_heads,
        num_key_value_heads=init.num_kv_heads, head_dim=head_dim, max_position_embeddings=max_positions,
        tie_word_embeddings=init.tie_word_embeddings, rope_theta=init.rope_theta,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        use_cache=True,
    )
    if init.arch in ("qwen2", "mistral"):
        kwargs["sliding_window"] = None
    config = AutoConfig.for_model(init.arch, **kwargs)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model


def load_causal_lm(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                   trust_remote_code: bool = False, revision: str | None = None):
    """Load an HF causal LM folder or hub id with SDPA attention, in ``dtype``, onto ``device``."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    device = torch.device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
            attn_implementation="sdpa", low_cpu_mem_usage=True,
            device_map={"": device} if device.type == "cuda" else None,
        )
    except Exception as exc:  # a truncated or garbled safetensors file: one line naming it
        corrupt = integrity.safetensors_error(exc, _weights_file(path))
        if corrupt is None:
            raise
        raise corrupt from None
    if device.type != "cuda":
        model.to(device)
    integrity.check_weights(model, path)
    return model


def _weights_file(path: str | Path) -> Path | str:
    """The safetensors file(s) of a model folder, for an error message (the folder itself when unsure)."""
    found = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    return found[0] if len(found) == 1 else path


def plain_copy(model, state: dict[str, torch.Tensor], device: str | torch.device = "cpu", prefix: str = ""):
    """A plain (unsharded) HF causal LM of ``model``'s config holding ``state`` (the full weights of a model
    trained under FSDP, ``train.FitResult.full_state``; keys under ``prefix`` when it was wrapped). A sharded
    model's parameters are DTensors and its forward runs collectives, so evaluation and saving use this copy."""
    from transformers import AutoModelForCausalLM

    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dtype = next(v.dtype for v in own.values() if v.is_floating_point())
    copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype, attn_implementation="sdpa")
    copy.load_state_dict(own, strict=True)
    return copy.to(device)


def save_causal_lm(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                   extra_files: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an HF folder (safetensors) into ``out_dir`` (a staging path: the caller
    renames it into place), copy the tokenizer files next to it, and write ``extra_files``
    (name -> JSON-serialisable object)."""
    from downscale._io import write_json_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out_dir / f.name)
    for name, obj in (extra_files or {}).items():
        write_json_atomic(out_dir / name, obj)
    return out_dir


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding and head count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def model_arch(config: Any) -> str:
    """The architecture family of an HF config, checked against what we support."""
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    return arch


# Per chunk of positions, next-token scoring holds about this many bytes of [chunk, V] fp32 scores.
NLL_CHUNK_BYTES = 512 * 2**20


def nll_chunk_tokens(vocab: int, n_models: int = 1, budget_bytes: int = NLL_CHUNK_BYTES) -> int:
    """Positions per chunk so that ``n_models`` x [chunk, vocab] fp32 scores fit ``budget_bytes`` (at least 16)."""
    return max(16, budget_bytes // (4 * vocab * max(1, n_models)))


def split_head(model) -> tuple[Any, Any] | None:
    """(decoder, output head) of a supported causal LM whose logits are exactly ``head(decoder(...))``
    (LLaMA, Qwen2, Mistral: no logit scaling or soft-capping; a head without bias), else None."""
    if getattr(getattr(model, "config", None), "model_type", None) not in SUPPORTED_ARCHS:
        return None
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return body, head


@torch.no_grad()
def block_nll(model, tokens: torch.Tensor, device: torch.device, amp: torch.dtype | None = None) -> tuple[float, int]:
    """Summed next-token NLL (nats; the head products in fp32, see ``chunked_nll_sum``) and token count of blocks
    ``tokens`` [B, T].

    A supported causal LM is scored from its final hidden states with the LM head applied in fp32 chunk by
    chunk (``nll_chunk_tokens``): the [B, T, V] logits never exist (at a 128k vocabulary they would be
    ~8 GB per 16k tokens in fp32, twice with their log-softmax). A training wrapper that scores itself
    (``scores_nll``, e.g. ``train.FusedCausalLM``, the FSDP root of the base stage) runs its own forward; a
    model sharded by FSDP or of another architecture runs its whole forward (full logits).
    """
    tokens = tokens.to(device=device, dtype=torch.long)
    if getattr(model, "scores_nll", False):
        with autocast(device, amp):
            total, count = model(tokens, score=True)
        return float(total), int(count)
    split = None if any(hasattr(p, "full_tensor") for p in model.parameters()) else split_head(model)
    labels = tokens[:, 1:].reshape(-1)
    if split is None:
        with autocast(device, amp):
            logits = model(input_ids=tokens).logits  # [B, T, V]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        return float(-logp.gather(-1, tokens[:, 1:, None]).sum()), int(labels.numel())
    body, head = split
    with autocast(device, amp):
        hidden = body(input_ids=tokens).last_hidden_state[:, :-1]
    return float(chunked_nll_sum(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels)), int(labels.numel())


def chunked_nll_sum(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``labels`` [N] under logits ``hidden`` [N, H] x ``head_weight`` [V, H]^T, in fp32
    (autocast switched off here: callers score under autocast, and accelerate wraps a prepared model's forward
    in it; on CUDA the products use TF32 when ``run.tf32`` allows), ``chunk_tokens`` rows at a time (default
    ``nll_chunk_tokens(V)``), summed in float64; a 0-d tensor (no host sync)."""
    w = head_weight.detach().float()  # one fp32 copy of the head, not one per chunk
    step = chunk_tokens or nll_chunk_tokens(w.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    with no_autocast(hidden.device):
        for c in range(0, labels.shape[0], step):
            total += torch.nn.functional.cross_entropy(hidden[c:c + step].float() @ w.T, labels[c:c + step],
                                                       reduction="sum").double()
    return total


@torch.no_grad()
def mean_nll(model, blocks, batch_size: int, device: torch.device, amp: torch.dtype | None = None,
             max_batches: int | None = None) -> tuple[float, int]:
    """Mean next-token NLL (nats per predicted token) over packed ``blocks`` [N, T], and the token count.

    Blocks are taken in order (deterministic); ``max_batches`` caps the work. NLL is pooled over
    tokens, never averaged over batches.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = len(blocks) if max_batches is None else min(len(blocks), max_batches * batch_size)
    for start in range(0, n, batch_size):
        chunk = torch.as_tensor(np.asarray(blocks[start:min(n, start + batch_size)], dtype=np.int64))
        s, c = block_nll(model, chunk, device, amp)
        total, count = total + s, count + c
    if was_training:
        model.train()
    return (total / count if count else float("nan")), count


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info logs (our own bars say what runs)."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
