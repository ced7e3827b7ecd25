"""Images in conversations for the Qwen-VL models: LLaMA-Factory's ``<image>`` placeholders expanded to the
model's vision tokens, labels kept off them, and the batch's ``pixel_values`` / ``image_grid_thw``.

Data format (LLaMA-Factory ``data/README.md``, multimodal datasets): a row's ``images`` column lists image paths
(relative to ``dataset_dir``) or ``{"path"|"bytes"}`` dicts; the text holds one ``<image>`` per image where it
appears. The Qwen2-VL chat format (its processor and LLaMA-Factory's ``qwen2_vl`` plugin) writes image ``i`` as
``<|vision_start|>`` + ``n_i`` x ``<|image_pad|>`` + ``<|vision_end|>``, ``n_i = t * h * w / merge**2`` from the
image's grid (:class:`llmtune.data.images.QwenVLImageProcessor`); the model puts the vision tower's features at
the pad tokens (:class:`llmtune.models.qwen_vl.QwenVL`). Token rows keep the image references (``images``) and
pixels are computed when a batch is collated (:func:`collate_images`), so the token cache stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from llmtune.constants import IGNORE_INDEX
from llmtune.data.images import QwenVLImageProcessor, load_image, open_image, smart_resize
from llmtune.errors import LLMTuneError

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class VisionTokens:
    """The vision marker tokens of a Qwen-VL tokenizer: strings and ids (Qwen2/2.5/3-VL use the same)."""

    start: str = "<|vision_start|>"
    pad: str = "<|image_pad|>"
    end: str = "<|vision_end|>"
    start_id: int = -1
    pad_id: int = -1
    end_id: int = -1

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "VisionTokens":
        """Ids looked up in ``tokenizer`` (an llmtune ``Tokenizer``).

        Raises:
            LLMTuneError: a marker is not a token of the tokenizer (not a Qwen-VL tokenizer).
        """
        tok = cls()
        ids = {}
        for name in ("start", "pad", "end"):
            text = getattr(tok, name)
            i = tokenizer.convert_tokens_to_ids(text)
            if i is None or (tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id):
                raise LLMTuneError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {text} token: "
                                   "images need a Qwen-VL tokenizer (Qwen2-VL / Qwen2.5-VL / Qwen3-VL)")
            ids[name + "_id"] = int(i)
        return cls(**ids)


def image_grid(image: Any, processor: QwenVLImageProcessor) -> list[int]:
    """``[1, h, w]``: the patch grid the processor gives ``image``, from its size only (Pillow reads the header,
    not the pixels, of a file). Raises :class:`LLMTuneError` for a missing or unreadable file."""
    from PIL import Image

    if isinstance(image, Image.Image):
        size = image.size
    elif isinstance(image, (str, Path)):
        size = open_image(image, str(image), decode=False).size
    else:
        size = load_image(image).size
    factor = processor.patch_size * processor.merge_size
    h, w = smart_resize(size[1], size[0], factor, processor.min_pixels, processor.max_pixels)
    return [1, h // processor.patch_size, w // processor.patch_size]


def expand_image_placeholders(messages: list[dict], grids: Sequence[Sequence[int]],
                              processor: QwenVLImageProcessor, tokens: VisionTokens, where: str) -> list[dict]:
    """Copies of ``messages`` (``{"role", "content"}``) with the ``k``-th ``<image>`` replaced by image ``k``'s
    vision tokens (module docstring), counting through the messages in order.

    Raises:
        LLMTuneError: the number of ``<image>`` placeholders differs from the number of images (``where`` names
            the dataset row).
    """
    found = sum(str(m.get("content") or "").count(IMAGE_PLACEHOLDER) for m in messages)
    if found != len(grids):
        raise LLMTuneError(f"{where}: {found} {IMAGE_PLACEHOLDER} placeholder(s) in the messages but {len(grids)} "
                           f"image(s) in the images column; write one {IMAGE_PLACEHOLDER} where each image goes")
    it = iter(grids)
    out = []
    for m in messages:
        parts = str(m.get("content") or "").split(IMAGE_PLACEHOLDER)
        text = parts[0]
        for rest in parts[1:]:
            n = processor.num_image_tokens(next(it))
            text += tokens.start + tokens.pad * n + tokens.end + rest
        out.append({**m, "content": text})
    return out


def mask_vision_labels(row: dict, tokens: VisionTokens) -> dict:
    """``row`` with ``labels`` set to -100 at every vision start/pad/end token (in place; returned)."""
    if "labels" in row:
        skip = {tokens.start_id, tokens.pad_id, tokens.end_id}
        row["labels"] = [IGNORE_INDEX if t in skip else lab for t, lab in zip(row["input_ids"], row["labels"])]
    return row


def images_intact(row: dict, grids: Sequence[Sequence[int]], processor: QwenVLImageProcessor,
                  tokens: VisionTokens) -> bool:
    """True when ``row['input_ids']`` still holds every image's pad tokens (truncation to ``cutoff_len`` can cut
    through an image; such a row cannot be fed to the model and must be dropped, or cutoff_len raised)."""
    want = sum(processor.num_image_tokens(g) for g in grids)
    return sum(1 for t in row["input_ids"] if t == tokens.pad_id) == want


def collate_images(rows: Sequence[dict], processor: QwenVLImageProcessor, key: str = "images"
                   ) -> dict[str, torch.Tensor]:
    """``{"pixel_values", "image_grid_thw"}`` of the images of ``rows`` (each row's ``key`` list, rows in batch
    order: the order of their pad tokens in a right- or left-padded or packed batch); ``{}`` when none."""
    images = [im for r in rows for im in (r.get(key) or [])]
    return processor(images) if images else {}


def vision_inputs(batch: dict, prefix: str = "") -> dict[str, Optional[torch.Tensor]]:
    """The model keyword arguments of a collated batch's images (``pixel_values``, ``image_grid_thw``);
    ``{}`` for a text-only batch, so text models are called exactly as before."""
    return {k: batch[prefix + k] for k in ("pixel_values", "image_grid_thw") if prefix + k in batch}
