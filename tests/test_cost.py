"""cost.py: parameter counts and FLOPs against real HF models, the ledger, from-scratch cost, MFU."""

from __future__ import annotations

import math

import pytest

from downscale import cost
from downscale.law import chinchilla_loss, compute_optimal

LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "tie_word_embeddings": False}


def _real_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


CASES = [
    ("llama", True, {}), ("llama", False, {}), ("qwen2", True, {}), ("qwen2", False, {}),
    ("mistral", True, {}), ("mistral", False, {}),
    ("llama", False, {"head_dim": 16, "kv_heads": 1}),  # head_dim != hidden / heads, MQA
    ("qwen2", True, {"heads": 8, "kv_heads": 8, "layers": 3}),
]


@pytest.mark.parametrize("arch, tied, kw", CASES)
def test_param_counts_match_real_models(arch, tied, kw):
    from tiny import tiny_model

    model = tiny_model(arch, tied=tied, **kw)
    counts = cost.param_counts(model.config)
    assert counts["total"] == _real_params(model)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    # the same from the config as a plain dict (a config.json)
    assert cost.param_counts(model.config.to_dict()) == counts
    # components, from the modules themselves
    layers = model.model.layers
    assert counts["attention"] == sum(p.numel() for layer in layers for p in layer.self_attn.parameters())
    assert counts["mlp"] == sum(p.numel() for layer in layers for p in layer.mlp.parameters())
    assert counts["embedding"] == model.model.embed_tokens.weight.numel()
    assert counts["head"] == (0 if tied else model.lm_head.weight.numel())


def test_llama_bias_flags():
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    cfg = tiny_config("llama", tied=False)
    cfg.attention_bias, cfg.mlp_bias = True, True
    model = AutoModelForCausalLM.from_config(cfg)
    assert cost.param_counts(cfg)["total"] == _real_params(model)


def test_llama3_8b_is_8_03b_parameters():
    counts = cost.param_counts(LLAMA3_8B)
    assert counts["total"] == 8_030_261_248
    assert counts["embedding"] + (1536 * 128256) == 4096 * 128256 + 1536 * 128256


def test_forward_flops_count_the_matmuls_of_a_real_forward():
    """2 x the multiply-adds of every nn.Linear that runs on a token, measured with forward hooks."""
    import torch

    from tiny import tiny_model

    for arch, tied in (("llama", True), ("qwen2", False), ("mistral", True)):
        model = tiny_model(arch, tied=tied)
        macs = []

        def hook(mod, inp, out, macs=macs):
            macs.append(mod.in_features * mod.out_features)

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long))
        for h in handles:
            h.remove()
        br = cost.flops_breakdown(model.config, context=1)
        assert br["attention_proj"] + br["mlp"] + br["head"] == 2 * sum(macs)


def test_attention_flops_and_causal_convention():
    ctx = 2048
    br = cost.flops_breakdown(LLAMA3_8B, ctx)
    assert br["attention_scores"] == 2 * 2 * 32 * ctx * (32 * 128)
    causal = cost.flops_breakdown(LLAMA3_8B, ctx, causal=True)
    assert causal["attention_scores"] == pytest.approx(br["attention_scores"] * (ctx + 1) / (2 * ctx))
    # matmul parameters = all parameters but the embedding lookup and norms (untied head counted)
    counts = cost.param_counts(LLAMA3_8B)
    assert br["matmul_params"] == counts["total"] - counts["embedding"] - counts["norms"]
    assert br["total"] == 2 * br["matmul_params"] + br["attention_scores"]
    # a tied model still pays for its head's matmul
    tied = dict(LLAMA3_8B, tie_word_embeddings=True)
    assert cost.flops_per_token(tied, ctx) == cost.flops_per_token(LLAMA3_8B, ctx)
    assert cost.ensemble_flops_per_token([LLAMA3_8B, tied], 128) == 2 * cost.flops_per_token(LLAMA3_8B, 128)


def test_sliding_window_caps_the_attention_span():
    mistral = dict(LLAMA3_8B, model_type="mistral", sliding_window=1024)
    assert cost.flops_breakdown(mistral, 4096)["attention_scores"] == 2 * 2 * 32 * 1024 * 4096
    assert cost.flops_breakdown(mistral, 512)["attention_scores"] == 2 * 2 * 32 * 512 * 4096
    w, t = 1024, 4096
    mean_span = (w * (w + 1) / 2 + (t - w) * w) / t
    assert cost.flops_breakdown(mistral, t, causal=True)["attention_scores"] == pytest.approx(2 * 2 * 32 * mean_span
                                                                                              * 4096)
    qwen_off = dict(LLAMA3_8B, model_type="qwen2", sliding_window=1024, use_sliding_window=False)
    assert cost.flops_breakdown(qwen_off, 4096)["attention_scores"] == 2 * 2 * 32 * 4096 * 4096


