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
from llmtune.data.encode import Encoder
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


def mask_vision_labels(row: dict, tokens: VisionTokens, prefix: str = "") -> dict:
    """``row`` with ``{prefix}labels`` set to -100 at every vision start/pad/end token of ``{prefix}input_ids``
    (in place; returned)."""
    if prefix + "labels" in row:
        skip = {tokens.start_id, tokens.pad_id, tokens.end_id}
        row[prefix + "labels"] = [IGNORE_INDEX if t in skip else lab
                                  for t, lab in zip(row[prefix + "input_ids"], row[prefix + "labels"])]
    return row


def images_intact(row: dict, grids: Sequence[Sequence[int]], processor: QwenVLImageProcessor,
                  tokens: VisionTokens, prefix: str = "") -> bool:
    """True when ``row[prefix + 'input_ids']`` still holds every image's pad tokens (truncation to ``cutoff_len``
    can cut through an image; such a row cannot be fed to the model and must be dropped, or cutoff_len raised)."""
    want = sum(processor.num_image_tokens(g) for g in grids)
    return sum(1 for t in row[prefix + "input_ids"] if t == tokens.pad_id) == want


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


def model_processor(model_path: Any, image_max_pixels: Optional[int] = None,
                    image_min_pixels: Optional[int] = None) -> Optional[QwenVLImageProcessor]:
    """The image processor of a vision-language model folder, None for a text model (or a path that is not a
    local folder): ``preprocessor_config.json`` (defaults without one), patch/merge/temporal sizes from
    ``config.json``'s ``vision_config`` (they must agree with the tower), and the pixel bounds tightened by
    ``image_max_pixels`` / ``image_min_pixels`` (LLaMA-Factory's keys; here they bound ``smart_resize``
    directly). Raises :class:`LLMTuneError` for an unreadable ``preprocessor_config.json``."""
    import json

    folder = Path(str(model_path)) if model_path else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        vc = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vision_config")
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(vc, dict):
        return None
    proc = QwenVLImageProcessor.from_folder(folder)
    for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                         ("temporal_patch_size", "temporal_patch_size")):
        if vc.get(theirs) is not None:
            setattr(proc, ours, int(vc[theirs]))
    if image_max_pixels:
        proc.max_pixels = min(proc.max_pixels, int(image_max_pixels))
    if image_min_pixels:
        proc.min_pixels = max(proc.min_pixels, int(image_min_pixels))
    return proc


def processor_key(proc: Optional[QwenVLImageProcessor]) -> Optional[dict]:
    """The processor settings as a JSON-able dict (part of the dataset cache key); None for None."""
    return None if proc is None else {k: list(v) if isinstance(v, tuple) else v for k, v in proc.__dict__.items()}


