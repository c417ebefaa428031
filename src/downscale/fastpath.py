"""The ensemble's fast path: n students of one shape run as one batched computation.

``StackedStudents`` stacks every weight of n Hugging Face LLaMA / Qwen2 / Mistral causal LMs of
one shape along a new leading dimension ([n, out, in]) and runs the decoder as batched matmuls
(``bmm``): RMSNorm, rotary position embeddings, grouped-query SDPA attention with an optional
stacked KV cache, SwiGLU MLP, and the q/k/v biases of Qwen2. It reproduces the Hugging Face
forward op for op (the same fp32 RMSNorm, the same rotary formula through the students' own
rotary module), so its logits match each student's own to fp32 rounding.

Memory: the stacked tensors *become* the students' storage (each student's parameter is re-pointed
to its slice of the stack), so the fast path costs no second copy of the weights; the students
stay usable one by one (the sequential path) and see the same numbers.

``stack_incompatibility(students)`` says why a set of students cannot be stacked (different
shapes, an unsupported architecture or attention variant); the ensemble then falls back to
running the students one after another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from downscale.models import SUPPORTED_ARCHS

# Config fields that must agree for students to share one stacked computation.
_SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "hidden_act", "attention_bias",
                 "mlp_bias", "rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings")
_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _field(config, name: str):
    value = getattr(config, name, None)
    if name == "head_dim" and value is None:
        value = config.hidden_size // config.num_attention_heads
    return value


def stack_incompatibility(students: list) -> str | None:
    """Why ``students`` cannot run as one stacked computation, or None when they can."""
    if not students:
        return "no students"
    first = students[0]
    for i, s in enumerate(students):
        cfg = s.config
        arch = getattr(cfg, "model_type", None)
        if arch not in SUPPORTED_ARCHS:
            return f"student {i}: architecture {arch!r} has no fast path"
        if cfg.hidden_act not in _ACTS:
            return f"student {i}: activation {cfg.hidden_act!r} has no fast path"
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or (arch == "mistral" and cfg.sliding_window):
            return f"student {i}: sliding-window attention has no fast path"
        for name in _SHAPE_FIELDS:
            mine, theirs = _field(cfg, name), _field(first.config, name)
            if mine != theirs:
                return f"student {i}: {name} {mine!r} differs from student 0's {theirs!r}"
        p0 = next(first.parameters())
        p = next(s.parameters())
        if p.dtype != p0.dtype or p.device != p0.device:
            return f"student {i}: dtype/device {p.dtype}/{p.device} differs from student 0's {p0.dtype}/{p0.device}"
        shapes = {k: v.shape for k, v in s.state_dict().items()}
        shapes0 = {k: v.shape for k, v in first.state_dict().items()}
        if shapes != shapes0:
            diff = sorted(set(shapes) ^ set(shapes0)) or [k for k in shapes if shapes[k] != shapes0[k]]
            return f"student {i}: weight {diff[0]} differs in shape from student 0's"
    return None


class StackedKV:
    """The fast path's KV cache: per layer, keys and values of all n students and B rows, stored as
    [n*B, Hkv, capacity, head_dim] buffers that grow by doubling (no concatenation per step)."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` [n*B, Hkv, q, hd] at the current length; return the whole keys and values."""
        start, q = self.length, k.shape[2]
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or buf_k.shape[2] < start + q:
            cap = max(start + q, 2 * (buf_k.shape[2] if buf_k is not None else 0), 16)
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None and start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.k[layer], self.v[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:start + q] = k
        buf_v[:, :, start:start + q] = v
        return buf_k[:, :, :start + q], buf_v[:, :, :start + q]

    def advance(self, q: int) -> None:
        """Mark ``q`` more positions as stored (after every layer was updated)."""
        self.length += q


