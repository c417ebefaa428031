"""Parameter counting and the shape planner, from a Hugging Face config alone (no weights).

A student is described by a uniform ``Shape`` (every decoder layer identical, head_dim and the
vocabulary never pruned). ``count_params`` gives its exact parameter count by component, tied
embeddings counted once, norms and biases included; ``plan`` picks the shape at or under a
parameter target following a split policy; ``plan_rounds`` spreads the cut over iterative rounds;
``student_config`` rewrites the HF config for a shape.

The split policy: with one free scalar r in (0, 1], each prunable dimension keeps ``r ** e`` of its
size, ``e`` its exponent (``compress.split_*``). The defaults follow Minitron (Muralidharan et al.
2024, Sreenivas et al. 2024): the MLP is cut most (e = 1), hidden size and attention heads less
(e = 0.5), depth only when ``prune_depth`` is on. r is found by bisection (the count is monotone in
r after rounding), then the MLP is widened back in ``round_to`` steps while the count stays under
the target, so the budget is used.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

SUPPORTED = ("llama", "qwen2", "mistral")
COMPONENTS = ("embedding", "attention", "mlp", "norms", "head")


class PlanError(ValueError):
    """A target or shape that cannot be planned; ``field`` is the config key to fix."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Shape:
    """A uniform decoder shape."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int

    def as_dict(self) -> dict[str, int]:
        """The shape as JSON-ready field -> size."""
        return asdict(self)


@dataclass(frozen=True)
class ArchInfo:
    """What the parameter count of a supported HF config depends on."""

    model_type: str
    vocab_size: int
    head_dim: int
    tied: bool
    qkv_bias: bool  # q/k/v projections carry a bias (qwen2; llama with attention_bias)
    o_bias: bool  # o_proj carries a bias (llama with attention_bias)
    mlp_bias: bool  # gate/up/down carry biases (llama with mlp_bias)
    base: Shape
    # the HF config class refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim
    # (transformers 5.x's LlamaConfig); probed from the class itself, so a new version that drops or adds the
    # check is followed
    hidden_per_head: bool = False

    @property
    def groups(self) -> int:
        """Query heads per KV head in the base."""
        return self.base.num_heads // self.base.num_kv_heads


def arch_info(config: Any) -> ArchInfo:
    """Read an HF config of a supported family; any other ``model_type`` raises PlanError naming it."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise PlanError("base", f"unsupported architecture {model_type!r}: compress supports "
                                f"{', '.join(SUPPORTED)}")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    attention_bias = bool(getattr(config, "attention_bias", False))
    return ArchInfo(
        model_type=model_type, vocab_size=int(config.vocab_size), head_dim=head_dim,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (model_type == "llama" and attention_bias),
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=model_type == "llama" and bool(getattr(config, "mlp_bias", False)),
        base=Shape(int(config.hidden_size), int(config.intermediate_size), heads, kv, int(config.num_hidden_layers)),
        hidden_per_head=heads > 1 and _class_refuses(config, hidden_size=heads * head_dim + 1) is not None,
    )


def _class_refuses(config: Any, **changes: Any) -> str | None:
    """Why ``config``'s own class refuses a copy of it with ``changes`` (None: it accepts it)."""
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.update(changes)
    try:
        new = type(config).from_dict(d)
        validate = getattr(new, "validate", None)
        if callable(validate):
            validate()
    except Exception as exc:  # noqa: BLE001 - any refusal of the class is the answer
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return lines[-1] if lines else type(exc).__name__
    return None


def hidden_step(info: ArchInfo, num_heads: int, round_to: int) -> int:
    """The multiple a student's hidden size must be: ``round_to``, and a multiple of the query heads where the
    architecture's config class demands it."""
    return math.lcm(round_to, num_heads) if info.hidden_per_head else round_to


def config_refusal(config: Any, shape: Shape) -> str | None:
    """Why the HF config class of ``config`` would refuse a student of ``shape`` (so it could not be built,
    saved or reloaded); None if it accepts it. Cheap: builds a config object, no weights."""
    new = student_config(config, shape)
    return _class_refuses(new)


def count_params(info: ArchInfo, shape: Shape | None = None) -> dict[str, int]:
    """Exact parameter count of ``shape`` (default: the base) by component, plus ``total``."""
    s = shape or info.base
    h, q, kv = s.hidden_size, s.num_heads * info.head_dim, s.num_kv_heads * info.head_dim
    attn = h * q + 2 * h * kv + q * h
    if info.qkv_bias:
        attn += q + 2 * kv
    if info.o_bias:
        attn += h
    mlp = 3 * h * s.intermediate_size + ((2 * s.intermediate_size + h) if info.mlp_bias else 0)
    out = {
        "embedding": info.vocab_size * h,
        "attention": s.num_layers * attn,
        "mlp": s.num_layers * mlp,
        "norms": (2 * s.num_layers + 1) * h,
        "head": 0 if info.tied else info.vocab_size * h,
    }
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- the planner


