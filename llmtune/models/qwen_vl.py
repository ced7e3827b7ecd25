"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the vision tower (:mod:`llmtune.models.vision`) feeding llmtune's
:class:`~llmtune.models.transformer.Transformer` through multimodal RoPE.

* **Image tokens.** The prompt holds ``<|vision_start|>``, then one ``<|image_pad|>`` (``image_token_id``) per
  merged patch (``t * h * w / merge**2`` of them), then ``<|vision_end|>``; the tower's features replace the
  embeddings of the pad tokens, image after image in batch order (videos alike with ``video_token_id``).
* **M-RoPE** (Qwen2-VL paper, section 2.1, "Multimodal Rotary Position Embedding"): each token has three
  position ids (temporal, height, width). Text tokens have the same id in all three, counting on from the
  last position; an image's tokens get ``(start + t * interval, start + row, start + col)`` over its merged
  grid, and the text after it starts at ``start + max(rows, cols)``. The rotary frequencies are split in
  ``mrope_section`` (e.g. ``[16, 24, 24]`` of the 64 frequencies of a 128-wide head) and each part rotates by
  one of the three ids (Qwen2/2.5-VL); Qwen3-VL interleaves them (frequency ``i`` uses the height id when
  ``i % 3 == 1`` and ``i < 3 * section[1]``, the width id when ``i % 3 == 2`` and ``i < 3 * section[2]``, else
  the temporal id). For text-only rows all three ids are equal and M-RoPE is plain RoPE.
* **DeepStack** (Qwen3-VL): the tower's intermediate features are added to the hidden states at the image
  tokens after the first ``len(deepstack_visual_indexes)`` decoder layers.

Parameter names: ``visual.*``, ``model.*`` (the language model, as a text checkpoint) and ``lm_head.weight``,
the layout of the published Qwen2-VL / Qwen2.5-VL checkpoints and of transformers' ``save_pretrained``;
:func:`native_name` maps the other layout (``model.visual.*``, ``model.language_model.*``: Qwen3-VL's files and
transformers' in-memory modules) onto it.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Optional, Sequence

import torch

from llmtune.errors import LLMTuneError
from llmtune.models.config import ModelConfig
from llmtune.models.transformer import KVCache, Transformer, positions_from_mask, rope_inv_freq
from llmtune.models.vision import VisionConfig, VisionTower


def native_name(name: str) -> str:
    """A checkpoint tensor name in llmtune's layout: ``model.language_model.X`` -> ``model.X``,
    ``model.visual.X`` -> ``visual.X``; other names unchanged."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def hf_module_name(name: str) -> str:
    """A module or tensor name in transformers' in-memory layout of the Qwen-VL classes (the names peft sees
    and writes in ``adapter_model.safetensors``): ``visual.X`` -> ``model.visual.X``, ``model.X`` ->
    ``model.language_model.X``; ``lm_head`` and names already in that layout unchanged. The inverse of
    :func:`native_name`."""
    if name.startswith(("model.language_model.", "model.visual.")):
        return name
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def _segments(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of equal nonzero ids of a ``(seq,)`` attention-mask row (0 = padding)."""
    out, vals = [], mask_row.tolist()
    i = 0
    for key, grp in itertools.groupby(vals):
        n = len(list(grp))
        if key:
            out.append((i, i + n))
        i += n
    return out


