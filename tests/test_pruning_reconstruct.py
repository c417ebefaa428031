"""The least-squares refit after a cut (pruning/reconstruct.py): the solve against an independent least-squares
fit, exact recovery of linearly dependent channels, the Gram matrices against the layers' real inputs, and a
refit student that matches the base's projections better without touching the base."""

from __future__ import annotations

import numpy as np
import torch

from downscale.pruning.importance import calibration_scores
from downscale.pruning.plan import Shape
from downscale.pruning.reconstruct import collect_grams, refit_columns, refit_student
from downscale.pruning.structure import decoder_layers
from downscale.pruning.surgery import _expand, extract_student, select_units, verify_student
from tiny import tiny_model

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden=64, intermediate=96, layers=3, heads=8, kv_heads=4)


def _inputs(n=400, d=24, seed=0) -> torch.Tensor:
    """Correlated inputs [n, d] (a random mixing of fewer latent factors plus noise), like a trained layer's."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 12, generator=g, dtype=torch.float64)
    return z @ torch.randn(12, d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, d, generator=g, dtype=torch.float64)


def test_refit_equals_an_independent_least_squares_fit():
    x = _inputs()
    w = torch.randn(10, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 11, 13, 14, 17, 20, 23])
    got = refit_columns(w, x.T @ x, keep, damp=1e-12)
    # min over W' of || X_K W'^T - X W^T ||^2, solved by lstsq: the refit's closed form must agree
    want = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    err = lambda m: float(((x[:, keep] @ m.T - x @ w.T) ** 2).sum())  # noqa: E731
    assert err(got) < 0.5 * err(w[:, keep])  # it helps on correlated inputs, by a margin
    assert got.dtype == w.dtype and got.shape == (10, len(keep))


def test_removed_channels_that_are_combinations_of_kept_ones_are_recovered_exactly():
    g = torch.Generator().manual_seed(2)
    kept = torch.randn(300, 8, generator=g, dtype=torch.float64)
    x = torch.cat([kept, kept @ torch.randn(8, 4, generator=g, dtype=torch.float64)], 1)  # 4 dependent channels
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    new = refit_columns(w, x.T @ x, torch.arange(8), damp=1e-12)
    assert torch.allclose(kept @ new.T, x @ w.T, atol=1e-8)
    # the ridge term pulls towards the plain cut as it grows
    big = refit_columns(w, x.T @ x, torch.arange(8), damp=1e6)
    assert float((big - w[:, :8]).abs().max()) < 1e-3


def test_nothing_removed_or_no_signal_gives_the_plain_cut():
    w = torch.randn(5, 7)
    assert torch.equal(refit_columns(w, torch.eye(7), torch.arange(7), 0.01), w)
    # a Gram of zeros (no token reached these channels): the solve has nothing to fit, the kept columns stay
    out = refit_columns(w, torch.zeros(7, 7), torch.tensor([1, 3, 4]), 0.01)
    assert torch.equal(out, w[:, [1, 3, 4]])


def _layer_inputs(model, blocks):
    """The inputs of every layer's down_proj and o_proj, captured independently of collect_grams."""
    seen = {}

    def grab(key):
        def hook(mod, args):
            seen.setdefault(key, []).append(args[0].detach().flatten(0, -2).double())
        return hook

    hs = []
    for i, layer in enumerate(decoder_layers(model)):
        hs.append(layer.mlp.down_proj.register_forward_pre_hook(grab(("mlp", i))))
        hs.append(layer.self_attn.o_proj.register_forward_pre_hook(grab(("attn", i))))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(blocks))
    for h in hs:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_refit_student_matches_the_base_projections_better_and_leaves_the_base_alone():
    base = tiny_model("llama", **SMALL)
    # a trained layer's channels are correlated; make some MLP channels near-copies so a cut has something to fold
    with torch.no_grad():
        for layer in decoder_layers(base):
            up, gate = layer.mlp.up_proj.weight, layer.mlp.gate_proj.weight
            up[48:] = up[:48] * 1.5 + 0.01 * torch.randn_like(up[48:])
            gate[48:] = gate[:48] + 0.01 * torch.randn_like(gate[48:])
    blocks = np.random.default_rng(0).integers(0, VOCAB, (8, 16))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    grams = collect_grams(base, blocks, batch_size=3, device=torch.device("cpu"))
    assert grams.tokens == blocks.size
    inputs = _layer_inputs(base, blocks)
    for i in range(3):  # the Gram matrices are X^T X of the real inputs
        for key, gram in (("mlp", grams.mlp[i]), ("attn", grams.attn[i])):
            x = inputs[(key, i)]
            assert torch.allclose(gram.double(), x.T @ x, rtol=1e-4, atol=1e-3)

    scores = calibration_scores(base, blocks, "activation", 4, torch.device("cpu"))
    shape = Shape(hidden_size=48, intermediate_size=40, num_heads=4, num_kv_heads=2, num_layers=2)
    keep = select_units(scores, base.config, shape)
    plain = extract_student(base, shape, keep, None, share=True)
    refit = extract_student(base, shape, keep, None, share=True)
    n = refit_student(refit, base, keep, grams, damp=0.01)
    verify_student(refit, shape)
    assert n == 2 * shape.num_layers  # a down_proj and an o_proj in every kept layer
    for k, v in base.state_dict().items():  # the student shares untouched tensors with the base: none was written
        assert torch.equal(v, before[k]), k
    head_dim = base.config.hidden_size // base.config.num_attention_heads
    for j, i in enumerate(keep.layers):
        for key, cols, src, a, b in (
                ("mlp", keep.mlp[j], decoder_layers(base)[i].mlp.down_proj,
                 decoder_layers(plain)[j].mlp.down_proj, decoder_layers(refit)[j].mlp.down_proj),
                ("attn", _expand(keep.heads[j], head_dim), decoder_layers(base)[i].self_attn.o_proj,
                 decoder_layers(plain)[j].self_attn.o_proj, decoder_layers(refit)[j].self_attn.o_proj)):
            x = inputs[(key, i)]
            target = (x @ src.weight.detach().double().T)[:, keep.hidden]  # the base on the kept hidden channels
            err_plain = float(((x[:, cols] @ a.weight.detach().double().T - target) ** 2).sum())
            err_refit = float(((x[:, cols] @ b.weight.detach().double().T - target) ** 2).sum())
            assert err_refit < err_plain, (key, j, err_refit, err_plain)
            if key == "mlp":  # the near-copied channels fold back almost entirely
                assert err_refit < 0.5 * err_plain, (j, err_refit, err_plain)
