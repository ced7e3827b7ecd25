"""One decoder-only transformer for Llama 2/3/3.x, Mistral, Qwen2/2.5 and Qwen3.

Module and parameter names are the Hugging Face checkpoint names (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``), so a checkpoint loads by a name-for-name copy and LoRA targets are the names users type.

The forward pass returns the final hidden states (after the final norm); ``model.lm_head`` projects to the
vocabulary on demand, so training never materialises a ``(batch, seq, vocab)`` float32 logits tensor.

Sources: Touvron et al. 2023 (Llama); Su et al. 2021 (RoPE, rotate-half layout as in Hugging Face
checkpoints); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (SwiGLU); Ainslie et al. 2023 (GQA).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmtune.models.config import ModelConfig


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
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
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


class KVCache:
    """Key/value cache for incremental decoding, written in place into buffers allocated once per layer.

    Each layer's buffer has shape ``(batch, num_key_value_heads, capacity, head_dim)`` in the dtype of the
    first keys written (the model's or autocast dtype); the first ``seq_len`` positions are filled.
    With ``max_len`` the capacity is ``max_len`` (allocated at the first :meth:`update`, writing past it
    raises); without, it starts at the first write's length rounded up to 256 positions and doubles when
    full (amortised copies, never one ``torch.cat`` per token). ``attention_mask`` given to later forward
    calls must cover cached plus new tokens.

    Source: the static (preallocated) KV cache of gpt-fast / ``transformers.StaticCache``, where decoding
    writes each step's keys and values into a fixed buffer instead of concatenating.
    """

    def __init__(self, num_layers: int, max_len: Optional[int] = None) -> None:
        if max_len is not None and max_len < 1:
            raise ValueError(f"KVCache: max_len must be >= 1 (got {max_len})")
        self.max_len = max_len
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers
        self.lengths = [0] * num_layers

    def __len__(self) -> int:
        return self.lengths[0]

    @property
    def seq_len(self) -> int:
        """Number of cached positions."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (batch, kv_heads, new_len, head_dim) after layer ``layer``'s cached positions.

        Returns views ``(batch, kv_heads, cached + new_len, head_dim)`` of the buffers (valid until the next
        update of this layer). Raises ValueError when a preallocated cache (``max_len``) would overflow.
        """
        start, new = self.lengths[layer], k.shape[2]
        end = start + new
        buf = self.layers[layer]
        cap = 0 if buf is None else buf[0].shape[2]
        if end > cap:
            if self.max_len is not None:
                if end > self.max_len:
                    raise ValueError(f"KVCache: {end} positions exceed the preallocated max_len {self.max_len}")
                cap = self.max_len
            else:
                cap = max(2 * cap, -(-end // 256) * 256)
            b, h, _, d = k.shape
            grown = (k.new_empty(b, h, cap, d), v.new_empty(b, h, cap, d))
            if buf is not None:
                grown[0][:, :, :start] = buf[0][:, :, :start]
                grown[1][:, :, :start] = buf[1][:, :, :start]
            buf = self.layers[layer] = grown
        buf[0][:, :, start:end] = k
        buf[1][:, :, start:end] = v
        self.lengths[layer] = end
        return buf[0][:, :, :end], buf[1][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (LongTensor) of every layer (for dropping finished sequences).

        Copies the filled positions of the kept rows into new buffers of the same capacity.
        """
        def keep(buf: torch.Tensor, filled: int) -> torch.Tensor:
            out = buf.new_empty((index.shape[0],) + tuple(buf.shape[1:]))
            out[:, :, :filled] = buf[index, :, :filled]
            return out

        self.layers = [None if kv is None else (keep(kv[0], n), keep(kv[1], n))
                       for kv, n in zip(self.layers, self.lengths)]


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
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:  # no padding: causal over a fresh sequence, or one new query that sees everything
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
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


class Transformer(nn.Module):
    """Decoder-only causal LM with Hugging Face parameter names (``model.*``, ``lm_head``).

    Args:
        config: the architecture (:class:`ModelConfig`).

    ``forward`` returns final hidden states ``(batch, seq, hidden)``; call ``model.lm_head(hidden)`` (or
    :meth:`logits`) for logits. With ``tie_word_embeddings`` the lm_head shares the embedding weight.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False

    # -- switches -------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each decoder layer's activations in the backward pass (less memory, ~30% more time)."""
        self.gradient_checkpointing = enable

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
                use_cache: bool = False):
        """Run the decoder.

        Args:
            input_ids: ``(batch, seq)`` int64 token ids.
            attention_mask: ``(batch, kv_len)`` with 0 for padding and a segment id > 0 (1 for ordinary
                batches; 1, 2, ... for packed sequences, which then never attend across segments).
                ``kv_len`` = cached length + ``seq``. ``None`` means all ones.
            position_ids: ``(batch, seq)`` int64; by default derived from ``attention_mask`` so that each
                sequence starts at 0 whatever its padding.
            past_key_values: a :class:`KVCache` to extend in place (generation).
            use_cache: create a new cache if ``past_key_values`` is None.

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
        needs_mask = attention_mask is not None and bool((attention_mask != 1).any())
        window = self.config.sliding_window
        if window is not None and past + t <= window:
            window = None
        mask = None
        if needs_mask or (past > 0 and t > 1) or window is not None:
            am = attention_mask if attention_mask is not None else torch.ones(
                b, past + t, dtype=torch.long, device=input_ids.device)
            mask = build_attention_mask(am, t, window)
        cos, sin = self.rope(position_ids)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        x = self.model.norm(x)
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
