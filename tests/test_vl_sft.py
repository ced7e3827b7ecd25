"""Images in sft data and a 2-step sft run of a tiny random-init Qwen2.5-VL on generated images: the sharegpt
``images`` column, ``<image>`` placeholders expanded to ``<|vision_start|>`` + n x ``<|image_pad|>`` +
``<|vision_end|>`` (n from the image's grid, checked against the model's own count), labels never on vision
tokens, one clear error when placeholders and images disagree, gradients reaching the vision tower."""

import json

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from llmtune.data.encode import Encoder  # noqa: E402
from llmtune.data.collator import SFTCollator  # noqa: E402
from llmtune.data.formats import convert  # noqa: E402
from llmtune.data.images import QwenVLImageProcessor  # noqa: E402
from llmtune.data.multimodal import (VisionTokens, collate_images, expand_image_placeholders,  # noqa: E402
                                     image_grid, images_intact, mask_vision_labels)
from llmtune.data.registry import DatasetAttr  # noqa: E402
from llmtune.data.templates import get_template  # noqa: E402
from llmtune.errors import LLMTuneError  # noqa: E402
from llmtune.models.config import ModelConfig  # noqa: E402
from llmtune.models.qwen_vl import QwenVL  # noqa: E402
from llmtune.tokenizer import Tokenizer  # noqa: E402
from llmtune.train.stages.causal_lm import causal_lm_stage  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
WORDS = ["[UNK]", "user", "assistant", "system", "describe", "the", "picture", "a", "red", "square", "blue", "and",
         "compare", "two", "pictures", "hello", "world", "it", "is", "You", "are", "helpful", "."]


def _tokenizer():
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIAL)
    return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]")


def _model(tok) -> QwenVL:
    torch.manual_seed(0)
    cfg = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "vocab_size": len(tok), "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "rms_norm_eps": 1e-6,
           "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
           "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
           "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
           "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
           "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                             "out_hidden_size": 32, "patch_size": 4, "spatial_merge_size": 2, "window_size": 16,
                             "fullatt_block_indexes": [1]}}
    model = QwenVL(ModelConfig.from_hf_dict(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _images(tmp_path):
    paths = []
    for i, (w, h, color) in enumerate([(40, 24, (255, 0, 0)), (24, 48, (0, 0, 255)), (32, 32, (0, 255, 0))]):
        arr = np.zeros((h, w, 3), np.uint8) + np.array(color, np.uint8)
        arr[h // 4: h // 2, w // 4: w // 2] = 255 - arr[0, 0]
        PIL.fromarray(arr).save(tmp_path / f"im{i}.png")
        paths.append(str(tmp_path / f"im{i}.png"))
    return paths


def _rows(tmp_path):
    p = _images(tmp_path)
    conv = lambda u, a: [{"from": "human", "value": u}, {"from": "gpt", "value": a}]  # noqa: E731
    return [{"conversations": conv("<image> describe the picture", "a red square"), "images": [p[0]]},
            {"conversations": conv("compare <image> and <image>", "a blue square and a red square"),
             "images": [p[1], p[2]]},
            {"conversations": conv("hello", "hello world")}]


def _attr():
    return DatasetAttr(name="mm", load_from="file", path="mm.json", formatting="sharegpt",
                       columns={"messages": "conversations", "images": "images", "system": "system",
                                "tools": "tools"},
                       tags={"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                             "observation_tag": "observation", "function_tag": "function_call",
                             "system_tag": "system"})


def _encode(tmp_path, tok, proc, cutoff=512):
    examples, skipped = convert(_attr(), _rows(tmp_path))
    assert skipped == 0 and [len(e.images) for e in examples] == [1, 2, 0]
    vt = VisionTokens.from_tokenizer(tok)
    enc = Encoder(get_template("qwen", tok), tok, cutoff)
    rows = []
    for i, ex in enumerate(examples):
        grids = [image_grid(im, proc) for im in ex.images]
        msgs = expand_image_placeholders(ex.prompt + ex.responses, grids, proc, vt, f"mm row {i}")
        ex.prompt, ex.responses = msgs[:-1], msgs[-1:]
        row = mask_vision_labels(enc.encode_sft(ex), vt)
        assert images_intact(row, grids, proc, vt)
        row["images"] = ex.images
        rows.append(row)
    return rows, vt


def test_placeholders_expand_to_the_grid_and_labels_skip_vision_tokens(tmp_path):
    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    rows, vt = _encode(tmp_path, tok, proc)
    # 40x24 px -> smart_resize(24, 40, factor 8) = (24, 40) -> 6 x 10 patches -> 15 image tokens
    assert rows[0]["input_ids"].count(vt.pad_id) == 15
    # 24x48 -> 12 x 6 patches -> 18 tokens; 32x32 -> 8 x 8 -> 16 tokens
    assert rows[1]["input_ids"].count(vt.pad_id) == 18 + 16
    assert rows[2]["input_ids"].count(vt.pad_id) == 0
    for r in rows:
        for t, lab in zip(r["input_ids"], r["labels"]):
            if t in (vt.start_id, vt.pad_id, vt.end_id):
                assert lab == -100
    batch = collate_images(rows, proc)
    assert batch["image_grid_thw"].tolist() == [[1, 6, 10], [1, 12, 6], [1, 8, 8]]
    assert batch["pixel_values"].shape == (60 + 72 + 64, 3 * 2 * 4 * 4)


def test_placeholder_count_mismatch_is_one_clear_error(tmp_path):
    tok, proc = _tokenizer(), QwenVLImageProcessor(patch_size=4)
    msgs = [{"role": "user", "content": "<image> describe"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(LLMTuneError, match=r"mm row 3: 1 <image> placeholder\(s\) in the messages but 2 image"):
        expand_image_placeholders(msgs, [[1, 4, 4], [1, 4, 4]], proc, VisionTokens.from_tokenizer(tok), "mm row 3")


def test_two_sft_steps_train_language_model_and_vision_tower(tmp_path):
    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    rows, vt = _encode(tmp_path, tok, proc)
    model = _model(tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for padding_free in (False, True):      # a padded batch, then a packed one (M-RoPE per segment)
        batch = SFTCollator(tok.pad_token_id, padding_free=padding_free)(rows)
        batch.update(collate_images(rows, proc))
        loss_sum, n, _ = causal_lm_stage(model, batch, ctx=type("Ctx", (), {"config": None})())
        (loss_sum / n).backward()
        assert model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
        assert model.visual.merger.mlp[2].weight.grad.abs().sum() > 0
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(float((loss_sum / n).detach()))
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    json.dumps(rows)    # token rows (with image paths) stay JSON, as the dataset cache stores them


def _vl_folder(d):
    """A tiny random Qwen2.5-VL folder: config.json, model.safetensors (native layout), tokenizer files,
    preprocessor_config.json (patch 4)."""
    from safetensors.torch import save_file

    d.mkdir()
    tok = _tokenizer()
    tok.backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                         "unk_token": "[UNK]"}))
    model = _model(tok)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(model.config.raw))
    (d / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 16, "max_pixels": 64 * 64,
                                                            "patch_size": 4, "merge_size": 2}))
    return d


