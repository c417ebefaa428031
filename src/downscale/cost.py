"""Compute ledger maths: parameter counts and FLOPs per token from an HF config, training and teacher
FLOPs, energy, CO2, a ledger of stages, the from-scratch comparison, and MFU.

Only numpy, scipy and the standard library are imported here (through :mod:`downscale.law`);
configs may be plain dicts (a ``config.json``) or ``transformers.PretrainedConfig`` objects.

Conventions (the ones the report states):

- **Forward FLOPs per token** = 2 x (matmul weights: q, k, v, o, the MLP's gate/up/down and the LM
  head, which is counted even when tied to the embedding) + attention scores and values
  2 x 2 x n_layers x span x (num_heads x head_dim). The embedding lookup, norms, biases,
  softmax and rotary embeddings are not counted (they are O(hidden) per token, not O(hidden^2)).
  ``span`` is the number of keys each query sees. By default it is the full context (capped by a
  sliding window), the dense convention of Kaplan et al. 2020 and Hoffmann et al. 2022 (App. F),
  and what a kernel that computes the whole score matrix does. ``causal=True`` uses instead the
  mean number of keys a query sees under the causal mask, (T + 1) / 2 for a window of T.
- **Training** = 6 N D (forward 2 N D + backward 4 N D), or, from forward FLOPs per token, 3 x
  forward x D. **Teacher** passes (forward only) = 2 N D, or 1 x forward x D.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from downscale.law import ChinchillaFit, get_fit, tokens_for_loss

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
# H100 SXM5: NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), "Peak BF16 Tensor TFLOPS with FP32
#   Accumulate" 989.4 (1978.9 with sparsity); the H100 datasheet's 1,979 TFLOPS is the sparse figure.
# H200 SXM: NVIDIA H200 datasheet, BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989.4 dense (same GH100 die
#   and clocks as H100 SXM; only the memory differs).
# H100 PCIe: the whitepaper's 756 dense (1,513 with sparsity).
# A100 (SXM4 and PCIe): NVIDIA A100 datasheet, BF16 Tensor Core 312 TFLOPS (624 with sparsity).
PEAK_BF16_DENSE_FLOPS: dict[str, float] = {
    "H100 SXM": 989.4e12,
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "A100": 312.0e12,
}


# =========================================================================== config reading


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        v = config.get(key, default)
    else:
        v = getattr(config, key, default)
    return default if v is None else v


def _shape(config: Any) -> dict[str, Any]:
    """The dimensions that set parameter counts and FLOPs, with HF's defaults filled in."""
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                           "vocab_size") if _get(config, k) is None]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)} (expected a llama/qwen2/mistral-shaped HF config)")
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    arch = _get(config, "model_type", "llama")
    if arch == "qwen2":  # q/k/v always carry a bias in Qwen2; o_proj never does
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif arch == "mistral":
        qkv_bias = o_bias = mlp_bias = False
    else:  # llama and llama-like: one flag for all four attention projections, one for the MLP
        qkv_bias = o_bias = bool(_get(config, "attention_bias", False))
        mlp_bias = bool(_get(config, "mlp_bias", False))
    return {
        "arch": arch, "hidden": hidden, "inter": int(_get(config, "intermediate_size")), "heads": heads,
        "kv_heads": int(_get(config, "num_key_value_heads", heads)),
        "head_dim": int(_get(config, "head_dim", hidden // heads)),
        "layers": int(_get(config, "num_hidden_layers")), "vocab": int(_get(config, "vocab_size")),
        "tied": bool(_get(config, "tie_word_embeddings", False)),
        "qkv_bias": qkv_bias, "o_bias": o_bias, "mlp_bias": mlp_bias,
    }


def _layer_windows(config: Any, n_layers: int) -> list[int | None]:
    """The sliding window of each layer (None: full attention)."""
    window = _get(config, "sliding_window")
    types = _get(config, "layer_types")
    if types:
        return [window if t == "sliding_attention" else None for t in types][:n_layers]
    if _get(config, "model_type") == "qwen2":
        if not _get(config, "use_sliding_window", False) or window is None:
            return [None] * n_layers
        first = int(_get(config, "max_window_layers", 0))
        return [window if i >= first else None for i in range(n_layers)]
    return [window] * n_layers


# =========================================================================== parameters and FLOPs


def param_counts(config: Any) -> dict[str, int]:
    """Parameters by component: embedding, attention, mlp, norms, head (0 when tied: counted once, in the
    embedding) and total. Matches ``sum(p.numel())`` over the distinct parameters of the HF model."""
    s = _shape(config)
    h, q_out, kv_out = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    attn = h * q_out + 2 * h * kv_out + q_out * h
    if s["qkv_bias"]:
        attn += q_out + 2 * kv_out
    if s["o_bias"]:
        attn += h
    mlp = 3 * h * s["inter"] + ((2 * s["inter"] + h) if s["mlp_bias"] else 0)
    counts = {
        "embedding": s["vocab"] * h,
        "attention": s["layers"] * attn,
        "mlp": s["layers"] * mlp,
        "norms": (2 * s["layers"] + 1) * h,  # input + post-attention RMSNorm per layer, and the final norm
        "head": 0 if s["tied"] else s["vocab"] * h,
    }
    counts["total"] = sum(counts.values())
    return counts


def _mean_span(context: int, window: int | None, causal: bool) -> float:
    w = context if window is None else min(int(window), context)
    if not causal:
        return float(w)
    # query i (1-based) sees min(i, w) keys: mean over i = 1..context
    return (w * (w + 1) / 2 + (context - w) * w) / context


def flops_breakdown(config: Any, context: int, *, causal: bool = False) -> dict[str, float]:
    """Forward FLOPs per token by part: attention projections, mlp, head, attention scores+values, total.

    ``context`` is the sequence length the model runs at. See the module docstring for what is counted.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    s = _shape(config)
    h, q_out, kv_out = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    proj = 2 * s["layers"] * (h * q_out + 2 * h * kv_out + q_out * h)
    mlp = 2 * s["layers"] * 3 * h * s["inter"]
    head = 2 * s["vocab"] * h
    scores = sum(2 * 2 * _mean_span(context, w, causal) * q_out for w in _layer_windows(config, s["layers"]))
    out = {"attention_proj": float(proj), "mlp": float(mlp), "head": float(head), "attention_scores": float(scores)}
    out["total"] = sum(out.values())
    out["matmul_params"] = float((proj + mlp + head) // 2)
    return out


def flops_per_token(config: Any, context: int, *, causal: bool = False) -> float:
    """Forward FLOPs per token of an HF decoder at sequence length ``context`` (see the module docstring)."""
    return flops_breakdown(config, context, causal=causal)["total"]


def ensemble_flops_per_token(configs: Sequence[Any], context: int, *, causal: bool = False) -> float:
    """Forward FLOPs per token of an ensemble that runs every member on every token (the sum)."""
    return sum(flops_per_token(c, context, causal=causal) for c in configs)


def training_flops(n: float, tokens: float, *, per_token: bool = False) -> float:
    """Training FLOPs: 6 N D with ``n`` = parameters, or, with ``per_token=True`` and ``n`` = forward FLOPs
    per token, 3 x forward x D (backward = 2 x forward)."""
    _check_nonneg(n=n, tokens=tokens)
    return (3.0 if per_token else 6.0) * n * tokens


def teacher_flops(n: float, tokens: float, *, per_token: bool = False) -> float:
    """Teacher (forward-only) FLOPs: 2 N D with ``n`` = parameters, or ``n`` x D with ``per_token=True``."""
    _check_nonneg(n=n, tokens=tokens)
    return (1.0 if per_token else 2.0) * n * tokens


def _check_nonneg(**values: float) -> None:
    for k, v in values.items():
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")


# =========================================================================== energy, CO2, the ledger


def energy_kwh(seconds: float, device_watts: float, devices: int = 1) -> float:
    """Energy in kWh of ``devices`` devices drawing ``device_watts`` each for ``seconds``."""
    _check_nonneg(seconds=seconds, device_watts=device_watts, devices=devices)
    return seconds * device_watts * devices / 3.6e6


def co2_kg(kwh: float, grid_gco2_per_kwh: float) -> float:
    """CO2-equivalent in kg for ``kwh`` at a grid carbon intensity in gCO2e/kWh."""
    _check_nonneg(kwh=kwh, grid_gco2_per_kwh=grid_gco2_per_kwh)
    return kwh * grid_gco2_per_kwh / 1000.0


def stage_entry(stage: str, *, seconds: float = 0.0, train_n: float = 0.0, train_tokens: float = 0.0,
                teacher_n: float = 0.0, teacher_tokens: float = 0.0, forward_n: float = 0.0,
                forward_tokens: float = 0.0, per_token: bool = False, devices: int = 1,
                **extra: Any) -> dict[str, Any]:
    """One ledger row from what a stage did: training (6 N D), teacher passes (2 N D) and plain forward
    passes such as evaluation (2 N D). With ``per_token=True`` every ``*_n`` is forward FLOPs per token
    instead of parameters. ``tokens`` is the tokens trained on, or, if none, the tokens run forward.
    Extra keyword arguments are kept in the row."""
    flops = (training_flops(train_n, train_tokens, per_token=per_token)
             + teacher_flops(teacher_n, teacher_tokens, per_token=per_token)
             + teacher_flops(forward_n, forward_tokens, per_token=per_token))
    tokens = train_tokens or forward_tokens or teacher_tokens
    return {"stage": stage, "flops": flops, "tokens": tokens, "seconds": seconds, "devices": devices, **extra}


def ledger(stages: list[dict[str, Any]], *, device_watts: float = 700.0, grid_gco2_per_kwh: float = 400.0
           ) -> dict[str, Any]:
    """Total a list of stage rows.

    Each row: ``stage`` (name), and optional ``flops``, ``tokens``, ``seconds``, ``devices`` (default
    1), ``device_watts`` (default the argument) or a measured ``kwh`` that overrides the estimate;
    other keys pass through. Returns ``{"stages": rows with kwh and co2_kg filled in, "total": {flops,
    tokens, seconds, device_seconds, kwh, co2_kg}, "assumptions": {...}}``.
    """
    _check_nonneg(device_watts=device_watts, grid_gco2_per_kwh=grid_gco2_per_kwh)
    rows, total = [], {"flops": 0.0, "tokens": 0.0, "seconds": 0.0, "device_seconds": 0.0, "kwh": 0.0,
                       "co2_kg": 0.0}
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or not isinstance(st.get("stage"), str):
            raise ValueError(f"ledger row {i} must be a dict with a 'stage' name, got {st!r}")
        row = dict(st)
        for k in ("flops", "tokens", "seconds"):
            row[k] = float(row.get(k) or 0.0)
        row["devices"] = int(row.get("devices") or 1)
        watts = float(row.get("device_watts", device_watts))
        _check_nonneg(**{f"{row['stage']}.{k}": row[k] for k in ("flops", "tokens", "seconds", "devices")},
                      device_watts=watts)
        if row.get("kwh") is None:
            row["kwh"] = energy_kwh(row["seconds"], watts, row["devices"])
        row["co2_kg"] = co2_kg(float(row["kwh"]), grid_gco2_per_kwh)
        rows.append(row)
        total["flops"] += row["flops"]
        total["tokens"] += row["tokens"]
        total["seconds"] += row["seconds"]
        total["device_seconds"] += row["seconds"] * row["devices"]
        total["kwh"] += float(row["kwh"])
        total["co2_kg"] += row["co2_kg"]
    return {"stages": rows, "total": total,
            "assumptions": {"device_watts": device_watts, "grid_gco2_per_kwh": grid_gco2_per_kwh,
                            "training": "6 N D", "teacher_forward": "2 N D"}}


def from_scratch_cost(n_params: float, target_loss: float | None, fit: str | ChinchillaFit = "hoffmann"
                      ) -> dict[str, Any]:
    """What training a model of ``n_params`` parameters to ``target_loss`` would cost by a Chinchilla fit.

    ``target_loss`` must be on the fit's scale (nats/token on the fit's data and tokenizer): a loss
    measured on our own shards with our own tokenizer is NOT comparable, and the result then only
    says what the fit would predict. With ``target_loss=None`` the answer is the compute-optimal
    run for this N (the budget whose optimal model size is N). Returns tokens, flops (6 N D),
    ``reachable`` (False when the target is at or below the fit's floor E + A/N^alpha for this N)
    and that floor.
    """
    _check_nonneg(n_params=n_params)
    if n_params <= 0:
        raise ValueError(f"n_params must be > 0, got {n_params}")
    f = get_fit(fit)
    floor = f.E + f.A / n_params**f.alpha
    out: dict[str, Any] = {"fit": f.name, "n_params": n_params, "target_loss": target_loss, "loss_floor_for_n": floor}
    if target_loss is None:
        # N* = G (C/6)^(beta/(alpha+beta))  =>  C/6 = (N/G)^((alpha+beta)/beta), D = (C/6) / N
        s = f.alpha + f.beta
        g = (f.alpha * f.A / (f.beta * f.B)) ** (1.0 / s)
        d = (n_params / g) ** (s / f.beta) / n_params
        loss = f.E + f.A / n_params**f.alpha + f.B / d**f.beta
        out.update({"reachable": True, "tokens": d, "flops": 6.0 * n_params * d, "loss": loss,
                    "question": "compute-optimal training of N"})
        return out
    d = tokens_for_loss(n_params, target_loss, f)
    out.update({"reachable": d is not None, "tokens": d, "flops": None if d is None else 6.0 * n_params * d,
                "loss": target_loss, "question": "tokens to train N to the target loss"})
    return out


# =========================================================================== MFU


def mfu(tokens_per_s: float, flops_per_token_train: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (tokens/s x training FLOPs per token) over the peak."""
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    _check_nonneg(tokens_per_s=tokens_per_s, flops_per_token_train=flops_per_token_train)
    return tokens_per_s * flops_per_token_train / peak_flops


def peak_flops_for(device_name: str) -> float | None:
    """The dense bf16 peak for a device name as ``torch.cuda.get_device_name()`` writes it
    (e.g. 'NVIDIA H100 80GB HBM3'), or None when the device is not in the table."""
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_DENSE_FLOPS["H200"]
    if "H100" in name:
        if "NVL" in name:
            return None  # a different clock and power envelope: not in the table
        return PEAK_BF16_DENSE_FLOPS["H100 PCIe" if "PCIE" in name else "H100 SXM"]
    if "A100" in name:
        return PEAK_BF16_DENSE_FLOPS["A100"]
    return None