def _vision_positions(start: int, grid: list[int], merge: int, interval: float) -> torch.Tensor:
    """``(3, t * h/merge * w/merge)`` M-RoPE ids of one image or video: ``(start + floor(f * interval),
    start + row, start + col)`` over frames ``f``, merged rows and merged columns (row-major)."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt = (torch.arange(t) * interval).long().view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def mrope_position_ids(input_ids: torch.Tensor, vision: dict, spatial_merge_size: int,
                       attention_mask: Optional[torch.Tensor] = None,
                       image_grid_thw: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                       second_per_grid_ts: Optional[torch.Tensor] = None, tokens_per_second: float = 2.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids as transformers' ``get_rope_index`` of the three families computes them.

    Args:
        input_ids: ``(batch, seq)`` int64; image tokens are ``vision['image_token_id']``, video tokens
            ``vision['video_token_id']``; each run of them is one image (video) of the grids, in batch order.
        vision: :attr:`ModelConfig.vision` (``family``, token ids).
        spatial_merge_size: the tower's merge size (2).
        attention_mask: ``(batch, seq)`` 0 for padding, a segment id > 0 for tokens (packed rows: each segment
            counts from 0); None = all ones.
        image_grid_thw, video_grid_thw: ``(n, 3)`` int64 (frames / temporal_patch_size, rows, cols in patches).
        second_per_grid_ts: Qwen2.5-VL, ``(num_videos,)`` seconds per temporal patch (default 1): a video's
            temporal id advances ``tokens_per_second * seconds`` per temporal patch. Qwen2-VL: 1. Qwen3-VL
            splits a video into frames of ``t = 1`` (its prompt puts a timestamp before each frame).
        tokens_per_second: ``vision_config.tokens_per_second``.

    Returns:
        ``(position_ids, deltas)``: ``(3, batch, seq)`` int64 (0 at padding) and ``(batch, 1)`` int64 = the last
        segment's largest id + 1 - its length (decoding continues at ``cache length + delta``).

    Raises:
        ValueError: more image (video) runs than grids, or a run whose length is not the grid's token count.
    """
    b, t = input_ids.shape
    family = vision["family"]
    if video_grid_thw is not None and family == "qwen3_vl":
        video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
        video_grid_thw[:, 0] = 1
    grids = {1: iter((image_grid_thw.tolist() if image_grid_thw is not None else [])),
             2: iter((video_grid_thw.tolist() if video_grid_thw is not None else []))}
    secs = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    kinds = (input_ids == vision["image_token_id"]).long() + 2 * (input_ids == vision["video_token_id"]).long()
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    pos = torch.zeros(3, b, t, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    for row in range(b):
        for s, e in _segments(mask[row].cpu()):
            parts, cur = [], 0
            for kind, grp in itertools.groupby(kinds[row, s:e].tolist()):
                n = len(list(grp))
                if kind == 0:
                    parts.append(torch.arange(cur, cur + n).expand(3, n))
                    cur += n
                    continue
                grid = next(grids[kind], None)
                name = "image" if kind == 1 else "video"
                if grid is None:
                    raise ValueError(f"input_ids hold more {name} token runs than {name}_grid_thw has rows")
                need = grid[0] * grid[1] * grid[2] // spatial_merge_size ** 2
                if n != need:
                    raise ValueError(f"a run of {n} {name} tokens, but its {name}_grid_thw {grid} needs {need}")
                interval = 1.0
                if kind == 2 and family == "qwen2_5_vl":
                    interval = tokens_per_second * float(next(secs, 1.0))
                parts.append(_vision_positions(cur, grid, spatial_merge_size, interval))
                cur += max(grid[1], grid[2]) // spatial_merge_size
            ids = torch.cat(parts, dim=1)
            pos[:, row, s:e] = ids
            deltas[row, 0] = int(ids.max()) + 1 - (e - s)
    return pos.to(input_ids.device), deltas.to(input_ids.device)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, section: list[int], interleaved: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``(batch, seq, head_dim)`` float32 of M-RoPE for ``position_ids`` ``(3, batch, seq)`` and the
    language model's ``inv_freq`` ``(head_dim / 2,)``; ``section`` (summing to ``head_dim / 2``) assigns
    frequencies to the temporal, height and width ids, in consecutive blocks or (``interleaved``, Qwen3-VL)
    round-robin (see the module docstring). The result is in the rotate-half layout of the text model."""
    freqs = position_ids[..., None].float() * inv_freq.float()                  # (3, B, T, D/2)
    if interleaved:
        f = freqs[0].clone()
        for axis in (1, 2):
            f[..., axis:section[axis] * 3:3] = freqs[axis, ..., axis:section[axis] * 3:3]
    else:
        f = torch.cat([m[i % 3] for i, m in enumerate(freqs.split(section, dim=-1))], dim=-1)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


class QwenVL(Transformer):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: :class:`VisionTower` ``visual`` + the Qwen2 / Qwen3 language model
    (``model``, ``lm_head``) of :class:`Transformer`, which it extends.

    Args:
        config: a :class:`ModelConfig` with ``vision`` set (``ModelConfig.from_hf_dict`` of a VL config.json).

    ``forward`` takes the text model's arguments plus the image processor's ``pixel_values`` /
    ``image_grid_thw`` (and ``pixel_values_videos`` / ``video_grid_thw`` / ``second_per_grid_ts``) and returns
    the final hidden states like :meth:`Transformer.forward`.

    Raises:
        LLMTuneError: ``config.vision`` is None (a text-only config).
    """

    def __init__(self, config: ModelConfig) -> None:
        if not config.vision:
            raise LLMTuneError("QwenVL needs a vision-language config (config.json with vision_config)")
        super().__init__(config)
        self.vision_config = VisionConfig.from_hf_dict(config.vision["vision_config"], config.vision["family"])
        self.visual = VisionTower(self.vision_config)
        #: module names as transformers/peft spell them (adapter files are written and read in that layout)
        self.peft_module_name, self.native_module_name = hf_module_name, native_name
        #: per-row M-RoPE offsets of the last prefill with images (decoding continues at cache length + delta)
        self.rope_deltas: Optional[torch.Tensor] = None
        self._queued: list[dict] = []   # generation_images

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each decoder layer's and each vision block's activations in the backward pass."""
        super().gradient_checkpointing_enable(enable)
        self.visual.gradient_checkpointing = enable

    def checkpoint_name(self, name: str) -> str:
        """The name a parameter is written under in a Hugging Face folder: Qwen3-VL's layout
        (:func:`hf_module_name`, which transformers' Qwen3-VL class expects) for Qwen3-VL, else unchanged (the
        published Qwen2-VL / Qwen2.5-VL layout)."""
        return hf_module_name(name) if self.config.vision["family"] == "qwen3_vl" else name

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`Transformer.rope` for ``(batch, seq)`` ids; M-RoPE (:func:`mrope_cos_sin`) for ``(3, batch,
        seq)`` ids."""
        if position_ids.dim() == 2:
            return super().rope(position_ids)
        if self.inv_freq.device != position_ids.device or self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.config).to(position_ids.device)   # float32 after a model.to(bf16)
        v = self.config.vision
        return mrope_cos_sin(position_ids, self.inv_freq, v["mrope_section"], v["family"] == "qwen3_vl")

    def position_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     image_grid_thw: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                     second_per_grid_ts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`mrope_position_ids` with this model's token ids and merge size."""
        vc = self.vision_config
        return mrope_position_ids(input_ids, self.config.vision, vc.spatial_merge_size, attention_mask,
                                  image_grid_thw, video_grid_thw, second_per_grid_ts, vc.tokens_per_second)

    def _visual_embeds(self, input_ids, embeds, inputs):
        """Scatter the tower's features of each modality into ``embeds`` at its tokens; returns
        ``(embeds, flat visual positions, deepstack features per level in position order)``."""
        b, t, e = embeds.shape
        flat = embeds.reshape(b * t, e)
        levels: list[torch.Tensor] = []
        any_mask = torch.zeros(b * t, dtype=torch.bool, device=embeds.device)
        for pixels, grid, token, name in inputs:
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{name}: pixel values given without their grid_thw")
            feats, deep = self.visual(pixels, grid)
            idx = (input_ids == token).reshape(-1).nonzero().squeeze(1)
            if idx.numel() != feats.shape[0]:
                raise ValueError(f"{name}: input_ids hold {idx.numel()} tokens {token}, the images give "
                                 f"{feats.shape[0]} features (one per merged patch)")
            flat = flat.index_copy(0, idx, feats.to(flat.dtype))
            any_mask[idx] = True
            if not levels:
                levels = [flat.new_zeros(b * t, e) for _ in deep]
            levels = [lv.index_copy(0, idx, d.to(flat.dtype)) for lv, d in zip(levels, deep)]
        where = any_mask.nonzero().squeeze(1)
        return flat.view(b, t, e), where, [lv[where] for lv in levels]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, pixel_values_videos: Optional[torch.Tensor] = None,
                video_grid_thw: Optional[torch.Tensor] = None, second_per_grid_ts: Optional[torch.Tensor] = None):
        """Run the tower on the images, place their features, then the language model with M-RoPE.

        Args: those of :meth:`Transformer.forward` (``position_ids`` may be ``(3, batch, seq)``), plus
            pixel_values: ``(num_patches, C*T*P*P)`` and image_grid_thw ``(num_images, 3)`` int64 (the image
            processor's); pixel_values_videos / video_grid_thw / second_per_grid_ts likewise for videos.

        Returns: as :meth:`Transformer.forward`. Without images or videos and without a cache the text model
            runs unchanged (M-RoPE of equal ids is RoPE).

        Raises:
            ValueError: image tokens and features disagree in number, a grid is missing, or image tokens come
                without pixel values.
        """
        v = self.config.vision
        past = 0 if past_key_values is None else past_key_values.seq_len
        if past == 0 and pixel_values is None and pixel_values_videos is None and self._queued:
            pixel_values, image_grid_thw = self._take_queued(input_ids.shape[0])
        if (past_key_values is not None and past == 0 and attention_mask is not None
                and (pixel_values is not None or pixel_values_videos is not None)
                and int((attention_mask.unique() > 0).sum()) > input_ids.shape[0]):   # packed prompts
            raise ValueError("a cached prefill that packs several prompts (segment ids) with images: per-prompt M-RoPE "
                             "offsets for decoding are not supported yet; prefill prompts with images one row each")
        embeds, hook = None, None
        if pixel_values is not None or pixel_values_videos is not None:
            embeds = self.model.embed_tokens(input_ids)
            embeds, where, deep = self._visual_embeds(input_ids, embeds, (
                (pixel_values, image_grid_thw, v["image_token_id"], "pixel_values"),
                (pixel_values_videos, video_grid_thw, v["video_token_id"], "pixel_values_videos")))
            if deep:
                def hook(i: int, x: torch.Tensor) -> torch.Tensor:
                    if i >= len(deep):
                        return x
                    b, t, e = x.shape
                    return x.reshape(b * t, e).index_add(0, where, deep[i].to(x.dtype)).view(b, t, e)
        elif past == 0 and bool(((input_ids == v["image_token_id"]) | (input_ids == v["video_token_id"])).any()):
            raise ValueError("input_ids hold image/video tokens but no pixel_values(_videos) were given (a stage "
                             "or collator that does not pass the images)")
        grids = image_grid_thw is not None or video_grid_thw is not None
        if (position_ids is None or position_ids.dim() == 2) and past == 0 and grids:  # 2-D: the collator's
            position_ids, self.rope_deltas = self.position_ids(input_ids, attention_mask, image_grid_thw,
                                                               video_grid_thw, second_per_grid_ts)
        elif past > 0 and (position_ids is None or position_ids.dim() == 2):
            # the cache's per-row offsets (KVCache.reorder / SlotKVCache.move keep them with their rows)
            deltas = past_key_values.rope_deltas if hasattr(past_key_values, "rope_deltas") else self.rope_deltas
            if deltas is not None:   # decoding after an image prefill: text ids shifted by each row's delta
                b, t = input_ids.shape
                base = position_ids if position_ids is not None else (
                    positions_from_mask(attention_mask)[:, past:] if attention_mask is not None
                    else torch.arange(past, past + t, device=input_ids.device).expand(b, t))
                position_ids = (base + deltas.to(base.device)).expand(3, b, t)
        elif past == 0:
            self.rope_deltas = None
        out = super().forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                              inputs_embeds=embeds, layer_hook=hook)
        if use_cache and past == 0:
            out[1].rope_deltas = self.rope_deltas
        return out

    @contextlib.contextmanager
    def generation_images(self, rows: Sequence[dict]):
        """Images for generation code that calls the model without them (:func:`llmtune.rollout.generate_rollouts`).

        While active, every prefill (no cached positions) without pixel values takes the vision inputs of the
        next ``batch`` entries of ``rows``, in order, so rollouts in one or several batches get each row's own
        images; decoding then continues with the cache's ``rope_deltas``.

        Args:
            rows: one dict per generated row: ``{"pixel_values": (n, C*T*P*P), "image_grid_thw": (k, 3)}`` of its
                images, or ``{}`` for a text-only row.

        Raises (at a prefill):
            ValueError: more rows prefilled than queued.
        """
        self._queued = list(rows)
        try:
            yield self
        finally:
            self._queued = []

    def take_generation_images(self, n: int) -> Optional[list[dict]]:
        """The next ``n`` rows queued by :meth:`generation_images` (each ``{}`` or that row's ``pixel_values`` /
        ``image_grid_thw``), removed from the queue, for a caller that hands each request its own images (the
        generation engine's :attr:`llmtune.engine.Request.images`); None when nothing is queued.

        Raises:
            ValueError: fewer than ``n`` rows queued.
        """
        if not self._queued:
            return None
        if n > len(self._queued):
            raise ValueError(f"generation_images: {n} rows to generate but only {len(self._queued)} rows queued")
        rows, self._queued = self._queued[:n], self._queued[n:]
        return rows

    def _take_queued(self, b: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if b > len(self._queued):
            raise ValueError(f"generation_images: a prefill of {b} rows but only {len(self._queued)} rows queued")
        rows, self._queued = self._queued[:b], self._queued[b:]
        rows = [r for r in rows if r.get("pixel_values") is not None]
        if not rows:
            return None, None
        return (torch.cat([r["pixel_values"] for r in rows]), torch.cat([r["image_grid_thw"] for r in rows]))


def vl_part(name: str) -> str:
    """Which part of a :class:`QwenVL` parameter ``name`` belongs to (LLaMA-Factory's split of Qwen-VL models):
    ``"projector"`` (``visual.merger``, ``visual.deepstack_merger_list``), ``"vision"`` (the rest of
    ``visual.*``: patch embedding, position table, blocks) or ``"language"`` (``model.*``, ``lm_head``)."""
    if name.startswith(("visual.merger.", "visual.deepstack_merger_list.")):
        return "projector"
    return "vision" if name.startswith("visual.") else "language"


def freeze_parts(model: torch.nn.Module, vision: bool = True, projector: bool = True, language: bool = False) -> None:
    """Stop training the named parts (:func:`vl_part`) of ``model``: their parameters (LoRA adapters inside them
    included) get ``requires_grad=False``. LLaMA-Factory's ``freeze_vision_tower`` (default on),
    ``freeze_multi_modal_projector`` (on) and ``freeze_language_model`` (off).

    Raises:
        LLMTuneError: nothing is left to train.
    """
    frozen = {part for part, on in (("vision", vision), ("projector", projector), ("language", language)) if on}
    for name, p in model.named_parameters():
        if vl_part(name) in frozen:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise LLMTuneError("freeze_vision_tower / freeze_multi_modal_projector / freeze_language_model leave "
                           "nothing to train; unfreeze a part (e.g. freeze_language_model: false)")


def vl_lora_target(model: torch.nn.Module, lora_target, vision: bool = True, projector: bool = True,
                   language: bool = False) -> str:
    """Which linear layers of a :class:`QwenVL` get LoRA, as a PEFT ``target_modules`` regex over transformers'
    module names (:func:`hf_module_name`; llmtune matches it against its own names too), following
    LLaMA-Factory's ``find_all_linear_modules`` / ``patch_target_modules``:

    * ``all``: every linear layer of the decoder layers (as for text models) plus, with ``vision=False``
      (``freeze_vision_tower: false``), those of the vision blocks (``attn.qkv``, ``attn.proj``, the MLP);
      never the projector (``visual.merger``, DeepStack mergers) nor ``lm_head``.
    * names (``q_proj,qkv``): every linear layer whose path ends with a name, wherever it is.
    * Then layers inside a frozen part (``vision``/``projector``/``language`` True: :func:`vl_part`) and the
      patch embedding are dropped.

    The layer index of ``layers.N`` / ``blocks.N`` is written as ``\\d+`` when that selects exactly the same
    layers, else every path is listed.

    Raises:
        LLMTuneError: an unknown name (from :func:`llmtune.peft.targets.select_lora_targets`), or nothing left
            outside the frozen parts.
    """
    import re

    from llmtune.peft.targets import as_names, linear_modules, select_lora_targets

    frozen = {part for part, on in (("vision", vision), ("projector", projector), ("language", language)) if on}
    linears = list(linear_modules(model))
    if any(n.lower() in ("all", "all-linear") for n in as_names(lora_target)):
        paths, _ = select_lora_targets(model, "all")
        paths = [p for p in paths if vl_part(p) == "language"] + [p for p in linears if p.startswith("visual.blocks.")]
    else:
        paths, _ = select_lora_targets(model, lora_target)
    paths = [p for p in paths if vl_part(p) not in frozen and not p.startswith("visual.patch_embed.")]
    if not paths:
        raise LLMTuneError(f"lora_target {lora_target!r} selects no linear layer outside the frozen parts "
                           f"({', '.join(sorted(frozen))}); set freeze_vision_tower / freeze_multi_modal_projector "
                           "/ freeze_language_model: false for the part to adapt, or name layers of the language model")
    names = [hf_module_name(p) for p in paths]
    short = sorted({re.sub(r"(layers|blocks)\\\.\d+\\\.", r"\1\\.\\d+\\.", re.escape(n)) for n in names})
    regex = "^(" + "|".join(short) + ")$"
    if {n for n in map(hf_module_name, linears) if re.fullmatch(regex, n)} != set(names):
        regex = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return regex
