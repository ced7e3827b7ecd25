"""The Qwen-VL image processor: images -> ``pixel_values`` + ``image_grid_thw`` for
:class:`llmtune.models.qwen_vl.QwenVL`.

The algorithm of the Qwen2-VL image processor (Qwen2-VL paper, section 2.1 "Naive Dynamic Resolution", and the
``preprocessor_config.json`` format of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints, which all use it):

1. decode with Pillow, composite transparency onto white, convert to RGB;
2. resize (bicubic) to the :func:`smart_resize` size: both sides multiples of ``patch_size * merge_size``,
   area within ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible;
3. rescale to ``[0, 1]`` (``x * rescale_factor``, computed in float64 then stored as float32) and normalise
   per channel ``(x - mean) / std`` in float32;
4. cut into ``patch_size x patch_size`` patches ordered by ``merge_size x merge_size`` blocks (row-major blocks,
   row-major inside a block), repeat the frame ``temporal_patch_size`` times (a still image is a video of one
   temporal patch) and flatten each patch as ``(channel, time, row, col)``.

Output: ``pixel_values`` ``(sum of h * w, C * T * P * P)`` float32 and ``image_grid_thw`` ``(num_images, 3)``
int64 rows ``(1, h, w)`` in patches; image ``i`` needs ``h * w / merge_size**2`` image tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
import torch

from llmtune.errors import LLMTuneError

#: OpenAI CLIP's normalisation (the Qwen2-VL / Qwen2.5-VL default); Qwen3-VL's preprocessor config uses 0.5
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to: each side rounded to a multiple of ``factor``; when the
    area then exceeds ``max_pixels``, both sides scaled by ``sqrt(area / max_pixels)`` and floored to multiples
    of ``factor`` (at least ``factor``); when below ``min_pixels``, scaled up and ceiled likewise.

    Raises:
        ValueError: an aspect ratio over 200 (the reference refuses it too).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {width}x{height} pixels: aspect ratio over 200 is not supported")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_image(image: Any):
    """A ``PIL.Image.Image`` in RGB from a path, bytes, a ``{"path"|"bytes": ...}`` dict (datasets' Image
    feature), a numpy ``(H, W, 3)`` uint8 array or a PIL image; transparency is composited onto white.

    Raises:
        LLMTuneError: the file is missing or not an image Pillow can read (named).
    """
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif isinstance(image, (bytes, bytearray)):
        import io

        image = open_image(io.BytesIO(image), "image bytes")
    elif isinstance(image, (str, Path)):
        image = open_image(image, str(image))
    if not isinstance(image, Image.Image):
        raise LLMTuneError(f"image {type(image).__name__}: expected a path, bytes, a numpy array or a PIL image")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(src, name: str, decode: bool = True):
    """``PIL.Image.open(src)``, decoded unless ``decode`` is False (then only the header is read: size, mode).

    Raises:
        LLMTuneError: the file is missing or not an image Pillow can read (``name`` in the message).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(src)
        if decode:
            img.load()
        return img
    except FileNotFoundError:
        raise LLMTuneError(f"image {name}: no such file (image paths are relative to dataset_dir)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LLMTuneError(f"image {name}: not an image Pillow can read ({e})") from None


@dataclass
class QwenVLImageProcessor:
    """Settings of the Qwen2-VL image processor (``preprocessor_config.json`` names; ``min_pixels`` /
    ``max_pixels`` are also read from ``size.shortest_edge`` / ``size.longest_edge``). Call it on a list of
    images to get ``{"pixel_values", "image_grid_thw"}`` tensors (module docstring)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = field(default=CLIP_MEAN)
    image_std: tuple = field(default=CLIP_STD)
    rescale_factor: float = 1 / 255
    resample: int = 3          # PIL.Image.BICUBIC

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "QwenVLImageProcessor":
        """From a ``preprocessor_config.json`` dict (unknown keys ignored)."""
        size = cfg.get("size") or {}
        kw: dict[str, Any] = {}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if cfg.get(key) is not None:
                kw[key] = int(cfg[key])
        for key, alt in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            val = cfg.get(key) if cfg.get(key) is not None else size.get(alt)
            if val is not None:
                kw[key] = int(val)
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                kw[key] = tuple(float(x) for x in cfg[key])
        if cfg.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(cfg["rescale_factor"])
        return cls(**kw)

    @classmethod
    def from_folder(cls, folder: Union[str, Path]) -> "QwenVLImageProcessor":
        """From ``folder/preprocessor_config.json`` (the defaults when the file is absent).

        Raises:
            LLMTuneError: the file is not valid JSON.
        """
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise LLMTuneError(f"{path}: not valid JSON ({e})") from None

    def patchify(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        """``(C, H, W)`` float32 -> ``(h * w, C * T * P * P)`` patches in merge-block order, and ``h, w``."""
        c, height, width = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        h, w = height // p, width // p
        x = image.reshape(c, h // m, m, p, w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
        return x.reshape(h * w, c * t * p * p), h, w

    def preprocess(self, image: Any) -> tuple[np.ndarray, list[int]]:
        """One image -> ``(patches, [1, h, w])`` (see :meth:`patchify`)."""
        img = load_image(image)
        factor = self.patch_size * self.merge_size
        rh, rw = smart_resize(img.height, img.width, factor, self.min_pixels, self.max_pixels)
        if (rh, rw) != (img.height, img.width):
            img = img.resize((rw, rh), resample=self.resample)
        x = np.asarray(img).transpose(2, 0, 1)
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        patches, h, w = self.patchify((x - mean) / std)
        return patches, [1, h, w]

    def num_image_tokens(self, grid_thw: Iterable[int]) -> int:
        """Image tokens (``<|image_pad|>``) of one image of grid ``(t, h, w)``: ``t * h * w / merge**2``."""
        t, h, w = grid_thw
        return t * h * w // self.merge_size ** 2

    def __call__(self, images: list) -> dict[str, torch.Tensor]:
        """``{"pixel_values": (N, C*T*P*P) float32, "image_grid_thw": (len(images), 3) int64}``."""
        if not images:
            raise ValueError("QwenVLImageProcessor: no images given")
        parts = [self.preprocess(im) for im in images]
        return {"pixel_values": torch.from_numpy(np.concatenate([p for p, _ in parts])),
                "image_grid_thw": torch.tensor([g for _, g in parts], dtype=torch.long)}