def test_sft_run_with_images_through_the_train_api(tmp_path):
    import llmtune

    folder = _vl_folder(tmp_path / "vl")
    data = tmp_path / "data"
    data.mkdir()
    rows = _rows(data)
    for r in rows:       # image paths relative to dataset_dir, as LLaMA-Factory's mllm_demo
        r["images"] = [p.rsplit("/", 1)[1] for p in r.get("images", [])]
    (data / "mm.json").write_text(json.dumps(rows * 2))
    (data / "dataset_info.json").write_text(json.dumps({"mm": {
        "file_name": "mm.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"}}}))
    out = tmp_path / "out"
    for packing in (False, True):
        res = llmtune.train(dict(stage="sft", model_name_or_path=str(folder), dataset="mm", dataset_dir=str(data),
                                 template="qwen2_vl", finetuning_type="full", output_dir=str(out / str(packing)),
                                 cutoff_len=256, per_device_train_batch_size=3, learning_rate=1e-3, max_steps=2,
                                 logging_steps=1, save_steps=1000, report_to="none", overwrite_cache=True,
                                 neat_packing=packing))
        assert np.isfinite(res["train_loss"])
    bad = [dict(rows[0], images=[])]
    (data / "mm.json").write_text(json.dumps(bad))
    with pytest.raises(LLMTuneError, match=r"1 <image> placeholder\(s\) in the messages but 0 image"):
        llmtune.train(dict(stage="sft", model_name_or_path=str(folder), dataset="mm", dataset_dir=str(data),
                           template="qwen", output_dir=str(out / "bad"), cutoff_len=256, max_steps=1,
                           report_to="none", overwrite_cache=True))