@dataclass(frozen=True)
class Policy:
    """Exponents of the split policy (0: that dimension is never cut by the planner)."""

    mlp: float = 1.0
    hidden: float = 0.5
    heads: float = 0.5
    depth: float = 0.5
    prune_depth: bool = False
    round_to: int = 8
    head_mode: str = "within_groups"


@dataclass
class Plan:
    """A planned student: its shape, exact counts, and the rounds that reach it."""

    model_type: str
    head_dim: int
    base: Shape
    base_params: dict[str, int]
    target: int | None
    shape: Shape
    params: dict[str, int]
    head_mode: str
    rounds: list[Shape]
    round_params: list[dict[str, int]]

    def to_dict(self) -> dict:
        """The plan as printed by ``--plan --json`` and stored in compress.json."""
        total = self.base_params["total"]
        return {
            "model_type": self.model_type,
            "head_dim": self.head_dim,
            "head_mode": self.head_mode,
            "target_params": self.target,
            "base": {"shape": self.base.as_dict(), "params": self.base_params},
            "student": {"shape": self.shape.as_dict(), "params": self.params,
                        "fraction_of_base": round(self.params["total"] / total, 6)},
            "rounds": [{"shape": r.as_dict(), "params": p["total"], "fraction_of_base": round(p["total"] / total, 6)}
                       for r, p in zip(self.rounds, self.round_params, strict=True)],
        }


def resolve_target(target: float | None, base_total: int) -> int | None:
    """``target_params`` as an absolute count: a fraction of the base if <= 1, else itself."""
    if target is None:
        return None
    absolute = int(math.floor(target * base_total)) if target <= 1 else int(target)
    if absolute > base_total:
        raise PlanError("compress.target_params", f"target {absolute:,} parameters is above the base's "
                                                  f"{base_total:,}")
    return absolute


def _keep(base: int, frac: float, step: int, floor: int, nearest: bool = False) -> int:
    """``base * frac`` rounded down (or to the nearest, for coarse counts such as heads and layers) to a
    multiple of ``step``, at least ``floor``, at most ``base``. Monotone in ``frac``."""
    if frac >= 1:
        return base
    units = base * frac / step + (0.5 if nearest else 1e-9)
    return min(base, max(floor, int(math.floor(units)) * step))


def _heads(info: ArchInfo, frac: float, mode: str, fixed_heads: int | None, fixed_kv: int | None) -> tuple[int, int]:
    """(heads, kv_heads) kept for a keep fraction of the query heads, honouring fixed values and the mode."""
    kv0, g0 = info.base.num_kv_heads, info.groups
    if fixed_heads is not None and fixed_kv is not None:
        return fixed_heads, fixed_kv
    if fixed_kv is not None:
        g = g0 if mode == "whole_groups" else _keep(g0, frac, 1, 1, nearest=True)
        return fixed_kv * g, fixed_kv
    if fixed_heads is not None:
        if mode == "within_groups" and fixed_heads % kv0 == 0:
            return fixed_heads, kv0
        if fixed_heads % g0 == 0:
            return fixed_heads, fixed_heads // g0
        return fixed_heads, kv0  # not a valid ratio: check_shape names it
    if mode == "whole_groups" or g0 == 1:  # full attention: a query head is a whole group
        kv = _keep(kv0, frac, 1, 1, nearest=True)
        return kv * g0, kv
    g = _keep(g0, frac, 1, 1, nearest=True)
    return kv0 * g, kv0


def check_shape(info: ArchInfo, shape: Shape, field: str = "compress.shape") -> None:
    """Raise PlanError unless ``shape`` can be cut out of the base (head ratio, sizes within the base)."""
    b = info.base
    for name in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "num_layers"):
        v, top = getattr(shape, name), getattr(b, name)
        if not 1 <= v <= top:
            raise PlanError(f"{field}.{name}", f"{name} {v} must be between 1 and the base's {top}")
    if shape.num_heads % shape.num_kv_heads:
        raise PlanError(f"{field}.num_heads", f"impossible head ratio: {shape.num_heads} query heads are not a "
                                              f"multiple of {shape.num_kv_heads} KV heads")
    if info.hidden_per_head and shape.hidden_size % shape.num_heads:
        raise PlanError(f"{field}.hidden_size", f"hidden_size {shape.hidden_size} is not a multiple of the "
                                                f"{shape.num_heads} query heads: transformers' {info.model_type} "
                                                f"config refuses that, so the student could not be built or saved")
    g = shape.num_heads // shape.num_kv_heads
    if g > info.groups:
        raise PlanError(f"{field}.num_heads", f"impossible head ratio: {shape.num_heads} query heads over "
                                              f"{shape.num_kv_heads} KV heads is {g} per group, but the base has "
                                              f"only {info.groups} per group ({b.num_heads}/{b.num_kv_heads})")


