"""The Qwen-VL image processor against transformers' slow (PIL) Qwen2-VL image processor (test-only
reference): ``pixel_values`` and ``image_grid_thw`` equal on generated images of several sizes, aspect ratios
and modes (RGB, RGBA, grayscale, palette), including ones below ``min_pixels`` and above ``max_pixels``."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from llmtune.data.images import QwenVLImageProcessor, smart_resize  # noqa: E402


def _images(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w, mode) in enumerate([(60, 90, "RGB"), (123, 45, "RGBA"), (20, 30, "L"), (300, 200, "RGB"),
                                      (64, 64, "P"), (50, 250, "RGB")]):
        arr = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        img = PIL.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
        if mode in ("L", "P"):
            img = img.convert(mode)
        path = tmp_path / f"img{i}.png"
        img.save(path)
        out.append(path)
    return out


@pytest.mark.parametrize("settings", [
    dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
    dict(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16,
         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),          # Qwen3-VL's patch size and norm
])
def test_matches_transformers_pil_processor(tmp_path, settings):
    paths = _images(tmp_path)
    ref = transformers.Qwen2VLImageProcessorPil(**settings)(
        [PIL.open(p) for p in paths], return_tensors="pt")
    ours = QwenVLImageProcessor.from_dict(settings)([str(p) for p in paths])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-6


def test_smart_resize_hand_cases():
    # 60x90 with factor 28: rounded to 56x84 (area within bounds)
    assert smart_resize(60, 90, 28, 56 * 56, 28 * 28 * 1280) == (56, 84)
    # 20x30 is below min_pixels 3136: beta = sqrt(3136/600); ceil(20*2.286/28)*28 = 56, ceil(30*2.286/28)*28 = 84
    assert smart_resize(20, 30, 28, 56 * 56, 28 * 28 * 1280) == (56, 84)
    # 1000x1000 above max_pixels 100000: beta = sqrt(1e6/1e5); floor(316.2/28)*28 = 308
    assert smart_resize(1000, 1000, 28, 56 * 56, 100000) == (308, 308)
    with pytest.raises(ValueError):
        smart_resize(1, 300, 28)
