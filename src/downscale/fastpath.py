"""The ensemble's fast path: n students of one shape run as one batched computation.

``StackedStudents`` stacks every weight of n Hugging Face LLaMA / Qwen2 / Mistral causal LMs of
one shape along a new leading dimension ([n, out, in]) and runs the decoder as batched matmuls
(``bmm``): RMSNorm, rotary position embeddings, grouped-query SDPA attention with an optional
stacked KV cache, SwiGLU MLP, and the q/k/v biases of Qwen2. It reproduces the Hugging Face
forward op for op (the same fp32 RMSNorm, the same rotary formula through the students' own
rotary module), so its logits match each student's own to fp32 rounding.

Layout: q/k/v are stacked as one [n, (H + 2 Hkv) hd, d] matrix and gate/up as one [n, 2 I, d]
(fewer, larger matmuls); the output heads as [V, n, d], so that the mean of the students' logits
(mode ``logit_mean``) is a single [N, n d] x [n d, V] matmul instead of n [N, V] logit tensors.

On a CPU the position-wise MLP runs over blocks of rows whose [n, rows, 2 I] intermediate is about
``CPU_BLOCK_BYTES`` (cache-sized); on GPUs it runs over all rows at once.

Memory: the stacked tensors *become* the students' storage (each student's parameter is re-pointed
to its slice of the stack), so the fast path costs no second copy of the weights; the students
stay usable one by one (the sequential path) and see the same numbers. The students' output heads
(and tied embeddings) are then strided views: call ``.contiguous()`` on them before saving a
student on its own. Under autocast the stacked heads are also kept cast to the autocast dtype (n V d x 2 bytes in
bf16: 4.2 GB for 8 students of d = 2048 at a 128k vocabulary), which every chunk of every call then reuses.

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
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}
# On a CPU the MLP runs over row blocks with an [n, rows, 2 I] intermediate of about this size (cache-sized).
CPU_BLOCK_BYTES = 12 * 2**20
# Devices on which a masked grouped-query attention repeats the KV heads before SDPA: on CUDA, flash attention
# takes no mask and the memory-efficient kernel no GQA, so a masked GQA call would fall back to the math kernel
# (an [n B, H, q, S] score tensor per layer); transformers repeats the heads there too. (Tests add "cpu".)
EXPAND_KV_FOR_MASK_ON: tuple[str, ...] = ("cuda",)
# On a CPU a product of few rows (decoding, a short prompt) is bound by reading the weights, and torch runs each
# entry of a bmm batch on one thread: with fewer students than threads, cores sit idle (one student's decode read
# its weights at 8.8 GB/s on 2 threads, as on 1). Products of at most SPLIT_MAX_ROWS rows split each student's
# output rows into blocks, at least SPLIT_PER_THREAD blocks per thread (see ``_out_split``): the same dot
# products, so the same numbers. Measured (2 threads, 8 layers of [2816, 512] weights): 1.9x at 1 row for one
# student, 1.3x for three; 1.1-1.3x at 64-128 rows; mixed from 256 rows on, so larger products are left whole.
SPLIT_MAX_ROWS = 128
SPLIT_PER_THREAD = 2


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
        odd = next((name for name, mod in s.named_modules()
                    if name.endswith(_PROJ) and type(mod) is not torch.nn.Linear), None)
        if odd is not None:
            return f"student {i}: {odd} is a {type(s.get_submodule(odd)).__name__}, not a plain Linear"
        p0 = next(first.parameters())
        p = next(s.parameters())
        if not p.is_floating_point():
            return f"student {i}: weights of dtype {p.dtype} have no fast path"
        if p.dtype != p0.dtype or p.device != p0.device:
            return f"student {i}: dtype/device {p.dtype}/{p.device} differs from student 0's {p0.dtype}/{p0.device}"
        shapes = {k: v.shape for k, v in s.state_dict().items()}
        shapes0 = {k: v.shape for k, v in first.state_dict().items()}
        if shapes != shapes0:
            diff = sorted(set(shapes) ^ set(shapes0)) or [k for k in shapes if shapes[k] != shapes0[k]]
            return f"student {i}: weight {diff[0]} differs in shape from student 0's"
    return None


def padded_causal_mask(mask: torch.Tensor, q: int) -> torch.Tensor:
    """The fast path's boolean attention mask [B, 1, q, S] for ``q`` new tokens after S - q past ones, from a
    padding mask [B, S] (1 = real token): causal and real keys only; a fully masked row (padding) may see every
    key (any finite output; it is never read)."""
    S = mask.shape[1]
    k_idx = torch.arange(S, device=mask.device)
    attn = k_idx[None, :] <= (S - q + torch.arange(q, device=mask.device))[:, None]  # [q, S]
    attn = attn[None, None] & mask[:, None, None, :].bool()
    return attn | ~attn.any(-1, keepdim=True)


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

    def select(self, student: int, n: int, rows: torch.Tensor) -> StackedKV:
        """A new cache with only student ``student``'s keys and values (of the ``n`` stacked) for ``rows`` of its
        batch of B (one copy of those buffers), for a sub-stack of that student alone (``StackedStudents.select``)."""
        out = StackedKV(len(self.k))
        out.length = self.length
        for li, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            if k is not None:
                B = k.shape[0] // n
                idx = rows + student * B
                out.k[li], out.v[li] = k.index_select(0, idx), v.index_select(0, idx)
        return out


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
            self.layers = []
            for li in range(cfg.num_hidden_layers):
                attn = [b.layers[li].self_attn for b in bodies]
                mlp = [b.layers[li].mlp for b in bodies]
                layer = {
                    "ln1": _stack([[b.layers[li].input_layernorm.weight for b in bodies]]),
                    "ln2": _stack([[b.layers[li].post_attention_layernorm.weight for b in bodies]]),
                    # q, k, v as one [n, (H + 2 Hkv) hd, d] matrix; gate and up as one [n, 2 I, d]
                    "qkv": _stack([[getattr(a, p).weight for a in attn] for p in ("q_proj", "k_proj", "v_proj")]),
                    "qkv.bias": _stack([[getattr(a, p).bias for a in attn] for p in ("q_proj", "k_proj", "v_proj")])
                    if attn[0].q_proj.bias is not None else None,
                    "o": _stack([[a.o_proj.weight for a in attn]]),
                    "o.bias": _stack([[a.o_proj.bias for a in attn]]) if attn[0].o_proj.bias is not None else None,
                    "gate_up": _stack([[m.gate_proj.weight for m in mlp], [m.up_proj.weight for m in mlp]]),
                    "gate_up.bias": _stack([[m.gate_proj.bias for m in mlp], [m.up_proj.bias for m in mlp]])
                    if mlp[0].gate_proj.bias is not None else None,
                    "down": _stack([[m.down_proj.weight for m in mlp]]),
                    "down.bias": _stack([[m.down_proj.bias for m in mlp]])
                    if mlp[0].down_proj.bias is not None else None,
                }
                self.layers.append(layer)
            self.norm = _stack([[b.norm.weight for b in bodies]])  # [n, d]
            heads = [s.lm_head.weight for s in students]
            embeds = [b.embed_tokens.weight for b in bodies]
            self.tied = all(h is e for h, e in zip(heads, embeds, strict=True))
            # The output heads as one [V, n, d] tensor: per-student logits are a strided bmm, and the mean
            # of the students' logits is ONE matmul [N, n d] x [n d, V] (no n-fold [N, V] logits).
            self.head_vnd = _stack_vnd(heads)
            self._head_params = heads
            self.embed = None if self.tied else _stack([embeds])  # [n, V, d]; tied: the head is the embedding
        self._head_cast: tuple[tuple, torch.Tensor] | None = None  # (key of _head, head_vnd in that dtype)
        self._selected: dict[int, tuple[tuple, StackedStudents]] = {}  # i -> (key of the head, select(i))

    def select(self, i: int) -> StackedStudents:
        """Student ``i`` alone as a stack of one, running the same lean decoder (the sparse mode decodes with the
        chosen student only). Its decoder weights are views of this stack (no copy); its output head is one
        contiguous [V, 1, d] copy, because a product with its strided view of the [V, n, d] stack ran 2.8x slower
        per decoded token (hidden 256, V = 8192, 2 CPU threads). The copy is made once and kept (every ``generate``
        call of the sparse mode selects again; at SmolLM2's V = 49,152 x 456 it is 90 MB): made again when the head
        changed in place (through the stack or the student's own parameter). For inference."""
        key = (self.head_vnd._version, self._head_params[i]._version)
        kept = self._selected.get(i)
        if kept is not None and kept[0] == key:
            return kept[1]
        one = object.__new__(StackedStudents)
        one.__dict__.update(self.__dict__)
        one.n = 1
        one.layers = [{k: (v[i:i + 1] if v is not None else None) for k, v in layer.items()} for layer in self.layers]
        one.norm = self.norm[i:i + 1]
        one.head_vnd = self.head_vnd[:, i:i + 1].contiguous()
        one._head_params = [self._head_params[i]]
        one.embed = None if self.embed is None else self.embed[i:i + 1]
        one._head_cast = None
        one._selected = {}
        self._selected[i] = (key, one)
        return one

    # ------------------------------------------------------------------ pieces

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm for [n, N, d] with weights [n, d]: fp32 statistics, weight * x.to(input dtype)."""
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(self.eps))  # a new tensor: in place from here
        return h.to(dtype).mul_(w[:, None, :]) if dtype == torch.float32 else w[:, None, :] * h.to(dtype)

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x [n, N, in] @ w[n, out, in]^T (+ b [n, out]) -> [n, N, out]."""
        n, N, _ = x.shape
        s = _out_split(x, w)
        if s > 1:  # each student's output rows as s blocks: n s batch entries for the threads to share
            out = w.shape[1]
            xs = x[:, None].expand(n, s, N, x.shape[-1]).reshape(n * s, N, x.shape[-1])
            ws = w.view(n * s, out // s, w.shape[-1]).transpose(1, 2)
            y = torch.bmm(xs, ws) if b is None else torch.baddbmm(b.reshape(n * s, 1, out // s), xs, ws)
            return y.view(n, s, N, out // s).transpose(1, 2).reshape(n, N, out)
        if b is None:
            return torch.bmm(x, w.transpose(1, 2))
        return torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding, bit-identical to HF's (x * cos) + (rotate_half(x) * sin) without the cat:
        first half x1 c - x2 s, second half x2 c + x1 s. ``x`` [n, B, q, heads, hd] (a view)."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = x * cos
        out[..., :half] -= x2 * sin[..., :half]
        out[..., half:] += x1 * sin[..., half:]
        return out

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
        if self.tied:
            x = self.head_vnd[input_ids].permute(2, 0, 1, 3).reshape(n, B * q, -1)  # [n, N, d]
        else:
            x = self.embed[:, input_ids].reshape(n, B * q, -1)
        cos, sin = self.rotary(x, position_ids)  # [B, q, hd]
        cos, sin = cos[None, :, :, None], sin[None, :, :, None]  # [1, B, q, 1, hd]
        past = cache.length if cache is not None else 0
        attn_mask = None
        if mask is not None:
            attn_mask = mask[None].expand(n, *mask.shape).reshape(n * B, *mask.shape[1:])
        is_causal = attn_mask is None and q > 1
        if is_causal and past:
            raise ValueError("several new tokens after a cache need an explicit mask")
        width = self.layers[0]["gate_up"].shape[1]
        rows = B * q if x.device.type != "cpu" else max(16, CPU_BLOCK_BYTES // (n * width * x.element_size()))
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer["ln1"])
            qkv = self._linear(h, layer["qkv"], layer["qkv.bias"]).view(n, B, q, H + 2 * Hkv, hd)
            qs = self._rotate(qkv[:, :, :, :H], cos, sin).reshape(n * B, q, H, hd).transpose(1, 2)
            ks = self._rotate(qkv[:, :, :, H:H + Hkv], cos, sin).reshape(n * B, q, Hkv, hd).transpose(1, 2)
            vs = qkv[:, :, :, H + Hkv:].reshape(n * B, q, Hkv, hd).transpose(1, 2)  # [n*B, Hkv, q, hd]
            if cache is not None:
                ks, vs = cache.update(li, ks, vs)
            # grouped-query attention (H / Hkv query heads per KV head) inside SDPA, as transformers does
            gqa = H != Hkv
            if gqa and attn_mask is not None and ks.device.type in EXPAND_KV_FOR_MASK_ON:
                ks, vs = ks.repeat_interleave(H // Hkv, dim=1), vs.repeat_interleave(H // Hkv, dim=1)
                gqa = False
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask, is_causal=is_causal,
                                               scale=self.scaling, enable_gqa=gqa)  # [n*B, H, q, hd]
            o = o.transpose(1, 2).reshape(n, B * q, H * hd)
            x = x + self._linear(o, layer["o"], layer["o.bias"])  # x is now this function's own: in place below
            # the MLP is position-wise: on a CPU it runs over row blocks whose [n, rows, 2 I] intermediate
            # stays cache-sized (measured 1.2x faster per FLOP than one [n, B q, 2 I] matmul); on GPUs, whole
            for r0 in range(0, B * q, rows):
                xs = x[:, r0:r0 + rows]
                h = self._rms(xs, layer["ln2"])
                g, u = self._linear(h, layer["gate_up"], layer["gate_up.bias"]).chunk(2, dim=-1)
                xs.add_(self._linear(self.act(g).mul_(u), layer["down"], layer["down.bias"]))
        if cache is not None:
            cache.advance(q)
        return self._rms(x, self.norm).view(n, B, q, -1)

    def _head(self, device_type: str) -> torch.Tensor:
        """The stacked heads [V, n, d] in the dtype autocast would cast them to, cast once and kept (while the heads
        are unchanged): autocast caches casts of parameters only, and this stack is not one, so each chunk's
        product would otherwise copy every student's head again (at a 128k vocabulary, GBs per chunk)."""
        if not torch.is_autocast_enabled(device_type):
            return self.head_vnd
        dtype = torch.get_autocast_dtype(device_type)
        if dtype == self.head_vnd.dtype or not self.head_vnd.is_floating_point():
            return self.head_vnd
        # in-place changes through the stack or through a student's own head parameter (its version counter is the
        # parameter's, not the stack's) both make a new cast
        key = (dtype, self.head_vnd._version, tuple(p._version for p in self._head_params))
        if self._head_cast is None or self._head_cast[0] != key:
            self._head_cast = (key, self.head_vnd.to(dtype))
        return self._head_cast[1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Each student's logits: h [n, N, d] -> [n, N, V]."""
        return self._linear(h, self._head(h.device.type).transpose(0, 1), None)

    def mean_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The mean of the students' logits, h [n, N, d] -> [N, V], as one matmul over the concatenated
        hidden states: sum_i h_i W_i^T = [h_1 .. h_n] [W_1 .. W_n]^T."""
        n, N, d = h.shape
        heads = self._head(h.device.type).view(1, -1, n * d)  # [1, V, n d]
        return self._linear(h.transpose(0, 1).reshape(1, N, n * d), heads, None)[0] / n


def _out_split(x: torch.Tensor, w: torch.Tensor) -> int:
    """How many blocks of output rows ``StackedStudents._linear`` should split each student's w [n, out, in] into:
    1 (no split) off the CPU, above ``SPLIT_MAX_ROWS`` rows, with n >= SPLIT_PER_THREAD x threads already, or
    when the stack cannot be viewed as [n s, out / s, in] (the [V, n, d] heads of several students)."""
    n, out = w.shape[0], w.shape[1]
    want = SPLIT_PER_THREAD * torch.get_num_threads()
    if x.device.type != "cpu" or x.shape[1] > SPLIT_MAX_ROWS or n >= want or w.stride(-1) != 1:
        return 1
    if n > 1 and w.stride(0) != out * w.stride(1):
        return 1
    s = -(-want // n)
    while s > 1 and out % s:
        s -= 1
    return s


def _repoint(params: list[torch.Tensor], views: list[torch.Tensor]) -> None:
    """Make every parameter use its view of the stacked storage (one copy of the weights in memory)."""
    for p, v in zip(params, views, strict=True):
        if p.data.data_ptr() != v.data_ptr() or p.data.stride() != v.stride():
            p.data = v


def _stack(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """Stack per-student parameters: groups [[p_0 .. p_{n-1}] per part] -> [n, sum of part rows, ...]
    (parts concatenated along dim 1, e.g. q | k | v); each parameter is re-pointed to its slice."""
    stacked = torch.cat([torch.stack([p.detach() for p in g]) for g in groups], dim=1)
    row = 0
    for g in groups:
        size = g[0].shape[0]
        _repoint(g, [stacked[i, row:row + size] for i in range(len(g))])
        row += size
    return stacked


def _stack_vnd(params: list[torch.Tensor]) -> torch.Tensor:
    """Stack [V, d] parameters as [V, n, d]; parameter i becomes the strided view [:, i]."""
    stacked = torch.stack([p.detach() for p in params], dim=1)
    _repoint(params, [stacked[:, i] for i in range(len(params))])
    return stacked
