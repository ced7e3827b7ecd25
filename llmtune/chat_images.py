"""Images in conversations with a Qwen-VL model: ``llmtune chat --images a.png,b.png`` / ``/image PATH`` and the
``image_url`` content parts of ``llmtune api`` requests.

A message may carry ``"images"``: a list of image sources (a file path, or the bytes of an encoded image). When
its text holds no ``<image>`` placeholder, one per image is put before the text (LLaMA-Factory's chat engines do
this for the first message; here it is done per message, so an image added later in a session lands in its own
turn); otherwise the placeholders already written mark where the images go. The placeholders then become the
model's vision tokens (:func:`llmtune.data.multimodal.expand_image_placeholders`, as in training) and the images
the prefill's ``pixel_values`` / ``image_grid_thw`` (:class:`llmtune.data.images.QwenVLImageProcessor`), which
:class:`llmtune.engine.Request` takes as ``images``.

Source: LLaMA-Factory's ``chat/hf_engine.py`` (placeholders before the first message's text when none are
written) and the Qwen2-VL chat format (module docstring of :mod:`llmtune.data.multimodal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from llmtune.data.images import QwenVLImageProcessor
from llmtune.data.multimodal import IMAGE_PLACEHOLDER, VisionTokens, expand_image_placeholders, image_grid
from llmtune.errors import LLMTuneError

__all__ = ["ChatImages", "chat_images", "check_image_file", "pop_images_flag", "TEXT_ONLY"]

#: the reason a text-only model refuses images (completed by the caller with the model's name)
TEXT_ONLY = ("is a text-only model (no vision tower, no vision_config): images need a vision-language model "
             "(Qwen2-VL, Qwen2.5-VL or Qwen3-VL)")


def check_image_file(path: str, what: str = "image") -> str:
    """``path`` (str) after checking that it is a file Pillow can read (only the header is read).

    Raises:
        LLMTuneError: the path is missing, a folder, or not an image; the message names ``what`` and the path.
    """
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise LLMTuneError(f"{what} {path}: no such file" + (" (it is a folder)" if p.is_dir() else ""))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p):
            pass
    except (UnidentifiedImageError, OSError) as e:
        raise LLMTuneError(f"{what} {path}: not an image Pillow can read ({e})") from None
    return str(p)


def pop_images_flag(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Take ``--images a.png,b.png`` (or ``--images=...``) out of a command line.

    Returns:
        ``(the other arguments, the image paths)`` (paths in order; empty when the flag is absent).

    Raises:
        LLMTuneError: ``--images`` without a value.
    """
    rest, images = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--images" or a.startswith("--images="):
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            if not value.strip() or value.startswith("--"):
                raise LLMTuneError("--images needs a value: comma-separated image paths, e.g. --images a.png,b.png")
            images += [s.strip() for s in value.split(",") if s.strip()]
            continue
        rest.append(a)
        i += 1
    return rest, images


@dataclass
class ChatImages:
    """The image side of a chat with a vision-language model.

    Attributes:
        processor: the model's image processor; tokenizer: its tokenizer (for the vision token ids);
        device: where ``pixel_values`` / ``image_grid_thw`` go (the model's device).
    """

    processor: QwenVLImageProcessor
    tokenizer: Any
    device: torch.device

    def expand(self, messages: Sequence[dict]) -> tuple[list[dict], list]:
        """``(messages, images)``: copies of ``messages`` (``{"role", "content", "images"?}``) without ``images``,
        their ``<image>`` placeholders (added before the text of a message with images and none written) replaced
        by vision tokens; ``images`` every message's images in order (``[]``: the messages are returned as they
        are, a literal ``<image>`` in text stays text).

        Raises:
            LLMTuneError: a message's placeholders and images do not add up, or an image cannot be read (named).
        """
        images = [im for m in messages for im in (m.get("images") or [])]
        msgs = []
        for src in messages:
            m = {k: v for k, v in src.items() if k != "images"}
            k = len(src.get("images") or [])
            if k and IMAGE_PLACEHOLDER not in str(m.get("content") or ""):
                m["content"] = IMAGE_PLACEHOLDER * k + str(m.get("content") or "")
            msgs.append(m)
        if not images:
            return msgs, []
        grids = [image_grid(im, self.processor) for im in images]
        return expand_image_placeholders(msgs, grids, self.processor, VisionTokens.from_tokenizer(self.tokenizer),
                                         "the chat"), images

    def inputs(self, images: Sequence[Any]) -> Optional[dict]:
        """``{"pixel_values": (patches, C*T*P*P) float32, "image_grid_thw": (n, 3) int64}`` on :attr:`device`
        (the :class:`llmtune.engine.Request` ``images`` argument); None without images."""
        if not images:
            return None
        return {k: v.to(self.device) for k, v in self.processor(list(images)).items()}


def chat_images(cfg: Any, model: torch.nn.Module, tokenizer: Any) -> Optional[ChatImages]:
    """The :class:`ChatImages` of a loaded chat model; None for a text-only model (``model.config.vision`` unset).

    The processor is the model folder's (``preprocessor_config.json``, patch sizes from ``vision_config``,
    bounded by ``cfg.image_max_pixels`` / ``cfg.image_min_pixels``: :func:`llmtune.data.multimodal.model_processor`);
    a model that is not a local folder gets the processor's defaults with the tower's patch sizes.

    Raises:
        LLMTuneError: the tokenizer lacks the vision tokens, or an unreadable ``preprocessor_config.json``.
    """
    vision = getattr(getattr(model, "config", None), "vision", None)
    if vision is None:
        return None
    from llmtune.data.multimodal import model_processor
    from llmtune.runs import resolve_model_chain

    try:
        base = resolve_model_chain(cfg.model_name_or_path)[0]
    except LLMTuneError:
        base = cfg.model_name_or_path
    proc = model_processor(base, getattr(cfg, "image_max_pixels", None), getattr(cfg, "image_min_pixels", None))
    if proc is None:
        proc = QwenVLImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                    temporal_patch_size=vision.temporal_patch_size)
    VisionTokens.from_tokenizer(tokenizer)
    return ChatImages(proc, tokenizer, next(model.parameters()).device)
