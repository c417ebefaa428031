"""Cutting a student of a given shape out of a model: unit selection, then slicing into a fresh HF model.

``select_units`` turns importance scores into the indices to keep: the top hidden channels, the
top layers (depth), per kept layer the top MLP channels, and GQA-aware heads: first the top KV
groups (a group's score is its query heads' scores plus its own k/v score), then inside each kept
group the top query heads, the same number in every group. So ``whole_groups`` (drop groups with
their query heads) and ``within_groups`` (drop query heads inside every group) are two corners of
the same selection, and a shape may combine them.

``extract_student`` builds the student directly: an HF model of the rewritten config is created
on the meta device and its parameters are assigned slices of the source model's tensors (same
device and dtype). The source is never modified or copied whole, so pruning n students from an
8B base on one GPU holds the base plus one student. Attention modules get their
``num_key_value_groups`` from the rewritten config by construction; a tied head is re-tied;
non-persistent buffers (rotary frequencies, identical since head_dim is kept) are copied.

Why not torch-pruning's DependencyGraph for the surgery: it prunes a model in place (so every
student would need a full copy of the base), its LLaMA tracing hangs on the rotary embedding
unless patched (NOTES.md, VainF/Torch-Pruning#527), and its GQA head pruning does nothing. For
the three layouts we support the coupling is fixed and explicit (``structure.RULES``); a test
checks it against the DependencyGraph so an upstream layout change fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from downscale.pruning.importance import Scores
from downscale.pruning.plan import Shape, student_config
from downscale.pruning.structure import RULES, norm_row, parse_name, rename_layer


@dataclass
class Keep:
    """Indices kept, in the source model's numbering (each sorted ascending)."""

    hidden: torch.Tensor  # [D']
    layers: list[int]  # kept source layers, in order
    mlp: list[torch.Tensor]  # per kept layer: [I']
    kv: list[torch.Tensor]  # per kept layer: [KV'] kept KV heads
    heads: list[torch.Tensor]  # per kept layer: [H'] kept query heads, grouped by kept KV head


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries, ascending (ties: the lower index wins, deterministic)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def select_units(scores: Scores, config, shape: Shape) -> Keep:
    """The units of ``shape`` with the highest scores (see the module docstring)."""
    n_layers, heads0, kv0 = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    g0, g = heads0 // kv0, shape.num_heads // shape.num_kv_heads
    layers = _top(scores.layers, shape.num_layers).tolist() if shape.num_layers < n_layers else list(range(n_layers))
    keep = Keep(hidden=_top(scores.hidden, shape.hidden_size), layers=layers, mlp=[], kv=[], heads=[])
    for i in layers:
        keep.mlp.append(_top(scores.mlp[i], shape.intermediate_size))
        per_head = scores.heads[i].view(kv0, g0)  # [KV, G]: query head h belongs to KV head h // G
        groups = _top(per_head.sum(1) + scores.kv[i], shape.num_kv_heads)
        keep.kv.append(groups)
        keep.heads.append(torch.cat([grp * g0 + _top(per_head[grp], g) for grp in groups.tolist()]))
    return keep


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Head indices -> the channel indices of their ``width``-wide slices."""
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def norm_rescale_factors(norm_ms: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per norm row, sqrt(mean square of the kept input channels / mean square of all of them).

    An RMSNorm divides by the RMS over the channels it sees; once channels are gone that RMS
    changes. Multiplying the weight by this factor keeps the kept outputs at their old scale (on
    average over calibration tokens)."""
    kept = norm_ms[:, hidden].mean(dim=1)
    full = norm_ms.mean(dim=1).clamp_min(1e-30)
    return (kept / full).clamp_min(1e-30).sqrt()