def test_training_teacher_and_energy():
    assert cost.training_flops(1e9, 2e10) == 6 * 1e9 * 2e10
    fwd = cost.flops_per_token(LLAMA3_8B, 2048)
    assert cost.training_flops(fwd, 1e6, per_token=True) == 3 * fwd * 1e6
    assert cost.teacher_flops(8e9, 1e6) == 2 * 8e9 * 1e6
    assert cost.teacher_flops(fwd, 1e6, per_token=True) == fwd * 1e6
    assert cost.energy_kwh(3600, 700, devices=8) == pytest.approx(5.6)
    assert cost.co2_kg(5.6, 400) == pytest.approx(2.24)
    with pytest.raises(ValueError):
        cost.training_flops(-1, 10)
    with pytest.raises(ValueError):
        cost.energy_kwh(float("nan"), 700)


def test_ledger_totals():
    rows = [
        cost.stage_entry("base", seconds=100.0, train_n=1e6, train_tokens=1e5),
        cost.stage_entry("specialize", seconds=50.0, train_n=5e5, train_tokens=2e5, teacher_n=1e6,
                         teacher_tokens=2e5, devices=2, student=0),
        {"stage": "evaluate", "flops": 1e12, "tokens": 3e4, "seconds": 10.0, "kwh": 0.5},
    ]
    out = cost.ledger(rows, device_watts=360.0, grid_gco2_per_kwh=500.0)
    t = out["total"]
    assert out["stages"][1]["flops"] == 6 * 5e5 * 2e5 + 2 * 1e6 * 2e5
    assert out["stages"][1]["student"] == 0  # extra keys pass through
    assert t["flops"] == pytest.approx(6 * 1e6 * 1e5 + 6 * 5e5 * 2e5 + 2 * 1e6 * 2e5 + 1e12)
    assert t["tokens"] == 1e5 + 2e5 + 3e4
    assert t["seconds"] == 160.0 and t["device_seconds"] == 100 + 2 * 50 + 10
    kwh = 100 * 360 / 3.6e6 + 2 * 50 * 360 / 3.6e6 + 0.5  # the measured kwh wins over the estimate
    assert t["kwh"] == pytest.approx(kwh)
    assert t["co2_kg"] == pytest.approx(kwh * 0.5)
    assert out["assumptions"]["device_watts"] == 360.0
    with pytest.raises(ValueError):
        cost.ledger([{"flops": 1.0}])
    with pytest.raises(ValueError):
        cost.ledger([{"stage": "x", "seconds": -1}])


def test_from_scratch_cost():
    n = 8.03e9
    out = cost.from_scratch_cost(n, 2.0, "hoffmann")
    assert out["reachable"] and chinchilla_loss(n, out["tokens"], "hoffmann") == pytest.approx(2.0)
    assert out["flops"] == pytest.approx(6 * n * out["tokens"])
    floor = out["loss_floor_for_n"]
    assert floor == pytest.approx(1.69 + 406.4 / n**0.34)
    low = cost.from_scratch_cost(n, floor - 0.01)
    assert not low["reachable"] and low["tokens"] is None and low["flops"] is None
    opt = cost.from_scratch_cost(n, None, "besiroglu")  # the budget whose optimal size is n
    assert compute_optimal(opt["flops"], "besiroglu")["n_params"] == pytest.approx(n, rel=1e-9)


def test_mfu_and_peaks():
    assert cost.mfu(1e4, 6 * 8e9, 989.4e12) == pytest.approx(1e4 * 6 * 8e9 / 989.4e12)
    assert cost.peak_flops_for("NVIDIA H100 80GB HBM3") == 989.4e12
    assert cost.peak_flops_for("NVIDIA H200") == 989.4e12
    assert cost.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert cost.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert cost.peak_flops_for("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(ValueError):
        cost.mfu(1.0, 1.0, 0.0)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="intermediate_size"):
        cost.param_counts({"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 10})
    assert math.isfinite(cost.flops_per_token(LLAMA3_8B, 1))
