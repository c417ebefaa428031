"""The shape search: its grid (buildable shapes at the budget, every family), successive halving, and the
search on a tiny model equal to scoring each candidate directly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from downscale.pruning.plan import Policy, arch_info, config_refusal, count_params, plan
from downscale.pruning.search import (
    Candidate,
    SearchStudent,
    as_candidates,
    candidate_shapes,
    run_search,
    spread,
    successive_halving,
)
from tiny import tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
pytestmark = pytest.mark.usefixtures("one_thread")


def _hf(name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(FIXTURES / name)


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file()))
@pytest.mark.parametrize("target", [0.3, 0.6, 0.8])
def test_grid_shapes_are_buildable_and_use_the_budget(name, target):
    config = _hf(name)
    info = arch_info(config)
    goal = int(target * count_params(info)["total"])
    cands = candidate_shapes(info, goal, refusal=lambda s: config_refusal(config, s))
    if target >= 0.6:
        assert len(cands) >= 10
    for c in cands:
        assert c.params == count_params(info, c.shape)["total"] <= goal
        assert config_refusal(config, c.shape) is None
        # the MLP took what the budget left: one more round_to step of it would not fit
        if c.shape.intermediate_size < info.base.intermediate_size:
            wider = c.shape.__class__(**{**c.shape.as_dict(), "intermediate_size": c.shape.intermediate_size + 8})
            assert count_params(info, wider)["total"] > goal
    families = {f for c in cands for f in c.family.split("+")}
    if target >= 0.6:
        assert {"mlp", "hidden", "depth"} <= families


def test_grid_respects_fixed_fields_and_depth_switch():
    info = arch_info(_hf("smollm2-135m"))
    goal = int(0.6 * count_params(info)["total"])
    no_depth = candidate_shapes(info, goal, depth=False)
    assert no_depth and all(c.shape.num_layers == 30 for c in no_depth)
    fixed = candidate_shapes(info, goal, fixed={"num_layers": 24, "num_kv_heads": 3})
    assert fixed and all(c.shape.num_layers == 24 and c.shape.num_kv_heads == 3 for c in fixed)
    assert spread(no_depth, 5) == [no_depth[i] for i in sorted({round(i * (len(no_depth) - 1) / 4) for i in range(5)})]
    extra = as_candidates([plan(info, 0.6, policy=Policy()).shape], info, family="policy")[0]
    assert extra in spread(no_depth, 5, keep=extra) and len(spread(no_depth, 5, keep=extra)) == 5


def test_successive_halving_spends_blocks_on_the_better_half():
    info = arch_info(_hf("smollm2-135m"))
    cands = candidate_shapes(info, int(0.6 * count_params(info)["total"]))[:9]
    truth = {c.shape: i * 0.1 for i, c in enumerate(cands)}
    calls = []

    def score(c: Candidate, n: int) -> float:
        calls.append((c.shape, n))
        return truth[c.shape] + (0.25 if n == 1 and c is cands[0] else 0.0)  # noisy on one block

    best = successive_halving(cands, score, blocks=8, start_blocks=1, finalists=2)
    assert [c.shape for c in best] == [cands[0].shape, cands[1].shape]
    assert sum(1 for _, n in calls if n == 1) == 9 and sum(1 for _, n in calls if n == 8) == 2
    assert all(math.isfinite(c.loss) for c in best)


def test_search_on_a_tiny_model_equals_scoring_each_candidate_directly():
    from downscale.models import mean_nll
    from downscale.pruning.importance import calibration_scores
    from downscale.pruning.surgery import extract_student, select_units

    model = tiny_model("llama", vocab_size=64, hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2).eval()
    rng = np.random.default_rng(0)
    calib, held = rng.integers(0, 64, (8, 16)), [rng.integers(0, 64, (6, 16)), rng.integers(0, 64, (6, 16))]
    scores = [calibration_scores(model, calib, m, 4, torch.device("cpu")) for m in ("activation", "taylor")]
    info = arch_info(model.config)
    cands = candidate_shapes(info, int(0.7 * count_params(info)["total"]), round_to=4)
    assert len(cands) >= 4
    students = [SearchStudent(scores[j], held[j]) for j in range(2)]
    best = run_search(model, cands, students, blocks=6, start_blocks=6, finalists=len(cands), batch_size=4,
                      device=torch.device("cpu"), amp=None, log=lambda m: None)
    for c in best:
        direct = [mean_nll(extract_student(model, c.shape, select_units(scores[j], model.config, c.shape),
                                           scores[j].norm_ms), held[j], 4, torch.device("cpu"))[0] for j in range(2)]
        assert c.loss == pytest.approx(sum(direct) / 2, rel=1e-5)
    assert [c.loss for c in best] == sorted(c.loss for c in best)
