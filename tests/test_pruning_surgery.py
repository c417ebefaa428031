"""Surgery and importance on tiny random models: HF round trip, equivalence with masking, scores
against plain references, and the coupling against torch-pruning's DependencyGraph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from downscale.models import count_params as real_count
from downscale.models import save_causal_lm
from downscale.pruning.importance import Scores, calibration_scores, load_scores, magnitude_scores, save_scores
from downscale.pruning.plan import Policy, Shape, arch_info, plan
from downscale.pruning.structure import RULES, parse_name
from downscale.pruning.surgery import extract_student, select_units, verify_student
from tiny import tiny_model

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden=64, intermediate=96, layers=3, heads=8, kv_heads=4)


def _blocks(n=6, t=16, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, t))


CASES = [
    ("llama", dict(tied=True), "activation", "within_groups"),
    ("llama", dict(tied=False, kv_heads=8), "taylor", "within_groups"),  # full attention
    ("qwen2", dict(tied=False), "magnitude", "whole_groups"),  # q/k/v biases
    ("qwen2", dict(tied=True, head_dim=16), "activation", "whole_groups"),  # explicit head_dim != hidden/heads
    ("mistral", dict(tied=False), "taylor", "within_groups"),
    ("mistral", dict(tied=True, kv_heads=8), "magnitude", "whole_groups"),
]


@pytest.mark.parametrize("arch, kw, method, head_mode", CASES)
def test_student_round_trip(tmp_path, arch, kw, method, head_mode):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, **{**SMALL, **kw})
    info = arch_info(model.config)
    target = 0.3
    g = 1 if head_mode == "within_groups" or info.groups == 1 else info.groups
    fixed = {"hidden_size": 48, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4 // g}  # the MLP is planned
    p = plan(info, target, fixed=fixed, policy=Policy(head_mode=head_mode))
    s = p.shape
    assert s.num_heads < info.base.num_heads and s.intermediate_size < info.base.intermediate_size
    assert s.num_layers < info.base.num_layers and s.hidden_size < info.base.hidden_size
    scores = calibration_scores(model, _blocks(), method, 4, torch.device("cpu"))
    student = extract_student(model, s, select_units(scores, model.config, s), scores.norm_ms)
    verify_student(student, s)
    n = real_count(student)
    assert n == p.params["total"] <= target * p.base_params["total"]
    if kw.get("tied"):
        assert student.lm_head.weight is student.model.embed_tokens.weight
    save_causal_lm(student, tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", attn_implementation="sdpa").eval()
    c = reloaded.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (
        s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.num_layers)
    assert c.head_dim == info.head_dim and c.vocab_size == VOCAB
    if arch == "qwen2":
        assert len(c.layer_types) == s.num_layers
    for layer in reloaded.model.layers:
        assert layer.self_attn.num_key_value_groups == s.num_heads // s.num_kv_heads
    assert real_count(reloaded) == n
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(student.eval()(x).logits, reloaded(x).logits)
    # the source model is untouched
    assert real_count(model) == p.base_params["total"]


def _mask_like_keep(model, keep, shape):
    """Zero, in a copy of ``model``, exactly what ``keep`` drops (MLP channels, query heads, whole layers):
    with the hidden size unchanged the copy must compute what the student computes."""
    import copy

    masked = copy.deepcopy(model)
    c = model.config
    hd = c.head_dim
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            if i not in keep.layers:  # a dropped layer: make it the identity
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                continue
            j = keep.layers.index(i)
            drop_mlp = sorted(set(range(c.intermediate_size)) - set(keep.mlp[j].tolist()))
            layer.mlp.down_proj.weight[:, drop_mlp] = 0
            drop_heads = sorted(set(range(c.num_attention_heads)) - set(keep.heads[j].tolist()))
            for h in drop_heads:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    return masked


@pytest.mark.parametrize("arch, head_mode", [("llama", "within_groups"), ("qwen2", "whole_groups"),
                                             ("mistral", "within_groups")])
def test_surgery_equals_masking(arch, head_mode):
    model = tiny_model(arch, **SMALL)
    c = model.config
    shape = Shape(c.hidden_size, 48, 4, 2 if head_mode == "whole_groups" else 4, 2)
    scores = calibration_scores(model, _blocks(), "activation", 3, torch.device("cpu"))
    keep = select_units(scores, c, shape)
    student = extract_student(model, shape, keep, scores.norm_ms).eval()
    masked = _mask_like_keep(model, keep, shape)
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, masked(x).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(student(x).logits, model(x).logits, atol=1e-3)  # it did prune something


def test_hidden_pruning_with_norm_rescale_is_exact_on_dead_channels():
    """Hidden channels that carry nothing (zero embedding columns and zero writes into the residual)
    are the least important by activation; dropping them with the RMSNorm rescale keeps the logits."""
    model = tiny_model("llama", **{**SMALL, "tied": False})
    model.config.rms_norm_eps = 1e-30
    for mod in model.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 1e-30
    dead = [3, 17, 40, 41, 63, 5, 22, 30]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    shape = Shape(56, 96, 8, 4, 3)
    scores = calibration_scores(model, _blocks(), "activation", 3, torch.device("cpu"))
    keep = select_units(scores, model.config, shape)
    assert not set(dead) & set(keep.hidden.tolist())
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        ref = model(x).logits
        rescaled = extract_student(model, shape, keep, scores.norm_ms)(x).logits
        plain = extract_student(model, shape, keep, None)(x).logits
    torch.testing.assert_close(rescaled, ref, rtol=1e-4, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-3  # without the rescale the norms are off by sqrt(64/56)


def test_select_units_head_modes():
    L, H, KV = 1, 8, 4  # groups of two query heads: (0,1) (2,3) (4,5) (6,7)
    heads = torch.tensor([[5.0, 1.0, 0.1, 0.2, 3.0, 4.0, 0.3, 9.0]], dtype=torch.float64)
    f64 = torch.float64
    scores = Scores("activation", torch.ones(L, 16, dtype=f64), heads, torch.zeros(L, KV, dtype=f64),
                    torch.arange(32, dtype=f64), torch.ones(L, dtype=f64))
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV)
    within = select_units(scores, cfg, Shape(16, 8, 4, 4, 1))
    assert within.kv[0].tolist() == [0, 1, 2, 3] and within.heads[0].tolist() == [0, 3, 5, 7]
    whole = select_units(scores, cfg, Shape(16, 8, 4, 2, 1))  # group sums: 6, 0.3, 7, 9.3
    assert whole.kv[0].tolist() == [2, 3] and whole.heads[0].tolist() == [4, 5, 6, 7]
    assert whole.hidden.tolist() == list(range(16, 32))


def test_taylor_scores_match_a_plain_autograd_reference():
    """Hidden channels: |grad x weight| summed over the weights they own; MLP channels, query heads and layers: the
    first-order change of the loss if the unit's output were removed, token by token (|g x a| of a down_proj input
    channel, |<g, o_h>| of a head's slice of the o_proj input, |<dL/dh_out, h_out - h_in>| of a layer's update)."""
    model = tiny_model("qwen2", **{**SMALL, "tied": True})
    blocks = _blocks(4, 12)
    scores = calibration_scores(model, blocks, "taylor", 2, torch.device("cpu"))
    assert all(p.grad is None for p in model.parameters())  # every gradient was reduced and freed
    ref = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    n_layers = model.config.num_hidden_layers
    removal = torch.zeros(n_layers, dtype=torch.float64)
    mlp = torch.zeros(n_layers, model.config.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(n_layers, model.config.num_attention_heads, dtype=torch.float64)
    seen, inputs = [], {}
    for start in (0, 2):
        x = torch.as_tensor(blocks[start:start + 2])
        model.zero_grad()
        seen.clear()
        inputs.clear()

        def keep(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            out.retain_grad()
            seen.append((args[0], out))

        def keep_input(key):
            def hook(module, args):
                args[0].retain_grad()
                inputs[key] = args[0]
            return hook

        hooks = [layer.register_forward_hook(keep) for layer in model.model.layers]
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(keep_input(("mlp", i))))
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(keep_input(("heads", i))))
        logits = model(input_ids=x).logits
        for h in hooks:
            h.remove()
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        for name, p in model.named_parameters():
            ref[name] += (p.grad * p.detach()).abs()
        for i, (h_in, h_out) in enumerate(seen):  # removing layer i's update, first order, token by token
            removal[i] += (h_out.grad * (h_out - h_in).detach()).sum(-1).abs().sum().double()
            a = inputs[("mlp", i)]
            mlp[i] += (a.grad * a.detach()).abs().sum((0, 1)).double()
            o = inputs[("heads", i)]
            heads[i] += (o.grad * o.detach()).view(2, 12, 8, 8).sum(-1).abs().sum((0, 1)).double()
    torch.testing.assert_close(scores.layers, removal, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores.mlp, mlp, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores.heads, heads, rtol=1e-4, atol=1e-9)
    assert not scores.kv.any()  # KV groups are scored by their query heads
    hidden = sum(ref[f"model.layers.{i}.{w}"].sum(0) for i in range(n_layers)
                 for w in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                           "mlp.gate_proj.weight", "mlp.up_proj.weight"))
    hidden = hidden + sum(ref[f"model.layers.{i}.{w}"].sum(1) for i in range(n_layers)
                          for w in ("self_attn.o_proj.weight", "mlp.down_proj.weight"))
    hidden = hidden + sum(ref[n] for n in ref if n.endswith("layernorm.weight") or n == "model.norm.weight")
    hidden = hidden + ref["model.embed_tokens.weight"].sum(0)
    torch.testing.assert_close(scores.hidden.float(), hidden, rtol=1e-4, atol=1e-7)


def test_activation_scores_match_a_plain_reference():
    model = tiny_model("llama", **SMALL)
    blocks = _blocks(4, 12)
    scores = calibration_scores(model, blocks, "activation", 4, torch.device("cpu"))
    seen = {}
    mlp = model.model.layers[0].mlp
    h = mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(blocks), output_hidden_states=True)
    h.remove()
    torch.testing.assert_close(scores.mlp[0].float(), seen["x"].abs().mean((0, 1)), rtol=1e-5, atol=1e-7)
    hs = out.hidden_states  # embeddings, then the output of each layer
    ref = (1 - torch.nn.functional.cosine_similarity(hs[0], hs[1], dim=-1)).mean()
    torch.testing.assert_close(scores.layers[0].float(), ref, rtol=1e-5, atol=1e-6)


def test_scores_cache_round_trip(tmp_path):
    model = tiny_model("mistral", **SMALL)
    scores = magnitude_scores(model)
    scores.norm_ms = torch.rand(7, 64, dtype=torch.float64)
    save_scores(scores, tmp_path / "s.safetensors")
    back = load_scores(tmp_path / "s.safetensors")
    assert back.method == "magnitude"
    for k, v in scores.tensors().items():
        assert torch.equal(getattr(back, k), v)


def _dg_axes(model, root, handler_name) -> set[tuple[str, int]]:
    """(parameter name, axis) pairs that torch-pruning couples to pruning ``root`` (rotary patched away)."""
    import importlib

    import torch_pruning as tp

    mod = importlib.import_module(type(model).__module__)
    original = mod.apply_rotary_pos_emb
    mod.apply_rotary_pos_emb = lambda q, k, *a, **kw: (q, k)  # NOTES.md: the rotary trace hangs otherwise
    norms = [(m.weight, 0) for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    try:
        model.config.use_cache = False
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs={"input_ids": torch.randint(0, VOCAB, (1, 8))}, unwrapped_parameters=norms)
    finally:
        mod.apply_rotary_pos_emb = original
    names = {id(m): n for n, m in model.named_modules()}
    pnames = {id(p): n for n, p in model.named_parameters()}
    group = dg.get_pruning_group(root, getattr(tp, handler_name), idxs=[0, 1])
    out = set()
    for dep, _ in group:
        target = dep.target.module
        fn = dep.handler.__name__
        if isinstance(target, torch.nn.Parameter):
            out.add((pnames[id(target)], 0))
        elif isinstance(target, torch.nn.Linear):
            axis = 0 if fn == "prune_out_channels" else 1
            out.add((names[id(target)] + ".weight", axis))
            if target.bias is not None and axis == 0:
                out.add((names[id(target)] + ".bias", 0))
        elif isinstance(target, torch.nn.Embedding):
            out.add((names[id(target)] + ".weight", 1))
    return out


def _rule_axes(model, unit: str, layer: int | None = None) -> set[tuple[str, int]]:
    out = set()
    for name, _ in model.named_parameters():
        lay, leaf = parse_name(name)
        if unit in RULES[leaf] and (layer is None or lay == layer):
            out.add((name, RULES[leaf][unit]))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_coupling_agrees_with_torch_pruning_dependency_graph(arch):
    """Our hand-written coupling (structure.RULES) is what torch-pruning's DependencyGraph derives by
    tracing: every parameter with a hidden-channel axis, and the three projections of one MLP."""
    model = tiny_model(arch, **{**SMALL, "tied": False, "layers": 2})
    hidden = _dg_axes(model, model.model.embed_tokens, "prune_embedding_out_channels")
    assert hidden == _rule_axes(model, "hidden")
    mlp = _dg_axes(model, model.model.layers[1].mlp.gate_proj, "prune_linear_out_channels")
    assert mlp == _rule_axes(model, "mlp", layer=1)


def test_qwen2_sliding_window_layers_survive_depth_pruning(tmp_path):
    """Per-layer attention types follow the kept layers; the student equals the masked base and reloads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                                  sliding_window=4, max_window_layers=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    scores = magnitude_scores(model)
    scores.layers = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)  # keep layers 0 and 2
    shape = Shape(32, 48, 4, 2, 2)
    keep = select_units(scores, model.config, shape)
    assert keep.layers == [0, 2]
    student = extract_student(model, shape, keep).eval()
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert student.config.max_window_layers == 1
    x = torch.randint(0, VOCAB, (2, 12))  # longer than the window: the sliding layer really slides
    save_causal_lm(student, tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.equal(student(x).logits, reloaded(x).logits)
        torch.testing.assert_close(student(x).logits, _mask_like_keep(model, keep, shape)(x).logits,
                                   rtol=1e-4, atol=1e-5)
