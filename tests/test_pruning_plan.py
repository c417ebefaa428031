"""The planner: exact parameter counts from HF configs, shapes at or under a target, errors.

Published configs live in tests/fixtures/hf_configs/ (written from the published config.json
values of LLaMA-3-8B, Qwen2.5-7B and Mistral-7B-v0.1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from downscale.pruning.plan import (
    PlanError,
    Policy,
    Shape,
    arch_info,
    count_params,
    meta_param_count,
    plan,
    student_config,
)
from tiny import tiny_config

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
# Published totals (safetensors metadata of the released checkpoints).
PUBLISHED = {"llama3-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512, "mistral-7b-v0.1": 7_241_732_096}


def _hf(name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(FIXTURES / name)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_counts_and_sub_1b_plans(name):
    config = _hf(name)
    info = arch_info(config)
    assert count_params(info)["total"] == PUBLISHED[name] == meta_param_count(config)
    for depth in (False, True):
        p = plan(info, 0.95e9, policy=Policy(prune_depth=depth), rounds=1, max_cut_per_round=0.5)
        assert p.params["total"] <= 0.95e9 < 1e9
        assert p.params["total"] > 0.9e9  # the budget is used, not wasted
        if depth:
            assert p.shape.num_layers < info.base.num_layers
        else:
            assert p.shape.num_layers == info.base.num_layers
        # a model built on the meta device with the planned shape has exactly the predicted count
        assert meta_param_count(student_config(config, p.shape)) == p.params["total"]
        # iterative plan: shrinking shapes, no round cuts more than half of its input, ends at the plan
        assert p.rounds[-1] == p.shape and len(p.rounds) >= 3
        totals = [PUBLISHED[name]] + [r["total"] for r in p.round_params]
        assert all(b <= a and b >= 0.5 * a for a, b in zip(totals, totals[1:], strict=False))
        for a, b in zip([info.base, *p.rounds], p.rounds, strict=False):
            assert all(getattr(b, f) <= getattr(a, f) for f in Shape.__dataclass_fields__)


def test_qwen2_student_config_keeps_per_layer_lists_consistent():
    config = _hf("qwen2.5-7b")
    shape = Shape(1024, 2048, 8, 4, 3)
    new = student_config(config, shape, kept_layers=[0, 5, 27])
    assert new.num_hidden_layers == 3 and len(new.layer_types) == 3
    assert new.max_window_layers == 3  # every kept layer was below the old max_window_layers=28
    assert new.head_dim == 128 and new.num_key_value_heads == 4
    assert config.num_hidden_layers == 28  # the original is untouched


def test_split_policy_cuts_mlp_most_and_respects_round_to():
    info = arch_info(_hf("llama3-8b"))
    p = plan(info, 0.5, policy=Policy(round_to=64))
    base = info.base
    assert p.params["total"] <= 0.5 * PUBLISHED["llama3-8b"]
    assert p.shape.hidden_size % 64 == 0 and p.shape.intermediate_size % 64 == 0
    mlp_keep = p.shape.intermediate_size / base.intermediate_size
    assert mlp_keep < p.shape.hidden_size / base.hidden_size
    assert p.shape.num_layers == base.num_layers  # depth only with prune_depth
    assert p.shape.num_kv_heads == base.num_kv_heads  # within_groups keeps every KV group


def test_whole_groups_drops_kv_heads_and_full_attention_uses_groups():
    info = arch_info(_hf("llama3-8b"))
    p = plan(info, 0.3, policy=Policy(head_mode="whole_groups"))
    assert p.shape.num_kv_heads < 8 and p.shape.num_heads == 4 * p.shape.num_kv_heads
    mha = arch_info(tiny_config("llama", hidden=64, heads=8, kv_heads=8, intermediate=128, layers=2))
    q = plan(mha, 0.5, policy=Policy(head_mode="within_groups", heads=1.0))
    assert q.head_mode == "whole_groups" and q.shape.num_heads == q.shape.num_kv_heads < 8


def test_explicit_and_partial_shapes():
    info = arch_info(_hf("mistral-7b-v0.1"))
    full = {"hidden_size": 2048, "intermediate_size": 4096, "num_heads": 16, "num_kv_heads": 8, "num_layers": 16}
    p = plan(info, 0.01, fixed=full)  # every field set: the target is ignored
    assert p.shape == Shape(**full) and p.target is None
    part = plan(info, 0.25, fixed={"hidden_size": 2048})
    assert part.shape.hidden_size == 2048 and part.params["total"] <= 0.25 * PUBLISHED["mistral-7b-v0.1"]
    same = plan(info, None, fixed={"num_layers": 20})
    assert same.shape == Shape(4096, 14336, 32, 8, 20)
    absolute = plan(info, 3e9)
    assert 2.9e9 < absolute.params["total"] <= 3e9


@pytest.mark.parametrize("target, fixed, match", [
    (1.5e10, None, "above the base"),
    (1e6, None, "below the embeddings alone"),
    (None, {"num_heads": 6, "num_kv_heads": 4}, "impossible head ratio"),
    (None, {"num_heads": 32, "num_kv_heads": 2}, "impossible head ratio"),
    (None, {"num_kv_heads": 16}, "between 1 and the base"),
    (None, {"hidden_size": 8192}, "between 1 and the base"),
])
def test_plan_errors(target, fixed, match):
    info = arch_info(_hf("llama3-8b"))
    with pytest.raises(PlanError, match=match) as err:
        plan(info, target, fixed=fixed)
    assert err.value.field.startswith("compress.")


def test_unsupported_architecture_is_named():
    from transformers import AutoConfig

    with pytest.raises(PlanError, match="'gpt2'"):
        arch_info(AutoConfig.for_model("gpt2"))


@pytest.mark.parametrize("arch, kw", [
    ("llama", {"tied": True}), ("llama", {"tied": False, "heads": 4, "kv_heads": 4}),
    ("qwen2", {"tied": False}), ("qwen2", {"tied": True, "head_dim": 16}), ("mistral", {"tied": False}),
])
def test_tiny_counts_match_real_models(arch, kw):
    config = tiny_config(arch, **kw)
    info = arch_info(config)
    assert count_params(info)["total"] == meta_param_count(config)
    p = plan(info, 0.6, policy=Policy(prune_depth=True))
    assert p.params["total"] <= 0.6 * count_params(info)["total"]
    assert meta_param_count(student_config(config, p.shape)) == p.params["total"]


ALL_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_planner_never_yields_a_shape_the_config_class_refuses(name):
    """transformers 5.x's LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit
    head_dim: SmolLM2 (9 heads), TinyLlama and LLaMA-3 students crashed at save time. Every planned shape,
    every iterative round included, must build (on the meta device) with exactly the planned count."""
    from downscale.pruning.plan import config_refusal

    config = _hf(name)
    info = arch_info(config)
    seen = 0
    for target in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        for depth in (False, True):
            for mode in ("within_groups", "whole_groups"):
                for rounds in (1, 3):
                    try:
                        p = plan(info, target, policy=Policy(prune_depth=depth, head_mode=mode), rounds=rounds)
                    except PlanError as exc:  # allowed only when the target is out of reach, never a bad shape
                        assert exc.field == "compress.target_params", exc
                        continue
                    for shape in p.rounds:
                        assert config_refusal(config, shape) is None, (target, depth, mode, rounds, shape)
                        seen += 1
                    if target in (0.4, 0.6) and rounds == 1:
                        assert meta_param_count(student_config(config, p.shape)) == p.params["total"]
    assert seen >= 40


def test_explicit_shape_the_config_refuses_is_named_before_any_work():
    info = arch_info(_hf("smollm2-135m"))
    assert info.hidden_per_head  # probed from transformers' LlamaConfig
    with pytest.raises(PlanError, match="not a multiple of the 6 query heads") as err:
        plan(info, None, fixed={"hidden_size": 464, "num_heads": 6, "num_kv_heads": 3})
    assert err.value.field == "compress.shape.hidden_size"
    ok = plan(info, None, fixed={"hidden_size": 456, "num_heads": 6, "num_kv_heads": 3})
    assert ok.shape.hidden_size == 456
    assert not arch_info(_hf("qwen2.5-0.5b")).hidden_per_head  # Qwen2's config accepts any hidden size


def test_demo_sized_base_with_16_heads_plans_a_buildable_student():
    from downscale.pruning.plan import config_refusal

    config = tiny_config("llama", hidden=128, heads=16, kv_heads=4, intermediate=256, layers=4)
    p = plan(arch_info(config), 0.7)
    assert p.shape.hidden_size % p.shape.num_heads == 0
    assert config_refusal(config, p.shape) is None