class StackedStudents:
    """n students of one shape as stacked weights. Build only after ``stack_incompatibility`` said None.

    ``hidden(...)`` returns the students' final (normed) hidden states [n, B, q, d]; ``logits(h)``
    applies the stacked output heads.
    """

    def __init__(self, students: list):
        reason = stack_incompatibility(students)
        if reason is not None:
            raise ValueError(f"students cannot be stacked: {reason}")
        cfg = students[0].config
        self.n = len(students)
        self.arch = cfg.model_type
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = _field(cfg, "head_dim")
        self.eps = cfg.rms_norm_eps
        self.act = _ACTS[cfg.hidden_act]
        self.scaling = self.head_dim ** -0.5
        self.rotary = students[0].model.rotary_emb  # identical rope config in every student (checked)
        with torch.no_grad():
            bodies = [s.model for s in students]
            self.embed = _stack([b.embed_tokens.weight for b in bodies])  # [n, V, d]
            self.layers = []
            for li in range(cfg.num_hidden_layers):
                layer = {
                    "ln1": _stack([b.layers[li].input_layernorm.weight for b in bodies]),
                    "ln2": _stack([b.layers[li].post_attention_layernorm.weight for b in bodies]),
                }
                for name in _LINEARS:
                    parent = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                    mods = [getattr(getattr(b.layers[li], parent), name) for b in bodies]
                    layer[name] = _stack([m.weight for m in mods])  # [n, out, in]
                    layer[name + ".bias"] = _stack([m.bias for m in mods]) if mods[0].bias is not None else None
                self.layers.append(layer)
            self.norm = _stack([b.norm.weight for b in bodies])  # [n, d]
            heads = [s.lm_head.weight for s in students]
            tied = all(h is b.embed_tokens.weight for h, b in zip(heads, bodies, strict=True))
            self.head = self.embed if tied else _stack(heads)  # [n, V, d]

    # ------------------------------------------------------------------ pieces

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm for [n, N, d] with weights [n, d]: fp32 statistics, weight * x.to(input dtype)."""
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w[:, None, :] * h.to(dtype)

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x [n, N, in] @ w[n, out, in]^T (+ b [n, out]) -> [n, N, out]."""
        if b is None:
            return torch.bmm(x, w.transpose(1, 2))
        return torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos) + (rotated * sin)

    # ------------------------------------------------------------------ forward

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
               cache: StackedKV | None = None) -> torch.Tensor:
        """Final hidden states [n, B, q, d] of every student.

        ``input_ids``/``position_ids``: [B, q]; ``mask``: None (causal over the new tokens, no past, or
        a single new token) or a boolean [B, 1, q, S] (True = may attend) over past + new positions;
        ``cache``: the stacked KV cache, updated in place.
        """
        n, (B, q) = self.n, input_ids.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        x = self.embed[:, input_ids].reshape(n, B * q, -1)  # [n, N, d]
        cos, sin = self.rotary(x, position_ids)  # [B, q, hd]
        cos, sin = cos[None, :, None], sin[None, :, None]  # [1, B, 1, q, hd]
        past = cache.length if cache is not None else 0
        attn_mask = None
        if mask is not None:
            attn_mask = mask[None].expand(n, *mask.shape).reshape(n * B, *mask.shape[1:])
        is_causal = attn_mask is None and q > 1
        if is_causal and past:
            raise ValueError("several new tokens after a cache need an explicit mask")
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer["ln1"])
            qs = self._linear(h, layer["q_proj"], layer["q_proj.bias"]).view(n, B, q, H, hd).transpose(2, 3)
            ks = self._linear(h, layer["k_proj"], layer["k_proj.bias"]).view(n, B, q, Hkv, hd).transpose(2, 3)
            vs = self._linear(h, layer["v_proj"], layer["v_proj.bias"]).view(n * B, q, Hkv, hd).transpose(1, 2)
            qs = self._rotate(qs, cos, sin).reshape(n * B, H, q, hd)
            ks = self._rotate(ks, cos, sin).reshape(n * B, Hkv, q, hd)
            if cache is not None:
                ks, vs = cache.update(li, ks, vs)
            if H != Hkv:  # grouped-query attention: each KV head serves H / Hkv query heads
                rep = H // Hkv
                S = ks.shape[2]
                ks = ks[:, :, None].expand(n * B, Hkv, rep, S, hd).reshape(n * B, H, S, hd)
                vs = vs[:, :, None].expand(n * B, Hkv, rep, S, hd).reshape(n * B, H, S, hd)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask, is_causal=is_causal,
                                               scale=self.scaling)  # [n*B, H, q, hd]
            o = o.transpose(1, 2).reshape(n, B * q, H * hd)
            x = x + self._linear(o, layer["o_proj"], layer["o_proj.bias"])
            h = self._rms(x, layer["ln2"])
            g = self._linear(h, layer["gate_proj"], layer["gate_proj.bias"])
            u = self._linear(h, layer["up_proj"], layer["up_proj.bias"])
            x = x + self._linear(self.act(g) * u, layer["down_proj"], layer["down_proj.bias"])
        if cache is not None:
            cache.advance(q)
        return self._rms(x, self.norm).view(n, B, q, -1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output heads: h [n, N, d] -> logits [n, N, V]."""
        return torch.bmm(h, self.head.transpose(1, 2))


def _stack(params: list[torch.Tensor]) -> torch.Tensor:
    """Stack parameters [n, ...] and re-point every parameter to its slice (one copy of the weights)."""
    stacked = torch.stack([p.detach() for p in params])
    for i, p in enumerate(params):
        if p.data.data_ptr() != stacked[i].data_ptr():
            p.data = stacked[i]
    return stacked
