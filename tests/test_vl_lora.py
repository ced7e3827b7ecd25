"""LoRA on vision-language models: which layers get adapters under LLaMA-Factory's freeze keys (vision blocks only
with ``freeze_vision_tower: false``), gradients reaching every adapter, and a VL adapter exported with
``llmtune export`` (merged into the base) or loaded by peft onto transformers' Qwen2.5-VL / Qwen3-VL: the
logits equal llmtune's unmerged LoRA model on a batch with images (float32, <= 1e-5)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_qwen_vl import IMG, _hf_model, _inputs  # noqa: E402
from test_vl_sft import _model, _tokenizer  # noqa: E402

from llmtune.config import parse_config  # noqa: E402
from llmtune.errors import LLMTuneError  # noqa: E402
from llmtune.peft import LoraLinear, save_adapter  # noqa: E402
from llmtune.train.finetuning import apply_finetuning_type  # noqa: E402


def _lora(model, **keys):
    cfg = parse_config(dict(stage="sft", finetuning_type="lora", lora_rank=2, output_dir="unused", **keys),
                       command=None)
    apply_finetuning_type(model, cfg)
    return {p for p, m in model.named_modules() if isinstance(m, LoraLinear)}


def _linear(model, pred):
    return {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pred(p)}


def test_lora_targets_follow_the_freeze_keys():
    """Expected sets written from LLaMA-Factory's rule: ``all`` = the decoder layers' linear layers, plus the
    vision blocks' when the tower is not frozen; never the merger, the patch embedding or lm_head."""
    tok = _tokenizer()
    lm = _linear(_model(tok), lambda p: p.startswith("model.layers."))
    blocks = _linear(_model(tok), lambda p: p.startswith("visual.blocks."))
    assert len(lm) == 14 and len(blocks) == 10          # 2 x 7 decoder, 2 x (qkv, proj, gate, up, down)
    assert _lora(_model(tok)) == lm
    assert _lora(_model(tok), freeze_vision_tower=False) == lm | blocks
    assert _lora(_model(tok), freeze_vision_tower=False, freeze_language_model=True) == blocks
    # names match wherever they are, then frozen parts drop out: gate_proj is in both the LM and the tower
    gate = lambda p: p.endswith("gate_proj")  # noqa: E731
    assert _lora(_model(tok), lora_target="gate_proj") == _linear(_model(tok), lambda p: gate(p) and "visual" not in p)
    assert _lora(_model(tok), lora_target="gate_proj", freeze_vision_tower=False) == _linear(_model(tok), gate)
    assert _lora(_model(tok), lora_target="mlp.0", freeze_multi_modal_projector=False) == {"visual.merger.mlp.0"}
    with pytest.raises(LLMTuneError, match="selects no linear layer outside the frozen parts"):
        _lora(_model(tok), lora_target="qkv")


def test_lora_gradients_reach_every_adapter_of_tower_and_language_model(tmp_path):
    from test_vl_sft import _encode

    from llmtune.data.collator import SFTCollator
    from llmtune.data.images import QwenVLImageProcessor
    from llmtune.data.multimodal import collate_images
    from llmtune.train.stages.causal_lm import causal_lm_stage

    tok, proc = _tokenizer(), QwenVLImageProcessor(min_pixels=16, max_pixels=64 * 64, patch_size=4)
    rows, _ = _encode(tmp_path, tok, proc)
    batch = SFTCollator(tok.pad_token_id)(rows)
    batch.update(collate_images(rows, proc))
    model = _model(tok).train()
    _lora(model, freeze_vision_tower=False)
    for m in model.modules():           # B = 0 at init would leave A without gradient
        if isinstance(m, LoraLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    loss_sum, n, _ = causal_lm_stage(model, batch, ctx=type("Ctx", (), {"config": None})())
    (loss_sum / n).backward()
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k for k in trainable)
    assert any(k.startswith("visual.blocks.0.attn.qkv") for k in trainable)
    for k, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, k


@pytest.mark.parametrize("family,cls", [("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                                        ("qwen3_vl", "Qwen3VLForConditionalGeneration")])
def test_lora_adapter_exports_and_loads_in_transformers_and_peft(tmp_path, family, cls):
    """Base + adapter (LoRA on the language model and the vision blocks) -> ``llmtune export`` -> transformers'
    class loads the folder; and peft loads the adapter folder onto transformers' base: both give llmtune's
    LoRA logits."""
    peft = pytest.importorskip("peft")
    from llmtune.export import export
    from llmtune.models.loader import load_model

    hf = _hf_model(family)
    base = tmp_path / "base"
    hf.save_pretrained(str(base))
    (base / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 16, "max_pixels": 4096}))
    ours = load_model(base, dtype="float32").eval()
    _lora(ours, freeze_vision_tower=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoraLinear):
                torch.nn.init.normal_(m.lora_B["default"].weight, std=0.2)
    adapter = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert r"model\.visual\.blocks\.\d+\.attn\.qkv" in cfg["target_modules"]
    ids, mask, pixels, grid = _inputs(left=True)
    real = mask.bool()
    with torch.no_grad():
        want = ours.logits(ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid))
    out = tmp_path / "merged"
    export(dict(model_name_or_path=str(base), adapter_name_or_path=str(adapter), export_dir=str(out),
                infer_dtype="float32", template="qwen2_vl"))
    assert json.loads((out / "preprocessor_config.json").read_text())["max_pixels"] == 4096
    merged = getattr(transformers, cls).from_pretrained(str(out), dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(_hf_model(family), str(adapter)).eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if ".lora_A." in n)
    assert n_lora == sum(1 for m in ours.modules() if isinstance(m, LoraLinear))
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=(ids == IMG).long())
    with torch.no_grad():
        for ref in (merged, peft_model):
            got = ref(**inputs).logits
            assert (got[real] - want[real]).abs().max().item() <= 1e-5
        plain = _hf_model(family)(**inputs).logits         # the adapter changes the logits at all
    assert (plain[real] - want[real]).abs().max().item() > 1e-2