def plan(info: ArchInfo, target: float | None, fixed: dict[str, int | None] | None = None,
         policy: Policy = Policy(), rounds: int = 1, max_cut_per_round: float = 1.0) -> Plan:
    """Plan a uniform student shape at or under ``target`` (fraction of the base if <= 1, else absolute).

    ``fixed`` holds explicit shape values (ShapeConfig field names; None = planned). With every field
    fixed the target is ignored; with ``target`` None the free fields keep the base size.
    """
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    b = info.base
    base_params = count_params(info)
    mode = "whole_groups" if info.groups == 1 else policy.head_mode
    all_fixed = all(n in fixed for n in Shape.__dataclass_fields__)
    goal = None if all_fixed else resolve_target(target, base_params["total"])
    depth_exp = policy.depth if policy.prune_depth else 0.0

    def shape_at(r: float) -> Shape:
        f = {"mlp": r ** policy.mlp, "hidden": r ** policy.hidden, "heads": r ** policy.heads, "depth": r ** depth_exp}
        heads, kv = _heads(info, f["heads"], mode, fixed.get("num_heads"), fixed.get("num_kv_heads"))
        step = hidden_step(info, heads, policy.round_to)
        return Shape(
            hidden_size=fixed.get("hidden_size", _keep(b.hidden_size, f["hidden"], step, step)),
            intermediate_size=fixed.get("intermediate_size",
                                        _keep(b.intermediate_size, f["mlp"], policy.round_to, policy.round_to)),
            num_heads=heads, num_kv_heads=kv,
            num_layers=fixed.get("num_layers", _keep(b.num_layers, f["depth"], 1, 1, nearest=True)),
        )

    def total(s: Shape) -> int:
        return count_params(info, s)["total"]

    if goal is None:
        shape = shape_at(1.0)
    else:
        smallest = shape_at(0.0)
        check_shape(info, smallest)
        if total(smallest) > goal:
            emb = count_params(info, smallest)
            emb_only = emb["embedding"] + emb["head"]
            what = ("the embeddings alone" if goal < emb_only else "the smallest shape this split policy reaches")
            raise PlanError("compress.target_params",
                            f"target {goal:,} parameters is below {what} ({emb_only:,} in embedding + head at hidden "
                            f"{smallest.hidden_size}; smallest student {total(smallest):,})")
        lo, hi = 0.0, 1.0
        if total(shape_at(1.0)) <= goal:
            lo = 1.0
        else:
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if total(shape_at(mid)) <= goal else (lo, mid)
        shape = shape_at(lo)
        if "intermediate_size" not in fixed and policy.mlp > 0:  # spend what rounding left on MLP width
            while shape.intermediate_size + policy.round_to <= b.intermediate_size:
                wider = replace(shape, intermediate_size=shape.intermediate_size + policy.round_to)
                if total(wider) > goal:
                    break
                shape = wider
    check_shape(info, shape)
    steps = plan_rounds(info, shape, rounds, max_cut_per_round, policy)
    return Plan(model_type=info.model_type, head_dim=info.head_dim, base=b, base_params=base_params, target=goal,
                shape=shape, params=count_params(info, shape), head_mode=mode, rounds=steps,
                round_params=[count_params(info, r) for r in steps])


def rounds_needed(base_total: int, final_total: int, rounds: int, max_cut_per_round: float) -> int:
    """At least ``rounds``, and enough that no round cuts more than ``max_cut_per_round`` of its input."""
    if final_total >= base_total or max_cut_per_round >= 1:
        return max(1, rounds)
    need = math.ceil(math.log(final_total / base_total) / math.log(1 - max_cut_per_round) - 1e-9)
    return max(rounds, need)