def test_gradient_checkpointing_through_the_vision_tower_gives_the_same_gradients(tmp_path):
    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    rows, _ = _encode(tmp_path, tok, proc)
    batch = SFTCollator(tok.pad_token_id)(rows)
    batch.update(collate_images(rows, proc))
    grads = []
    for ckpt in (False, True):
        model = _model(tok).train()
        model.gradient_checkpointing_enable(ckpt)
        assert model.visual.gradient_checkpointing is ckpt
        loss_sum, n, _ = causal_lm_stage(model, batch, ctx=type("Ctx", (), {"config": None})())
        (loss_sum / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("visual.blocks.0") for k in grads[0])
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k


def test_full_finetuning_output_loads_in_transformers_with_equal_logits(tmp_path):
    """The run's output folder (config.json + model.safetensors written by llmtune) is a Qwen2.5-VL checkpoint
    for transformers: reloaded there, its logits equal llmtune's own reload on a batch with images."""
    transformers = pytest.importorskip("transformers")
    import llmtune
    from llmtune.models.loader import load_model

    folder = _vl_folder(tmp_path / "vl")
    data = tmp_path / "data"
    data.mkdir()
    rows = _rows(data)
    (data / "mm.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"mm": {
        "file_name": "mm.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"}}}))
    out = tmp_path / "out"
    llmtune.train(dict(stage="sft", model_name_or_path=str(folder), dataset="mm", dataset_dir=str(data),
                       template="qwen", finetuning_type="full", output_dir=str(out), cutoff_len=256,
                       per_device_train_batch_size=3, learning_rate=1e-2, max_steps=1, report_to="none",
                       overwrite_cache=True, freeze_vision_tower=False, freeze_multi_modal_projector=False))
    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    (tmp_path / "again").mkdir()
    enc_rows, _ = _encode(tmp_path / "again", tok, proc)
    batch = SFTCollator(tok.pad_token_id)(enc_rows)
    batch.update(collate_images(enc_rows, proc))
    ours = load_model(out, dtype="float32")
    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    trained = dict(ours.named_parameters())["visual.blocks.0.attn.qkv.weight"]
    base = load_model(folder, dtype="float32")
    assert not torch.equal(trained, dict(base.named_parameters())["visual.blocks.0.attn.qkv.weight"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vt = VisionTokens.from_tokenizer(tok)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                   image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(ids == vt.pad_id).long()).logits
        got = ours.logits(ours(ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                               image_grid_thw=batch["image_grid_thw"]))
    assert (got[mask.bool()] - want[mask.bool()]).abs().max().item() <= 1e-5


def test_freeze_keys_select_the_trained_parts():
    """LLaMA-Factory's defaults: vision tower and projector frozen, language model trained."""
    from llmtune.config import parse_config
    from llmtune.train.finetuning import apply_finetuning_type

    tok = _tokenizer()
    for keys, trained in (({}, {"language"}),
                          ({"freeze_vision_tower": False}, {"language", "vision"}),
                          ({"freeze_multi_modal_projector": False, "freeze_language_model": True}, {"projector"})):
        model = _model(tok)
        cfg = parse_config(dict(stage="sft", finetuning_type="full", output_dir="unused", **keys), command=None)
        apply_finetuning_type(model, cfg)
        parts = {("language" if not n.startswith("visual.") else "projector" if ".merger." in "." + n[7:]
                  else "vision") for n, p in model.named_parameters() if p.requires_grad}
        assert parts == trained, keys


def test_qwen2_vl_template_renders_chatml_with_its_system_prompt(tmp_path):
    """LLaMA-Factory's qwen2_vl template: ChatML with "You are a helpful assistant." (Qwen2-VL's chat template
    default); the vision tokens sit where the placeholder was, inside the user turn."""
    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    vt = VisionTokens.from_tokenizer(tok)
    msgs = expand_image_placeholders([{"role": "user", "content": "<image> describe"},
                                      {"role": "assistant", "content": "a red square"}],
                                     [[1, 2, 2]], proc, vt, "row")
    from llmtune.data.formats import Example

    row = Encoder(get_template("qwen2_vl", tok), tok, 256).encode_sft(Example(prompt=msgs[:1], responses=msgs[1:]))
    # the word-level test tokenizer splits at whitespace: "assistant." is an unknown word
    want = ("<|im_start|> system You are a helpful [UNK] <|im_end|> <|im_start|> user <|vision_start|> "
            "<|image_pad|> <|vision_end|> describe <|im_end|> <|im_start|> assistant a red square <|im_end|>")
    assert tok.convert_ids_to_tokens(row["input_ids"]) == want.split()


def test_example_dataset_and_config(tmp_path):
    """examples/vlm_lora.yaml parses; its dataset (examples/data/shapes_vl) encodes for a Qwen-VL model: every
    row keeps its images, as many pad tokens as the processor's grids give."""
    from pathlib import Path

    from llmtune.config import parse_config
    from llmtune.data import get_dataset

    root = Path(__file__).resolve().parents[1]
    cfg = parse_config(str(root / "examples" / "vlm_lora.yaml"), command="train")
    assert (cfg.template, cfg.dataset, cfg.freeze_vision_tower) == ("qwen2_vl", "shapes_vl", True)
    folder = _vl_folder(tmp_path / "vl")
    tok = _tokenizer()
    rows = get_dataset(dict(model_name_or_path=str(folder), dataset="shapes_vl",
                            dataset_dir=str(root / "examples" / "data"), cutoff_len=1024, overwrite_cache=True,
                            data_cache_dir=str(tmp_path / "cache")),
                       tok, get_template("qwen2_vl", tok), "sft").train
    proc = QwenVLImageProcessor.from_folder(folder)
    vt = VisionTokens.from_tokenizer(tok)
    assert len(rows) == 18 and sum(len(r["images"]) for r in rows) == 24
    for r in rows:
        grids = [image_grid(p, proc) for p in r["images"]]
        assert r["input_ids"].count(vt.pad_id) == sum(proc.num_image_tokens(g) for g in grids) > 0


def _pair_rows(tmp_path):
    p = _images(tmp_path)
    return [{"conversations": [{"from": "human", "value": "<image> describe the picture"}],
             "chosen": {"from": "gpt", "value": "a red square"}, "rejected": {"from": "gpt", "value": "a blue square"},
             "images": [p[0]]},
            {"conversations": [{"from": "human", "value": "compare <image> and <image>"}],
             "chosen": {"from": "gpt", "value": "a blue and a green square"},
             "rejected": {"from": "gpt", "value": "two red squares"}, "images": [p[1], p[2]]},
            {"conversations": [{"from": "human", "value": "hello"}],
             "chosen": {"from": "gpt", "value": "hello world"}, "rejected": {"from": "gpt", "value": "it is"}}]


def test_dpo_pairs_with_images_give_each_sequence_its_own_images(tmp_path):
    """The pairwise batch (all chosen rows, then all rejected) with each pair's images repeated: every
    sequence's summed log-probs equal a forward of that sequence alone with its own images."""
    from llmtune.data.collator import PairwiseCollator
    from llmtune.data.multimodal import ImageCollator, ImageEncoder, vision_inputs
    from llmtune.losses import sequence_logps

    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    attr = _attr()
    attr.ranking = True
    attr.columns.update(chosen="chosen", rejected="rejected")
    examples, _ = convert(attr, _pair_rows(tmp_path))
    enc = ImageEncoder(get_template("qwen2_vl", tok), tok, 512, processor=proc, dataset="pairs")
    enc.pairs_with_images = True
    rows = [enc.encode_pair(ex, *ex.responses) for ex in examples]
    batch = ImageCollator(PairwiseCollator(tok.pad_token_id), proc)(rows)
    model = _model(tok).eval()
    with torch.no_grad():
        hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], **vision_inputs(batch))
        got = sequence_logps(hidden, model.lm_head.weight, batch["labels"])
        want = []
        for side in ("chosen", "rejected"):
            for r in rows:
                one = {"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"], "images": r.get("images")}
                b = SFTCollator(tok.pad_token_id)([one])
                b.update(collate_images([one], proc))
                h = model(b["input_ids"], **vision_inputs(b))
                want.append(sequence_logps(h, model.lm_head.weight, b["labels"])[0])
    assert torch.allclose(got, torch.stack(want), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="no pixel_values"):    # a stage that forgets the images fails loudly
        model(batch["input_ids"], attention_mask=batch["attention_mask"])


def test_dpo_run_with_images_through_the_train_api(tmp_path):
    import llmtune

    folder = _vl_folder(tmp_path / "vl")
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.json").write_text(json.dumps(_pair_rows(data) * 2))
    (data / "dataset_info.json").write_text(json.dumps({"pairs": {
        "file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}}))
    res = llmtune.train(dict(stage="dpo", model_name_or_path=str(folder), dataset="pairs", dataset_dir=str(data),
                             template="qwen2_vl", finetuning_type="lora", lora_rank=4,
                             output_dir=str(tmp_path / "out"), cutoff_len=256, per_device_train_batch_size=3,
                             learning_rate=1e-3, max_steps=2, logging_steps=1, report_to="none",
                             overwrite_cache=True))
    assert np.isfinite(res["train_loss"])
