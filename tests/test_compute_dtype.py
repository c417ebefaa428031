"""Inference models held in the compute dtype (models.hold_in_compute_dtype): autocast's results bit for bit.

Scoring under bf16 autocast with fp32 weights re-casts every weight on every forward; holding the Linear weights in
bf16 once must change nothing but the time: the same logits, the same summed NLL, the same ensemble scores, with
the norms, the embeddings and the output head left in fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from downscale import models
from downscale.ensemble import EnsembleModel
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = torch.bfloat16


def _ids(B: int = 3, T: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_held_weights_give_autocasts_results_exactly(arch, tied):
    ref = tiny_model(arch, seed=1, tied=tied)
    held = copy.deepcopy(ref)
    cast = models.hold_in_compute_dtype(held, BF16)
    assert cast == 7 * ref.config.num_hidden_layers  # q k v o gate up down per layer; not the head
    assert held.lm_head.weight.dtype == torch.float32 and held.model.embed_tokens.weight.dtype == torch.float32
    assert held.model.norm.weight.dtype == torch.float32
    assert held.model.layers[0].mlp.up_proj.weight.dtype == BF16
    if arch == "qwen2":  # biases go with their weights
        assert held.model.layers[0].self_attn.q_proj.bias.dtype == BF16
    ids = _ids()
    dev = torch.device("cpu")
    with torch.no_grad(), models.autocast(dev, BF16):
        a, b = ref(input_ids=ids).logits, held(input_ids=ids).logits
    assert torch.equal(a, b)
    assert models.block_nll(ref, ids, dev, BF16) == models.block_nll(held, ids, dev, BF16)


def test_nothing_changes_without_autocast_and_a_second_call_is_a_no_op():
    m = tiny_model(seed=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert models.hold_in_compute_dtype(m, None) == 0
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert models.hold_in_compute_dtype(m, BF16) > 0
    assert models.hold_in_compute_dtype(m, BF16) == 0  # already held


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean", "routed", "sparse"])
def test_an_ensemble_of_held_students_scores_as_under_autocast(mode, fast):
    refs = [tiny_model(seed=10 + i) for i in range(3)]
    held = [copy.deepcopy(r) for r in refs]
    for h in held:
        models.hold_in_compute_dtype(h, BF16)
    ids = _ids(B=2, T=24, seed=5)
    out = []
    for students in (refs, held):
        ens = EnsembleModel(students, mode=mode, fast=fast, sparse_top_k=1, sparse_prefix=6)
        with torch.no_grad(), models.autocast(torch.device("cpu"), BF16):
            out.append((ens.sum_nll(ids), ens(ids).logits))
    assert out[0][0] == out[1][0]
    assert torch.equal(out[0][1], out[1][1])