def plan_rounds(info: ArchInfo, final: Shape, rounds: int, max_cut_per_round: float, policy: Policy) -> list[Shape]:
    """The shapes after each round: geometric steps in parameter count from the base to ``final``,
    each planned with the same policy, made monotone (every dimension shrinks or stays), ending at
    ``final``. Rounds are added until no round cuts more than ``max_cut_per_round`` of its input."""
    base_total = count_params(info)["total"]
    final_total = count_params(info, final)["total"]
    k = rounds_needed(base_total, final_total, rounds, max_cut_per_round)
    while True:
        shapes = _round_shapes(info, final, k, policy)
        totals = [base_total] + [count_params(info, s)["total"] for s in shapes]
        worst = max(1 - b / a for a, b in zip(totals, totals[1:], strict=False))
        if worst <= max_cut_per_round + 1e-9 or k >= 4 * max(rounds, 8):
            return shapes
        k += 1


def _round_shapes(info: ArchInfo, final: Shape, k: int, policy: Policy) -> list[Shape]:
    base_total = count_params(info)["total"]
    final_total = count_params(info, final)["total"]
    shapes: list[Shape] = []
    for i in range(1, k):
        goal = base_total * (final_total / base_total) ** (i / k)
        # intermediate rounds follow the policy freely; the clamps below keep them above the final shape
        try:
            shapes.append(plan(info, float(max(goal, final_total + 1)), None, policy, rounds=1).shape)
        except PlanError:  # the free policy cannot reach this step (a fixed dimension below its floor)
            shapes.append(final)
    shapes.append(final)
    fields = ("hidden_size", "intermediate_size", "num_kv_heads", "num_layers")

    def merge(a: Shape, c: Shape, fn) -> Shape:
        vals = {f: fn(getattr(a, f), getattr(c, f)) for f in fields}
        g = fn(a.num_heads // a.num_kv_heads, c.num_heads // c.num_kv_heads)
        return Shape(vals["hidden_size"], vals["intermediate_size"], vals["num_kv_heads"] * g, vals["num_kv_heads"],
                     vals["num_layers"])

    for i in range(len(shapes) - 2, -1, -1):  # never smaller than the next round
        shapes[i] = merge(shapes[i], shapes[i + 1], max)
    prev = info.base
    for i in range(len(shapes)):  # never larger than the previous round
        shapes[i] = _buildable(info, merge(shapes[i], prev, min), prev, shapes[i + 1] if i + 1 < len(shapes) else None,
                               policy.round_to)
        prev = shapes[i]
    return shapes


def _buildable(info: ArchInfo, shape: Shape, upper: Shape, lower: Shape | None, round_to: int) -> Shape:
    """``shape`` with its hidden size moved to the nearest size between ``lower`` and ``upper`` that the
    architecture accepts with its head count (merging rounds field by field can pair a hidden size with a head
    count it does not divide); failing that, ``lower`` itself (the round then cuts nothing)."""
    if not info.hidden_per_head or shape.hidden_size % shape.num_heads == 0:
        return shape
    lo = lower.hidden_size if lower is not None else 1
    step = hidden_step(info, shape.num_heads, round_to)
    down = shape.hidden_size // step * step
    up = down + step
    for h in (down, up):
        if lo <= h <= upper.hidden_size and h >= 1:
            return replace(shape, hidden_size=h)
    return lower if lower is not None else replace(shape, hidden_size=max(step, down))


# --------------------------------------------------------------------------- HF config rewrite


def student_config(config: Any, shape: Shape, kept_layers: list[int] | None = None) -> Any:
    """A deep copy of the HF ``config`` rewritten for ``shape``: sizes, head counts, an explicit
    ``head_dim``, ``num_hidden_layers`` and per-layer lists (``layer_types``, ``max_window_layers``)
    restricted to ``kept_layers`` (default: the first ``shape.num_layers``)."""
    info = arch_info(config)
    old_layers = info.base.num_layers
    kept = list(range(shape.num_layers)) if kept_layers is None else list(kept_layers)
    if len(kept) != shape.num_layers:
        raise ValueError(f"{len(kept)} kept layers for a shape of {shape.num_layers}")
    new = copy.deepcopy(config)
    new.hidden_size = shape.hidden_size
    new.intermediate_size = shape.intermediate_size
    new.num_attention_heads = shape.num_heads
    new.num_key_value_heads = shape.num_kv_heads
    new.head_dim = info.head_dim
    new.num_hidden_layers = shape.num_layers
    layer_types = getattr(new, "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(layer_types) == old_layers:
        new.layer_types = [layer_types[i] for i in kept]
    mwl = getattr(new, "max_window_layers", None)
    if isinstance(mwl, int):
        new.max_window_layers = sum(1 for i in kept if i < mwl)
    return new


def meta_param_count(config: Any) -> int:
    """Parameters of a model built from ``config`` on the meta device (no memory), tied weights once."""
    import torch
    from transformers import AutoModelForCausalLM

    from downscale.models import count_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_params(model)
