"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL against transformers' classes (test-only reference): tiny random-init
models, weights copied name for name, float32 logits equal at the real tokens (<= 1e-5) on batches with
several images of different sizes and aspect ratios, text-only rows, left and right padding; M-RoPE ids equal
to ``get_rope_index``; the loader reads transformers' ``save_pretrained`` folder."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmtune.models.config import ModelConfig  # noqa: E402
from llmtune.models.qwen_vl import QwenVL, native_name  # noqa: E402

IMG, VID, VSTART, VEND = 290, 291, 292, 293
PATCH, MERGE = 4, 2


def _hf_model(family: str):
    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                      spatial_merge_size=MERGE)
        cfg, cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      patch_size=PATCH, spatial_merge_size=MERGE, window_size=2 * MERGE * PATCH,
                      fullatt_block_indexes=[1, 3], tokens_per_second=2)
        cfg, cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                  "mrope_interleaved": True, "rope_theta": 10000.0})
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      patch_size=PATCH, spatial_merge_size=MERGE, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 2])
        cfg, cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    model = cls(cfg(text_config=text, vision_config=vision, **ids)).eval()
    with torch.no_grad():   # the init leaves some norms at one and biases at zero: make every weight matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ours(hf) -> QwenVL:
    cfg = hf.config.to_dict()
    cfg["architectures"] = [type(hf).__name__]
    model = QwenVL(ModelConfig.from_hf_dict(cfg)).eval()
    state = {native_name(k): v for k, v in hf.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if m != "inv_freq"], (missing, unexpected)
    return model


