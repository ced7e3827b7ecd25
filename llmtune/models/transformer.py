"""One decoder-only transformer for Llama 2/3/3.x, Mistral, Qwen2/2.5 and Qwen3.

Module and parameter names are the Hugging Face checkpoint names (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``), so a checkpoint loads by a name-for-name copy and LoRA targets are the names users type.

The forward pass returns the final hidden states (after the final norm); ``model.lm_head`` projects to the
vocabulary on demand, so training never materialises a ``(batch, seq, vocab)`` float32 logits tensor.

Sources: Touvron et al. 2023 (Llama); Su et al. 2021 (RoPE, rotate-half layout as in Hugging Face
checkpoints); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (SwiGLU); Ainslie et al. 2023 (GQA).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmtune.compat import is_cuda, varlen_attention
from llmtune.kernels import use_triton as _use_kernels
from llmtune.models.config import ModelConfig
from llmtune.models.decode_attention import attend_one_query as _attend_one_query
from llmtune.models.grouped_attention import grouped_causal_attention
from llmtune.models.kv_cache import KVCache
from llmtune.models.memory import checkpoint_layer, mlp_tile_rows, tiled_mlp
from llmtune.models.moe import SparseMoeBlock, collect_aux_loss
from llmtune.models.norm import rms_norm as _rms_norm_eager
from llmtune.models.spans import SegmentSpans, segment_spans


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32 and cast back.

    ``y = weight * (x / sqrt(mean(x**2, -1) + eps))``; input ``(..., dim)`` of any float dtype,
    output of the input's dtype (then multiplied by ``weight`` as Hugging Face does).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernels(x):  # CUDA + Triton + kernels on: fused forward/backward (llmtune.kernels.rmsnorm)
            from llmtune.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) \
                and not torch.compiler.is_compiling():   # the same forward, the backward written out (models/norm.py)
            return _rms_norm_eager(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``(head_dim // 2,)`` float32 of rotary embeddings, with ``rope_scaling`` applied.

    ``default``: ``theta ** (-2i/d)``. ``linear``: divided by ``factor``. ``llama3``: the Llama 3.1
    frequency-dependent scaling (low-frequency bands divided by ``factor``, high ones kept, a smooth ramp
    between ``low_freq_factor`` and ``high_freq_factor`` wavelengths of ``original_max_position_embeddings``).
    """
    d = config.head_dim
    # computed on the CPU whatever the default device (a meta tensor here would go through torch's reference
    # ops, which import torch._dynamo: 1.5 s); the caller moves it
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    sc = config.rope_scaling or {}
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old_len = float(sc.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(is_medium, smoothed, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (the Hugging Face RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


#: CPU decode steps (one query, a cache): RoPE of q and k in one rotation with tables made once per forward, and
#: under autocast each normed input cast once; both bitwise equal to the general path ([False]: for A/B benchmarks)
DECODE_SHORTCUTS = [True]
_DECODE_ROPE: list = [None]   # (cos, sin, dtype, cos', sin'): the last decode forward's tables, shared by its layers


def _decode_rope(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's RoPE tables ``(B, 1, 1, D)`` in ``dtype`` from the forward's float32 ``cos, sin``
    ``(B, 1, D)``: ``cos`` cast, and ``sin`` cast with its first half negated, so that ``roll(x, D/2) * sin'``
    equals ``rotate_half(x) * sin`` bitwise (``(-a) * b == a * (-b)`` in IEEE arithmetic). Computed by the first
    layer of a forward and reused by the others (the same ``cos`` object); recomputed inside ``torch.compile``."""
    memo = _DECODE_ROPE[0]
    if memo is not None and memo[0] is cos and memo[1] is sin and memo[2] == dtype:
        return memo[3], memo[4]
    half = cos.shape[-1] // 2
    c, s = cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)
    s = torch.cat((-s[..., :half], s[..., half:]), dim=-1)
    if not torch.compiler.is_compiling():
        _DECODE_ROPE[0] = (cos, sin, dtype, c, s)
    return c, s


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v(/o) bias and Qwen3's per-head q/k RMSNorm."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.attention_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[KVCache]) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.__dict__.get("packed_qkv")   # q|k|v as one packed product: frozen_weights_cast(pack=True)
        n, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if qkv is None else qkv(x).split((n, nk, nk), -1)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k, v = k.view(b, t, self.num_kv_heads, self.head_dim), v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if _use_kernels(q):  # fused rotation of q and k (llmtune.kernels.rope)
            from llmtune.kernels.rope import apply_rope

            q, k = apply_rope(q, k, cos, sin)
        elif cache is not None and t == 1 and q.device.type == "cpu" and DECODE_SHORTCUTS[0]:
            # a decode step: q and k in one rotation, the tables cast once per forward
            cos, sin = _decode_rope(cos, sin, q.dtype)
            qk = torch.cat((q, k), dim=1)
            qk = qk * cos + qk.roll(self.head_dim // 2, -1) * sin         # = rotate_half(qk) * sin, bitwise
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        else:
            cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, mask)                                       # (b, t, heads, head_dim)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in a checkpointed layer, a long sequence: in row tiles (the (T, intermediate) never whole)
        return tiled_mlp(self, x, tile) if (tile := mlp_tile_rows(x)) else self.swiglu(x)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """The whole MLP on ``x`` ``(..., hidden)`` at once."""
        if _use_kernels(x):  # fused silu(gate) * up (llmtune.kernels.swiglu)
            from llmtune.kernels.swiglu import swiglu

            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        gate_up = self.__dict__.get("packed_gate_up")   # one packed product: frozen_weights_cast(pack=True)
        g, u = (self.gate_proj(x), self.up_proj(x)) if gate_up is None else gate_up(x).chunk(2, -1)
        return self.down_proj(F.silu(g) * u)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        # mixture of experts (Qwen2-MoE / Qwen3-MoE): a sparse block in the layers the config names
        self.mlp = SparseMoeBlock(config) if config.is_moe_layer(layer_idx) else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        if (cache is not None and x.shape[1] == 1 and x.device.type == "cpu" and DECODE_SHORTCUTS[0]
                and torch.is_autocast_enabled("cpu")):
            # a decode step under autocast: each normed input cast once, not once per projection (the same cast
            # autocast, or a packed frozen linear, would make; a sparse MoE block keeps its own input)
            ac = torch.get_autocast_dtype("cpu")
            x = x + self.self_attn(self.input_layernorm(x).to(ac), cos, sin, mask, cache)
            h = self.post_attention_layernorm(x)
            return x + self.mlp(h.to(ac) if isinstance(self.mlp, MLP) else h)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*`` of a Hugging Face checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(batch, seq)`` int64 from an attention mask ``(batch, seq)``.

    The mask holds 0 for padding and a segment id > 0 for real tokens (1 everywhere for one sequence per
    row; 1, 2, 3, ... for packed sequences). Positions count from 0 at the first token of each segment, so
    left padding (generation), right padding and packing all give each sequence positions 0..n-1.
    Padding positions get 0.
    """
    seg = attention_mask.long()
    b, t = seg.shape
    idx = torch.arange(t, device=seg.device).expand(b, t)
    is_start = torch.ones_like(seg, dtype=torch.bool)
    is_start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return torch.where(seg > 0, idx - start, torch.zeros_like(idx))


def build_attention_mask(attention_mask: torch.Tensor, q_len: int, sliding_window: Optional[int] = None
                         ) -> torch.Tensor:
    """Boolean attention mask ``(batch, 1, q_len, kv_len)``: True where a query may attend a key.

    ``attention_mask`` is ``(batch, kv_len)`` (cached plus new tokens) with 0 for padding and a segment id
    > 0 for tokens; the queries are the last ``q_len`` positions. A query attends to keys at or before it
    in the same segment (and within ``sliding_window`` if given). Rows of padding queries may attend to
    themselves only, so no row is empty (no NaN); their outputs are meaningless and must be ignored.
    """
    seg = attention_mask.long()
    b, kv_len = seg.shape
    dev = seg.device
    q_pos = torch.arange(kv_len - q_len, kv_len, device=dev)
    k_pos = torch.arange(kv_len, device=dev)
    causal = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        causal = causal & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    q_seg = seg[:, kv_len - q_len:]
    same = (q_seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    allowed = same & causal[None]
    diag = k_pos[None, :] == q_pos[:, None]
    allowed = allowed | (diag[None] & (q_seg[:, :, None] == 0))
    return allowed[:, None]


def _notice_past_max_positions(position_ids: torch.Tensor, limit: int) -> bool:
    """One notice (returns True) when a position id reaches ``max_position_embeddings`` (the model was not
    trained there, so its outputs degrade); only called when the sequence itself is longer than the limit."""
    top = int(position_ids.max()) + 1
    if top <= limit:
        return False
    from llmtune.errors import notice

    notice(f"a sequence reaches position {top}, past the model's max_position_embeddings {limit}: outputs past it "
           "are unreliable; lower cutoff_len (training) or max_new_tokens / the prompt length (chat)")
    return True


def _band(n: int, window: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def _varlen(q, k, v, segs: SegmentSpans):
    """CUDA flash variable-length attention over tiled spans (:func:`llmtune.compat.varlen_attention`);
    None when unavailable."""
    b, h, t, d = q.shape
    qf, kf, vf = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v))
    out = varlen_attention(qf, kf, vf, segs.cu_seqlens, segs.max_len, segs.window)
    return None if out is None else out.view(b, t, h, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al., 2017) with grouped-query heads (Ainslie et al., 2023).

    Args:
        q: ``(B, H, T, D)`` queries (RoPE applied); k, v: ``(B, H_kv, L, D)`` with ``H % H_kv == 0`` and
            ``L >= T`` (cached keys first; the queries are the last ``T`` positions).
        mask: None (causal when ``T > 1``, else the one query sees every key), a boolean ``(B, 1, T, L)`` dense
            mask (True = may attend, :func:`build_attention_mask`), or :class:`SegmentSpans` (``L == T``): each
            span attends causally within itself, without any ``T x T`` mask.

    Returns: ``(B, T, H, D)`` in ``q``'s dtype (zeros at positions outside every span).

    Key/value heads are broadcast by SDPA's ``enable_gqa`` (no ``repeat_interleave`` copy) except for a dense
    mask on CUDA, where the masked fused kernel does not take grouped heads, and except without a mask on the
    CPU in bf16/fp16 up to 512 tokens, where a group's query heads run as one query
    (:func:`llmtune.models.grouped_attention.grouped_causal_attention`).
    Spans run as one causal SDPA call
    per span on contiguous copies (measured fastest on the CPU, docs/performance.md) or, on CUDA, through
    ``torch.nn.attention.varlen.varlen_attn`` when the spans tile the batch.
    """
    b, h, t, d = q.shape
    gqa = k.shape[1] != h
    if t == 1 and q.device.type == "cpu" and not isinstance(mask, SegmentSpans):
        if not torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return _attend_one_query(q, k, v, mask)
        torch.set_autocast_enabled("cpu", False)   # float32 products, not autocast's recast of the cache per call
        try:
            return _attend_one_query(q, k, v, mask)
        finally:
            torch.set_autocast_enabled("cpu", True)
    if mask is None and gqa and 1 < t == k.shape[2] <= _CPU_GROUPED_Q and q.device.type == "cpu" \
            and q.dtype in (torch.bfloat16, torch.float16):
        # a GQA group's query heads as one taller query (in chunks of positions from 768 rows): the CPU flash
        # kernel takes larger query blocks (measured faster up to 512 tokens; docs/performance.md)
        return grouped_causal_attention(q, k, v)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        return out.transpose(1, 2)
    if isinstance(mask, torch.Tensor):
        if gqa and q.device.type == "cuda":
            rep = h // k.shape[1]
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa).transpose(1, 2)
    return _SPAN_ATTENTION[0](q, k, v, mask)


_CPU_FP32_SPAN = 256
_CPU_GROUPED_Q = 512


def _span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segs: SegmentSpans) -> torch.Tensor:
    """:func:`attend` over :class:`SegmentSpans` (eager even inside a compiled layer: a Python loop over spans
    whose count and lengths change every batch would otherwise recompile; :meth:`Transformer.compile_layers`
    wraps it in ``torch.compiler.disable`` then, not at import, which would import ``torch._dynamo``: 1.2 s of
    every command's start-up)."""
    if segs.parents is not None:
        from llmtune.models.shared_prefix import prefix_span_attention

        return prefix_span_attention(q, k, v, segs, _CPU_FP32_SPAN)
    b, h, t, d = q.shape
    gqa = k.shape[1] != h
    if is_cuda(q) and segs.cu_seqlens is not None:
        try:
            out = _varlen(q, k, v, segs)
        except (RuntimeError, NotImplementedError):   # e.g. a head size or GPU the flash kernel does not take
            out = None
        if out is not None:
            return out
    if b == 1 and segs.cu_seqlens is not None:   # one packed row: split views (backward: one cat, no zero fills)
        sizes = [e - s for _, s, e in segs.spans]
        pieces = zip(*(x.split(sizes, dim=2) for x in (q, k, v)))
    else:
        pieces = ((x[row:row + 1, :, s:e] for x in (q, k, v)) for row, s, e in segs.spans)
    outs = []
    for qs, ks, vs in pieces:
        n = qs.shape[2]
        # the CPU's bf16/fp16 flash kernel is slow on short spans (backward: 3x float32's time at 51 tokens,
        # 1.7x at 128; par at 381, docs/performance.md): run spans up to _CPU_FP32_SPAN tokens in float32
        up = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and n <= _CPU_FP32_SPAN
        qs, ks, vs = (x.float() if up else x.contiguous() for x in (qs, ks, vs))
        with torch.autocast("cpu", enabled=False) if up else contextlib.nullcontext():  # autocast would recast
            if segs.window is not None and n > segs.window:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_band(n, segs.window, q.device),
                                                   enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        outs.append(o.transpose(1, 2).to(q.dtype))                                # (1, n, H, D)
    if segs.cu_seqlens is not None:                                               # spans tile (B, T): no zeros
        return torch.cat(outs, dim=1).view(b, t, h, d)
    out = q.new_zeros(b, t, h, d)
    for (row, s, e), o in zip(segs.spans, outs):
        out[row, s:e] = o[0]
    return out


_SPAN_ATTENTION = [_span_attention]   # what attend calls: compile_layers swaps in the compiler-disabled wrapper


class Transformer(nn.Module):
    """Decoder-only causal LM with Hugging Face parameter names (``model.*``, ``lm_head``).

    Args:
        config: the architecture (:class:`ModelConfig`).

    ``forward`` returns final hidden states ``(batch, seq, hidden)``; call ``model.lm_head(hidden)`` (or
    :meth:`logits`) for logits. With ``tie_word_embeddings`` the lm_head shares the embedding weight.
    """

    #: how padded/packed batches without a cache attend: "spans" (:class:`SegmentSpans`, no dense mask) or
    #: "dense" (the boolean ``(B, 1, T, T)`` mask of :func:`build_attention_mask`; the reference in tests)
    attention_masks = "spans"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config).to(torch.empty(0).device), persistent=False)
        self.gradient_checkpointing = False
        #: MoE models: the load-balancing loss of the last forward without a KV cache (llmtune.models.moe)
        self.aux_loss: Optional[torch.Tensor] = None

    # -- switches -------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each decoder layer's activations in the backward pass (less memory, ~30% more time)."""
        self.gradient_checkpointing = enable

    def compile_layers(self, dynamic: bool = True, backend: str = "inductor") -> None:
        """Regional compilation: ``torch.compile`` each decoder layer in place (``nn.Module.compile``), once,
        with a dynamic sequence length so that packed batches of new lengths do not recompile (all layers share
        one compiled code: same code object, same guards). Parameter names and state dicts are unchanged.
        The span attention stays eager (:func:`_span_attention`). ``backend``: ``torch.compile``'s."""
        if _SPAN_ATTENTION[0] is _span_attention:
            _SPAN_ATTENTION[0] = torch.compiler.disable(_span_attention)
        for layer in self.model.layers:
            layer.compile(dynamic=dynamic, backend=backend)

    def tie_weights(self) -> None:
        """Re-point ``lm_head.weight`` at the embedding weight when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # -- forward --------------------------------------------------------------------------------
    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``(batch, seq, head_dim)`` float32 for integer ``position_ids`` (batch, seq)."""
        inv = self.inv_freq
        if inv.device != position_ids.device or inv.dtype != torch.float32:
            inv = rope_inv_freq(self.config).to(position_ids.device)
            self.inv_freq = inv
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, inputs_embeds: Optional[torch.Tensor] = None, layer_hook=None,
                spans: Optional[SegmentSpans] = None):
        """Run the decoder.

        Args:
            input_ids: ``(batch, seq)`` int64 token ids.
            attention_mask: ``(batch, kv_len)`` with 0 for padding and a segment id > 0 (1 for ordinary
                batches; 1, 2, ... for packed sequences, which then never attend across segments).
                ``kv_len`` = cached length + ``seq``. ``None`` means all ones.
            position_ids: ``(batch, seq)`` int64; by default derived from ``attention_mask`` so that each
                sequence starts at 0 whatever its padding.
            past_key_values: a :class:`KVCache` to extend in place (generation), or the generation engine's
                :class:`llmtune.engine.SlotKVCache` (its ``step_mask`` is then the attention mask).
            use_cache: create a new cache if ``past_key_values`` is None.
            inputs_embeds: ``(batch, seq, hidden)`` used instead of embedding ``input_ids`` (vision-language
                models: image features placed at the image tokens). ``layer_hook(i, x) -> x``: called on the
                output of decoder layer ``i`` (Qwen3-VL's DeepStack, :mod:`llmtune.models.qwen_vl`).
            spans: the attention layout itself instead of ``attention_mask`` (no cache; ``position_ids`` given):
                shared-prompt rows (:mod:`llmtune.models.shared_prefix`).

        Returns:
            ``hidden`` ``(batch, seq, hidden_size)`` in the model's (or autocast) dtype; with a cache,
            the tuple ``(hidden, cache)``.
        """
        b, t = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(self.config.num_hidden_layers)
        past = 0 if cache is None else cache.seq_len
        if attention_mask is not None and attention_mask.shape[1] != past + t:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, expected "
                             f"cached ({past}) + new ({t}) = {past + t}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        if past + t > self.config.max_position_embeddings and not getattr(self, "_positions_noticed", False):
            self._positions_noticed = _notice_past_max_positions(position_ids, self.config.max_position_embeddings)
        needs_mask = attention_mask is not None and bool((attention_mask != 1).any())
        window = self.config.sliding_window
        if window is not None and past + t <= window:
            window = None
        mask = getattr(cache, "step_mask", None) if spans is None else spans   # engine: rows of different lengths
        if mask is None and (needs_mask or (past > 0 and t > 1) or window is not None):
            am = attention_mask if attention_mask is not None else torch.ones(
                b, past + t, dtype=torch.long, device=input_ids.device)
            if past == 0 and t > 1 and self.attention_masks == "spans":
                mask = segment_spans(am, window)                  # block-diagonal causal: no (T x T) mask
            if mask is None:
                mask = build_attention_mask(am, t, window)
        cos, sin = self.rope(position_ids)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint_layer(self, layer, x, cos, sin, mask, cache)   # llmtune.models.memory
            else:
                x = layer(x, cos, sin, mask, cache)
            x = x if layer_hook is None else layer_hook(i, x)
        x = self.model.norm(x)
        if self.config.num_experts:  # MoE: the load-balancing loss, for training (not while decoding)
            self.aux_loss = collect_aux_loss([layer.mlp for layer in self.model.layers], attention_mask,
                                             compute=cache is None)
        if cache is not None:
            return x, cache
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden)``: ``(..., hidden_size) -> (..., vocab_size)`` in the hidden dtype."""
        return self.lm_head(hidden)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Count parameters (tied weights once)."""
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n
