"""Which axis of which parameter belongs to which prunable unit, for the LLaMA family layout.

LLaMA, Qwen2 and Mistral in transformers share one module layout (``model.embed_tokens``,
``model.layers.<i>.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm,
post_attention_layernorm}``, ``model.norm``, ``lm_head``). ``RULES`` maps each parameter to the
axes that a unit cuts: ``hidden`` (the residual width), ``heads`` (query heads; ``head_dim`` rows
or columns each), ``kv`` (KV heads) and ``mlp`` (MLP channels). Surgery slices along these axes
and the weight-based importance scores reduce along them, so the two can never disagree. A test
checks the hidden and MLP couplings against torch-pruning's DependencyGraph.
"""

from __future__ import annotations

# leaf name ("<module>.<param>") -> {unit: axis}
RULES: dict[str, dict[str, int]] = {
    "embed_tokens.weight": {"hidden": 1},
    "lm_head.weight": {"hidden": 1},
    "norm.weight": {"hidden": 0},
    "input_layernorm.weight": {"hidden": 0},
    "post_attention_layernorm.weight": {"hidden": 0},
    "q_proj.weight": {"heads": 0, "hidden": 1},
    "q_proj.bias": {"heads": 0},
    "k_proj.weight": {"kv": 0, "hidden": 1},
    "k_proj.bias": {"kv": 0},
    "v_proj.weight": {"kv": 0, "hidden": 1},
    "v_proj.bias": {"kv": 0},
    "o_proj.weight": {"hidden": 0, "heads": 1},
    "o_proj.bias": {"hidden": 0},
    "gate_proj.weight": {"mlp": 0, "hidden": 1},
    "gate_proj.bias": {"mlp": 0},
    "up_proj.weight": {"mlp": 0, "hidden": 1},
    "up_proj.bias": {"mlp": 0},
    "down_proj.weight": {"hidden": 0, "mlp": 1},
    "down_proj.bias": {"hidden": 0},
}


def parse_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> (3, 'q_proj.weight'); ``lm_head.weight`` -> (None, ...).

    Raises ValueError for a parameter outside the known layout (a new architecture variant must fail
    loudly rather than be pruned half-way)."""
    parts = name.split(".")
    leaf = ".".join(parts[-2:])
    if leaf not in RULES:
        raise ValueError(f"parameter {name!r} is not part of the LLaMA/Qwen2/Mistral layout compress knows")
    layer = int(parts[2]) if len(parts) > 3 and parts[1] == "layers" else None
    return layer, leaf


def rename_layer(name: str, new_index: int) -> str:
    """``model.layers.<old>.rest`` -> ``model.layers.<new_index>.rest``."""
    parts = name.split(".")
    parts[2] = str(new_index)
    return ".".join(parts)


def norm_row(name: str, num_layers: int) -> int | None:
    """Row of a norm's input statistics: 2i (input_layernorm of layer i), 2i+1 (post-attention), 2L (final)."""
    layer, leaf = parse_name(name)
    if leaf == "norm.weight":
        return 2 * num_layers
    if leaf == "input_layernorm.weight":
        return 2 * layer
    if leaf == "post_attention_layernorm.weight":
        return 2 * layer + 1
    return None


def decoder_layers(model):
    """The ModuleList of decoder layers of a supported causal LM."""
    return model.model.layers


def norm_modules(model) -> list:
    """Every RMSNorm in row order of ``norm_row``: (input, post-attention) per layer, then the final norm."""
    out = []
    for layer in decoder_layers(model):
        out += [layer.input_layernorm, layer.post_attention_layernorm]
    return out + [model.model.norm]