class ImageEncoder(Encoder):
    """An :class:`~llmtune.data.encode.Encoder` for examples with images (stage sft): placeholders expanded
    (:func:`expand_image_placeholders`), labels off the vision tokens, rows whose images were cut by
    ``cutoff_len`` dropped (counted in ``self.cut_images``), and ``row["images"]`` = the absolute image paths
    (relative ones joined to ``base_dir``). Also the prompt-side images of dpo/rm pairs, kto rows and grpo
    prompts (:meth:`encode_pair`, :meth:`encode_kto`, :meth:`encode_ppo`); ppo refuses examples with images."""

    def __init__(self, template, tokenizer, cutoff_len: int, train_on_prompt: bool = False,
                 mask_history: bool = False, *, processor: QwenVLImageProcessor, base_dir: str = ".",
                 dataset: str = "") -> None:
        super().__init__(template, tokenizer, cutoff_len, train_on_prompt, mask_history)
        self.processor, self.base_dir, self.dataset = processor, Path(base_dir), dataset
        self.tokens = VisionTokens.from_tokenizer(tokenizer)
        self.cut_images = 0
        self.count = 0
        #: stages dpo and rm set this (their collator and stage pass the images); grpo sets prompts_with_images
        self.pairs_with_images = False
        self.prompts_with_images = False

    def _path(self, image: Any) -> Any:
        if isinstance(image, str) and not Path(image).is_absolute():
            return str(self.base_dir / image)
        return image

    def encode_sft(self, ex, response: Optional[dict] = None) -> Optional[dict]:
        self.count += 1
        resp = response or ex.responses[0]
        if not ex.images and not any(IMAGE_PLACEHOLDER in str(m.get("content") or "") for m in ex.prompt + [resp]):
            return super().encode_sft(ex, response)
        images = [self._path(im) for im in ex.images]
        grids = [image_grid(im, self.processor) for im in images]
        msgs = expand_image_placeholders(list(ex.prompt) + [resp], grids, self.processor, self.tokens,
                                         f"dataset {self.dataset!r}, example {self.count}")
        row = super().encode_sft(type(ex)(prompt=msgs[:-1], responses=msgs[-1:], kind=ex.kind, system=ex.system,
                                          tools=ex.tools), msgs[-1])
        if row is None:
            return None
        if not images_intact(row, grids, self.processor, self.tokens):
            self.cut_images += 1
            return None
        row = mask_vision_labels(row, self.tokens)
        row["images"] = images
        return row

    def _refuse(self, *args, **kwargs):
        ex = args[0] if args else None
        if ex is not None and getattr(ex, "images", None):
            raise LLMTuneError(f"dataset {self.dataset!r}: examples with images are supported for stages sft, dpo, "
                               "rm, kto and grpo (not ppo)")
        return None

    def _prompt_images(self, ex) -> Optional[tuple[list, list, list]]:
        """``(images, grids, prompt)`` with the prompt's ``<image>`` placeholders expanded (the answers hold
        none); None for an example without images or placeholders."""
        self.count += 1
        if not ex.images and not any(IMAGE_PLACEHOLDER in str(m.get("content") or "") for m in ex.prompt):
            return None
        images = [self._path(im) for im in ex.images]
        grids = [image_grid(im, self.processor) for im in images]
        prompt = expand_image_placeholders(list(ex.prompt), grids, self.processor, self.tokens,
                                           f"dataset {self.dataset!r}, example {self.count}")
        return images, grids, prompt

    def _finish(self, row: Optional[dict], images: list, grids: list, prefixes: Sequence[str]) -> Optional[dict]:
        """Drop a row whose image tokens were cut (counted), mask labels off the vision tokens of each
        ``prefix`` sequence, attach the image paths."""
        if row is None:
            return None
        if not all(images_intact(row, grids, self.processor, self.tokens, side) for side in prefixes):
            self.cut_images += 1
            return None
        for side in prefixes:
            mask_vision_labels(row, self.tokens, side)
        row["images"] = images
        return row

    def encode_pair(self, ex, chosen, rejected):
        """dpo/rm pairs: the prompt's ``<image>`` placeholders expanded (answers hold none), both sequences
        checked intact, ``row["images"]`` the prompt's images (the collator repeats them for chosen and
        rejected)."""
        if not self.pairs_with_images:
            return self._refuse(ex) or super().encode_pair(ex, chosen, rejected)
        found = self._prompt_images(ex)
        if found is None:
            return super().encode_pair(ex, chosen, rejected)
        images, grids, prompt = found
        row = super().encode_pair(type(ex)(prompt=prompt, responses=[chosen, rejected], kind=ex.kind,
                                           system=ex.system, tools=ex.tools), chosen, rejected)
        return self._finish(row, images, grids, ("chosen_", "rejected_"))

    def encode_kto(self, ex, kl_response):
        """kto rows: the completion and its mismatched ``kl_`` completion share the prompt, so both hold the
        prompt's images (``row["images"]``; the stage feeds them to both forwards)."""
        found = self._prompt_images(ex)
        if found is None:
            return super().encode_kto(ex, kl_response)
        images, grids, prompt = found
        row = super().encode_kto(type(ex)(prompt=prompt, responses=list(ex.responses), kind=ex.kind,
                                          system=ex.system, tools=ex.tools, kto_tag=ex.kto_tag), kl_response)
        return self._finish(row, images, grids, ("", "kl_"))

    def encode_ppo(self, ex):
        """grpo prompts (``prompts_with_images``): the prompt with its images expanded, ``row["images"]``;
        stage ppo refuses images."""
        if not self.prompts_with_images:
            return self._refuse(ex) or super().encode_ppo(ex)
        found = self._prompt_images(ex)
        if found is None:
            return super().encode_ppo(ex)
        images, grids, prompt = found
        row = super().encode_ppo(type(ex)(prompt=prompt, responses=list(ex.responses), kind=ex.kind,
                                          system=ex.system, tools=ex.tools))
        return self._finish(row, images, grids, ("",))


class ImageCollator:
    """Wraps a stage's collator: the batch it makes plus the ``pixel_values`` / ``image_grid_thw`` of the same
    rows' images, computed here at batch time, in the order of their image tokens in the batch: sft rows in
    order; pairs (:class:`~llmtune.data.collator.PairwiseCollator`: all chosen rows, then all rejected) every
    row's images twice; a dpo mix (``DPOMixCollator``) the pairs so, and its ``sft_only`` rows under
    ``sft_pixel_values`` / ``sft_image_grid_thw``; kto rows (``KTOCollator``) their images once (the ``kl_`` rows
    share each row's prompt, so the stage reuses them). Other collators (ppo) refuse rows with images."""

    def __init__(self, collator, processor: QwenVLImageProcessor) -> None:
        self.collator, self.processor = collator, processor

    def __call__(self, rows: Sequence[dict]) -> dict:
        from llmtune.data.collator import DPOMixCollator, KTOCollator, PairwiseCollator, SFTCollator

        batch = self.collator(rows)
        c, proc = self.collator, self.processor
        if isinstance(c, DPOMixCollator):
            pairs = [r for r in rows if not r.get("sft_only")]
            batch.update(collate_images(pairs + pairs, proc))
            batch.update({"sft_" + k: v for k, v in collate_images([r for r in rows if r.get("sft_only")],
                                                                   proc).items()})
        elif isinstance(c, PairwiseCollator):
            batch.update(collate_images(list(rows) + list(rows), proc))
        elif isinstance(c, (SFTCollator, KTOCollator)):   # kto: the kl_ rows share each row's prompt images
            batch.update(collate_images(rows, proc))
        elif any(r.get("images") for r in rows):
            raise LLMTuneError(f"{type(c).__name__}: batches with images are not supported (stages sft, dpo, rm, "
                               "kto and grpo take images)")
        return batch