def _image_tokens(grid):
    return [VSTART] + [IMG] * (grid[0] * grid[1] * grid[2] // MERGE ** 2) + [VEND]


def _batch(rows, left: bool):
    """rows: lists of token ids (each image already expanded); padded with 0 on the left or right."""
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def _inputs(left: bool):
    g = torch.Generator().manual_seed(1)
    grids = [[1, 4, 6], [1, 8, 4], [1, 6, 10]]          # different sizes and aspect ratios (in patches)
    text = lambda n: torch.randint(3, 280, (n,), generator=g).tolist()  # noqa: E731
    rows = [text(3) + _image_tokens(grids[0]) + text(4),
            text(2) + _image_tokens(grids[1]) + text(3) + _image_tokens(grids[2]) + text(2),
            text(11)]                                      # a text-only row
    ids, mask = _batch(rows, left)
    grid_thw = torch.tensor(grids)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * PATCH * PATCH, generator=g)
    return ids, mask, pixels, grid_thw


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("left", [False, True])
def test_logits_match_transformers(family, left):
    hf = _hf_model(family)
    ours = _ours(hf)
    ids, mask, pixels, grid = _inputs(left)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                 mm_token_type_ids=(ids == IMG).long()).logits
        got = ours.logits(ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid))
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_text_only_matches_transformers(family):
    hf = _hf_model(family)
    ours = _ours(hf)
    ids, mask = _batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]], left=True)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours.logits(ours(ids, attention_mask=mask))
    assert (got[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_mrope_ids_match_get_rope_index(family):
    hf = _hf_model(family)
    ours = _ours(hf)
    grids = torch.tensor([[1, 4, 6], [1, 6, 10]])
    vgrid = torch.tensor([[3, 4, 8]])
    row = [5, 6] + _image_tokens(grids[0].tolist()) + [7, VSTART] + [VID] * (3 * 4 * 8 // 4) + [VEND, 8] \
        + _image_tokens(grids[1].tolist()) + [9]
    if family == "qwen3_vl":   # Qwen3-VL: each video frame is its own run (a timestamp precedes each frame)
        frame = [VSTART] + [VID] * 8 + [VEND]
        row = [5, 6] + _image_tokens(grids[0].tolist()) + [7, 40] + frame + [41] + frame + [42] + frame + [8] \
            + _image_tokens(grids[1].tolist()) + [9]
    ids, mask = _batch([row, [3, 4, 5]], left=True)
    types = (ids == IMG).long() + 2 * (ids == VID).long()
    kw = dict(image_grid_thw=grids, video_grid_thw=vgrid, attention_mask=mask)
    if family == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor([1.5])
    ref, ref_delta = hf.model.get_rope_index(ids, types, **kw)
    got, delta = ours.position_ids(ids, mask, grids, vgrid, kw.get("second_per_grid_ts"))
    assert torch.equal(got[:, mask.bool()], ref[:, mask.bool()])
    assert torch.equal(delta.view(-1), ref_delta.view(-1))


def test_loader_reads_save_pretrained_folder(tmp_path):
    from llmtune.models.loader import load_model

    hf = _hf_model("qwen2_5_vl")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype="float32")
    ids, mask, pixels, grid = _inputs(left=False)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                 mm_token_type_ids=(ids == IMG).long()).logits
        got = ours.logits(ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid))
    assert isinstance(ours, QwenVL)
    assert (got[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_rows_equal_padded_rows(family):
    """Padding-free batches (one row, segment ids 1, 2, 3 in attention_mask): M-RoPE counts from 0 in each
    segment, so the logits equal the right-padded batch's (checked against transformers above)."""
    ours = _ours(_hf_model(family))
    ids, mask, pixels, grid = _inputs(left=False)
    lengths = mask.sum(1).tolist()
    packed_ids = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]
    seg = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        padded = ours.logits(ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid))
        packed = ours.logits(ours(packed_ids, attention_mask=seg, pixel_values=pixels, image_grid_thw=grid))
    assert (packed[0] - padded[mask.bool()]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_video_and_image_logits_match_transformers(family):
    """A video (4 frames -> 2 temporal patches) beside an image and a text-only row; Qwen3-VL writes each
    temporal patch as its own run after a timestamp token, Qwen2.5-VL spaces time ids by second_per_grid_ts."""
    hf = _hf_model(family)
    ours = _ours(hf)
    g = torch.Generator().manual_seed(2)
    vgrid, igrid = torch.tensor([[2, 4, 6]]), torch.tensor([[1, 6, 4]])
    if family == "qwen3_vl":
        video = [40] + [VSTART] + [VID] * 6 + [VEND] + [41] + [VSTART] + [VID] * 6 + [VEND]
    else:
        video = [VSTART] + [VID] * 12 + [VEND]
    ids, mask = _batch([[5, 6] + video + [7] + _image_tokens(igrid[0].tolist()) + [8, 9], [10, 11, 12]], left=True)
    pv = torch.randn(2 * 4 * 6, 3 * 2 * PATCH * PATCH, generator=g)
    pi = torch.randn(6 * 4, 3 * 2 * PATCH * PATCH, generator=g)
    kw = dict(pixel_values=pi, image_grid_thw=igrid, pixel_values_videos=pv, video_grid_thw=vgrid)
    if family == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor([2.5])
    types = (ids == IMG).long() + 2 * (ids == VID).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **kw).logits
        got = ours.logits(ours(ids, attention_mask=mask, **kw))
    assert (got[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_cached_decoding_after_an_image_prefill_equals_the_full_forward(family):
    """Prefill with images into a KVCache, then two decode steps: the text after the prompt continues at
    cache length + rope_deltas, so each step's logits equal the full forward's (itself equal to transformers')."""
    ours = _ours(_hf_model(family))
    ids, mask, pixels, grid = _inputs(left=True)
    more = torch.tensor([[17, 18], [19, 20], [21, 22]])
    full_ids = torch.cat([ids, more], 1)
    full_mask = torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        full = ours.logits(ours(full_ids, attention_mask=full_mask, pixel_values=pixels, image_grid_thw=grid))
        _, cache = ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, use_cache=True)
        for k in range(2):
            t = ids.shape[1] + k
            h, cache = ours(more[:, k:k + 1], attention_mask=full_mask[:, :t + 1], past_key_values=cache)
            assert (ours.logits(h)[:, 0] - full[:, t]).abs().max().item() <= 1e-5


def test_bfloat16_model_keeps_float32_rotary_frequencies():
    """After model.to(bfloat16) (which casts buffers) M-RoPE still uses float32 inverse frequencies: the bf16
    model's logits stay close to the float32 model's (bf16 rounding only, no large position errors)."""
    ours = _ours(_hf_model("qwen2_5_vl"))
    ids, mask, pixels, grid = _inputs(left=False)
    with torch.no_grad():
        ref = ours.logits(ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid))
        ours.to(torch.bfloat16)
        got = ours.logits(ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)).float()
    assert ours.inv_freq.dtype == torch.float32
    assert (got[mask.bool()] - ref[mask.bool()]).abs().max().item() < 0.1