@torch.no_grad()
def extract_student(model, shape: Shape, keep: Keep, norm_ms: torch.Tensor | None = None, share: bool = False):
    """A new HF model of ``shape`` whose weights are the kept slices of ``model``'s (see module doc).

    ``norm_ms`` ([2L+1, D] norm input mean squares of ``model``) turns on the RMSNorm rescale when
    the hidden size shrinks. ``share``: tensors that are not cut share storage with ``model`` instead of being
    copied (for a throw-away student that is only scored, e.g. by the shape search; never train or save one)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    n_layers = config.num_hidden_layers
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    new_config = student_config(config, shape, keep.layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    src = dict(model.named_parameters(remove_duplicate=False))
    device = next(iter(src.values())).device
    hidden = keep.hidden.to(device)
    rescale = None
    if norm_ms is not None and shape.hidden_size < config.hidden_size:
        rescale = norm_rescale_factors(norm_ms, keep.hidden)
    new_index = {old: new for new, old in enumerate(keep.layers)}
    state = {}
    for name, p in src.items():
        layer, leaf = parse_name(name)
        if tied and leaf == "lm_head.weight":
            continue  # re-tied below
        if layer is not None and layer not in new_index:
            continue  # a dropped layer
        j = new_index.get(layer) if layer is not None else None
        idx = {"hidden": hidden}
        if j is not None:
            idx["mlp"] = keep.mlp[j].to(device)
            idx["heads"] = _expand(keep.heads[j], head_dim).to(device)
            idx["kv"] = _expand(keep.kv[j], head_dim).to(device)
        t = p.detach()
        for unit, axis in RULES[leaf].items():
            if t.shape[axis] != idx[unit].numel():
                t = t.index_select(axis, idx[unit])
        if rescale is not None:
            row = norm_row(name, n_layers)
            if row is not None:
                t = (t.float() * float(rescale[row])).to(p.dtype)
        if t.data_ptr() == p.data_ptr() and not share:
            t = t.clone()  # an unpruned tensor: the student must not share storage with the source
        state[name if layer is None else rename_layer(name, j)] = t.contiguous()
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(new_config, attn_implementation=config._attn_implementation,
                                                   dtype=next(iter(src.values())).dtype)
    result = student.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"student state mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if tied:
        student.lm_head.weight = student.model.embed_tokens.weight
    src_buffers = dict(model.named_buffers())
    for name, buf in list(student.named_buffers()):
        if buf.is_meta:
            parts = name.split(".")
            if len(parts) > 3 and parts[1] == "layers":
                parts[2] = str(keep.layers[int(parts[2])])
            mod_name, _, attr = name.rpartition(".")
            setattr(student.get_submodule(mod_name), attr, src_buffers[".".join(parts)].clone())
    for mod in student.modules():  # the config said so; make the in-memory modules agree explicitly
        if hasattr(mod, "num_key_value_groups"):
            mod.num_key_value_groups = shape.num_heads // shape.num_kv_heads
    student.train(model.training)
    return student


def verify_student(student, shape: Shape) -> None:
    """Every layer has the shape the config claims (raises AssertionError naming the first that does not)."""
    c = student.config
    head_dim = c.head_dim
    assert c.num_hidden_layers == shape.num_layers == len(student.model.layers)
    assert student.model.embed_tokens.weight.shape[1] == shape.hidden_size
    for i, layer in enumerate(student.model.layers):
        a, m = layer.self_attn, layer.mlp
        expect = {
            "q_proj": (shape.num_heads * head_dim, shape.hidden_size),
            "k_proj": (shape.num_kv_heads * head_dim, shape.hidden_size),
            "v_proj": (shape.num_kv_heads * head_dim, shape.hidden_size),
            "o_proj": (shape.hidden_size, shape.num_heads * head_dim),
        }
        for nm, want in expect.items():
            got = tuple(getattr(a, nm).weight.shape)
            assert got == want, f"layer {i} {nm}: {got} != {want}"
        assert tuple(m.gate_proj.weight.shape) == (shape.intermediate_size, shape.hidden_size), f"layer {i} mlp"
        assert tuple(m.down_proj.weight.shape) == (shape.hidden_size, shape.intermediate_size), f"layer {i} mlp"
        assert a.num_key_value_groups == shape.num_heads // shape.num_kv_heads
