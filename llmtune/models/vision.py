"""The vision towers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (a ViT over temporal x spatial patches).

One :class:`VisionTower` covers the three families through :class:`VisionConfig`:

* **Qwen2-VL** (Wang et al., 2024, "Qwen2-VL", arXiv:2409.12191): patch embedding (a Conv3d over
  ``temporal_patch_size x patch_size x patch_size`` patches, computed here as one matrix product), 2-D rotary
  embeddings (the height index rotates the first half of each rotary pair block, the width index the second),
  pre-LayerNorm blocks with a QuickGELU MLP (``fc1``/``fc2``), every frame attending to itself only, and the
  patch merger: LayerNorm, then each ``2 x 2`` group of neighbouring patches concatenated and projected by a
  2-layer GELU MLP to the language model's width.
* **Qwen2.5-VL** (Bai et al., 2025, "Qwen2.5-VL Technical Report", arXiv:2502.13923): RMSNorm and a SwiGLU MLP
  (``gate_proj``/``up_proj``/``down_proj`` with biases), windowed attention (windows of ``window_size`` pixels,
  i.e. ``window_size / patch_size / merge`` merged patches a side) except in ``fullatt_block_indexes``; the
  patches are reordered window by window before the blocks and back after the merger.
* **Qwen3-VL** (Qwen team, 2025, "Qwen3-VL Technical Report", arXiv:2511.21631): a learned absolute position
  table (``pos_embed``, ``side x side``) bilinearly resampled to each image's grid (align-corners), a
  GELU-tanh MLP (``linear_fc1``/``linear_fc2``), a biased patch embedding, and DeepStack: the hidden states
  after the blocks in ``deepstack_visual_indexes`` are merged by their own mergers
  (``deepstack_merger_list``, LayerNorm after the 2x2 concatenation) and added to the language model's first
  layers' outputs at the image tokens.

Parameter names are the Hugging Face checkpoint names under ``visual.`` (``patch_embed.proj.weight``,
``blocks.0.attn.qkv.weight``, ``merger.mlp.0.weight``, ...). Input layout is the Qwen image processor's
(:mod:`llmtune.data.images`): ``pixel_values`` ``(num_patches, C * T * P * P)``, the patches of each image in
row-major order of ``2 x 2`` merge blocks, and ``grid_thw`` ``(num_images, 3)`` = (frames / T, rows, cols) in
patches.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmtune.errors import LLMTuneError
from llmtune.models.transformer import RMSNorm, rotate_half

@dataclass
class VisionConfig:
    """Hyper-parameters of a Qwen-VL vision tower (the ``vision_config`` of a Hugging Face ``config.json``).

    ``hidden_size`` is the tower's width (Qwen2-VL calls it ``embed_dim``), ``out_hidden_size`` the language
    model's width that the merger projects to (Qwen2-VL: ``vision_config.hidden_size``). ``family`` is
    ``qwen2_vl``, ``qwen2_5_vl`` or ``qwen3_vl``; the family-specific fields are ignored by the others.
    """

    family: str = "qwen2_5_vl"
    depth: int = 32
    hidden_size: int = 1280
    out_hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=list)
    tokens_per_second: float = 4.0
    num_position_embeddings: int = 0
    deepstack_visual_indexes: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_dict(cls, vc: dict[str, Any], family: str, source: str = "config.json") -> "VisionConfig":
        """From ``config.json``'s ``vision_config`` dict of a ``family`` model.

        Raises:
            LLMTuneError: a required key is missing, or an activation we do not implement.
        """
        g = vc.get
        try:
            if family == "qwen2_vl":
                width, out = vc["embed_dim"], vc["hidden_size"]
                inter = int(width * g("mlp_ratio", 4))
                act = g("hidden_act", "quick_gelu")
            else:
                width, out, inter = vc["hidden_size"], vc["out_hidden_size"], vc["intermediate_size"]
                act = g("hidden_act", "silu" if family == "qwen2_5_vl" else "gelu_pytorch_tanh")
            kw = dict(family=family, depth=int(vc["depth"]), hidden_size=int(width), out_hidden_size=int(out),
                      intermediate_size=int(inter), num_heads=int(vc["num_heads"]), hidden_act=act)
        except KeyError as e:
            raise LLMTuneError(f"{source}: vision_config is missing key {e.args[0]!r}") from None
        if act not in _ACTS:
            raise LLMTuneError(f"{source}: vision_config.hidden_act {act!r} is not supported ({', '.join(_ACTS)})")
        for key in ("in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
                    "num_position_embeddings"):
            if g(key) is not None:
                kw[key] = int(vc[key])
        rope = g("rope_parameters") or {}
        kw["rope_theta"] = float(rope.get("rope_theta") or g("rope_theta") or 10000.0)
        kw["tokens_per_second"] = float(g("tokens_per_second", 4 if family == "qwen2_5_vl" else 2))
        # absent keys: the defaults of transformers' Qwen2_5_VLVisionConfig / Qwen3VLVisionConfig
        full = g("fullatt_block_indexes", [7, 15, 23, 31] if family == "qwen2_5_vl" else [])
        deep = g("deepstack_visual_indexes", [8, 16, 24] if family == "qwen3_vl" else [])
        kw["fullatt_block_indexes"] = [int(i) for i in full or []]
        kw["deepstack_visual_indexes"] = [int(i) for i in deep or []]
        if family == "qwen3_vl":
            kw.setdefault("patch_size", 16)
            kw.setdefault("num_position_embeddings", 2304)
        return cls(**kw)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": _quick_gelu, "gelu": F.gelu, "silu": F.silu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class PatchEmbed(nn.Module):
    """``(N, C*T*P*P) -> (N, hidden)``: the Conv3d of the checkpoint (``proj.weight`` ``(E, C, T, P, P)``),
    whose kernel equals its stride, applied as one matrix product over the flattened patches."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k,
                              bias=cfg.family == "qwen3_vl")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention inside segments (frames or windows), with 2-D rotary embeddings
    applied in float32 (``qkv``, ``proj`` as in the checkpoint).

    Runs of consecutive segments of one length (the windows inside an image, the frames of same-sized images)
    go through one batched ``scaled_dot_product_attention`` call, ``(segments, heads, length, head_dim)``,
    instead of one call per segment and a concatenation; each segment still attends to itself only, so the
    result is that of a per-segment loop."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, -1)
        # q and k rotated together: (n, 2, heads, head_dim), one set of elementwise ops for both
        c, s = cos[:, None, None].float(), sin[:, None, None].float()
        qk = qkv[:, :2].float()
        qk = (qk * c + rotate_half(qk) * s).to(x.dtype)
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]                                    # (n, heads, head_dim)
        # 4-D (segments, heads, length, head_dim) inputs reach PyTorch's fused (flash) CPU/GPU kernels; 3-D ones
        # fall back to the unfused math path (n x n scores materialised, ~4x slower on the CPU)
        outs, start = [], 0
        for length, group in itertools.groupby(seqlens):
            m = len(list(group))
            end = start + m * length
            qs, ks, vs = (t[start:end].view(m, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(m * length, -1))
            start = end
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class VisionMLP(nn.Module):
    """Qwen2-VL: ``fc2(act(fc1 x))``; Qwen2.5-VL: SwiGLU ``down(act(gate x) * up x)`` with biases; Qwen3-VL:
    ``linear_fc2(act(linear_fc1 x))``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.family = cfg.family
        self.act = _ACTS[cfg.hidden_act]
        h, i = cfg.hidden_size, cfg.intermediate_size
        if cfg.family == "qwen2_vl":
            self.fc1, self.fc2 = nn.Linear(h, i), nn.Linear(i, h)
        elif cfg.family == "qwen2_5_vl":
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)
        else:
            self.linear_fc1, self.linear_fc2 = nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "qwen2_vl":
            return self.fc2(self.act(self.fc1(x)))
        if self.family == "qwen2_5_vl":
            if not torch.is_grad_enabled() and self.act is F.silu:   # frozen tower: no (n, inter) temporaries
                return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block ``x + attn(norm1 x)``, ``x + mlp(norm2 x)`` (LayerNorm, or RMSNorm in Qwen2.5-VL)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        norm = (lambda d: RMSNorm(d, 1e-6)) if cfg.family == "qwen2_5_vl" else (lambda d: nn.LayerNorm(d, 1e-6))
        self.norm1, self.norm2 = norm(cfg.hidden_size), norm(cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, seqlens, inplace: bool = False):
        """``x`` ``(n, hidden)`` -> ``(n, hidden)``; ``inplace`` (no autograd only): add the residuals into ``x``."""
        if inplace:
            x = x.add_(self.attn(self.norm1(x), cos, sin, seqlens))
            return x.add_(self.mlp(self.norm2(x)))
        x = x + self.attn(self.norm1(x), cos, sin, seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenate each ``merge x merge`` block of patches (consecutive rows of the input) and project to the
    language model's width: ``fc2(gelu(fc1(concat(norm x))))``. Qwen2/2.5-VL names ``ln_q``, ``mlp.0``,
    ``mlp.2``; Qwen3-VL ``norm``, ``linear_fc1``, ``linear_fc2`` (``postshuffle``: the norm after concatenating,
    as DeepStack's mergers do)."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool = False) -> None:
        super().__init__()
        self.qwen3 = cfg.family == "qwen3_vl"
        self.postshuffle = postshuffle
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        if self.qwen3:
            self.norm = nn.LayerNorm(self.merged if postshuffle else cfg.hidden_size, eps=1e-6)
            self.linear_fc1 = nn.Linear(self.merged, self.merged)
            self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size)
        else:
            self.ln_q = (RMSNorm(cfg.hidden_size, 1e-6) if cfg.family == "qwen2_5_vl"
                         else nn.LayerNorm(cfg.hidden_size, eps=1e-6))
            self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                     nn.Linear(self.merged, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.qwen3:
            return self.mlp(self.ln_q(x).reshape(-1, self.merged))
        x = self.norm(x.reshape(-1, self.merged)) if self.postshuffle else self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """``(num_patches, 2)`` int64 (row, column) of every patch in the processor's order: frame by frame,
    ``merge x merge`` blocks in row-major order, row-major inside a block."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        pos = torch.stack([hh.transpose(1, 2).flatten(), ww.transpose(1, 2).flatten()], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def window_index(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: ``(order, seqlens)`` where ``order`` ``(num_merged,)`` lists the merged patches
    window by window (windows of ``window x window`` merged patches in row-major order, the last ones cut by
    the grid's edge, per frame) and ``seqlens`` the patch count (x ``merge**2``) of each non-empty window."""
    order, seqlens, base = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    part = idx[f, r:r + window, c:c + window].flatten()
                    order.append(part + base)
                    seqlens.append(part.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order).to(grid_thw.device), seqlens


def _interp_matrix(n: int, side: int) -> torch.Tensor:
    """``(n, side)`` float32 weights of 1-D linear interpolation with aligned corners: target ``i`` samples the
    source at ``i * (side - 1) / (n - 1)`` (``torch.linspace(0, side - 1, n)``)."""
    src = torch.linspace(0, side - 1, n, dtype=torch.float32)
    lo = src.floor().long()
    frac = src - lo
    m = torch.zeros(n, side)
    m[torch.arange(n), lo] += 1 - frac
    m[torch.arange(n), (lo + 1).clamp(max=side - 1)] += frac
    return m


class VisionTower(nn.Module):
    """``visual.*`` of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint.

    ``forward(pixel_values, grid_thw)``: ``pixel_values`` ``(num_patches, C*T*P*P)`` float, ``grid_thw``
    ``(num_images, 3)`` int64 -> ``(features, deepstack)``: ``features`` ``(num_patches / merge**2,
    out_hidden_size)`` in the tower's dtype, one row per image token of the language model in the order of the
    images, and ``deepstack`` a list (Qwen3-VL: one per ``deepstack_visual_indexes``; else empty) of tensors
    of the same shape.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        if cfg.family == "qwen3_vl":
            self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        if cfg.deepstack_visual_indexes and cfg.family == "qwen3_vl":
            self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle=True)
                                                       for _ in cfg.deepstack_visual_indexes)
        self.gradient_checkpointing = False

    def rotary(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(num_patches, head_dim)`` float32 of the 2-D rotary embedding: rows use the inverse
        frequencies ``theta ** (-2i / (head_dim / 2))`` on the first quarter of each half, columns the second."""
        cfg = self.cfg
        d = cfg.hidden_size // cfg.num_heads // 2
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        pos = vision_position_ids(grid_thw, cfg.spatial_merge_size).float()
        freqs = (pos[..., None] * inv.to(pos.device)).flatten(1)                 # (n, 2 * d/2): rows | cols
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def absolute_positions(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Qwen3-VL: ``(num_patches, hidden)`` the ``pos_embed`` table (``side x side``) bilinearly resampled
        (align corners) to each image's ``rows x cols`` grid, repeated over frames, in merge-block order."""
        side = int(math.isqrt(self.cfg.num_position_embeddings))
        table = self.pos_embed.weight.view(side, side, -1)
        m = self.cfg.spatial_merge_size
        out = []
        for t, h, w in grid_thw.tolist():
            ah, aw = (_interp_matrix(n, side).to(table.device, table.dtype) for n in (h, w))
            pe = torch.einsum("hi,ijd,wj->hwd", ah, table, aw)
            pe = pe.view(h // m, m, w // m, m, -1).transpose(1, 2).reshape(h * w, -1)
            out.append(pe.repeat(t, 1))
        return torch.cat(out)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # a frozen tower (LLaMA-Factory's default freeze_vision_tower + freeze_multi_modal_projector) on inputs
        # without gradients: nothing to record for backward, so run it without autograd and update in place
        frozen = not pixel_values.requires_grad and not any(p.requires_grad for p in self.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self._forward(pixel_values, grid_thw)

    def _forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.cfg
        inplace = not torch.is_grad_enabled()
        grid_thw = grid_thw.long()
        n_expected = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != n_expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, image_grid_thw describes "
                             f"{n_expected}")
        x = self.patch_embed(pixel_values)
        if cfg.family == "qwen3_vl":
            x = x + self.absolute_positions(grid_thw).to(x.dtype)
        cos, sin = self.rotary(grid_thw)
        frames = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]     # each frame attends to itself
        unit = cfg.spatial_merge_size ** 2
        order = None
        if cfg.family == "qwen2_5_vl":
            win = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
            order, windows = window_index(grid_thw, cfg.spatial_merge_size, win)
            n = x.shape[0]
            x, cos, sin = (z.view(n // unit, unit, -1)[order].view(n, -1) for z in (x, cos, sin))
        deepstack = []
        for i, blk in enumerate(self.blocks):
            seqlens = windows if order is not None and i not in cfg.fullatt_block_indexes else frames
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, cos, sin, seqlens, use_reentrant=False)
            else:
                x = blk(x, cos, sin, seqlens, inplace=inplace)
            if i in cfg.deepstack_visual_indexes and cfg.family == "qwen3_vl":
                deepstack.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        out = self.merger(x)
        if order is not None:
            out = out[torch.argsort(order)]
        return out, deepstack
