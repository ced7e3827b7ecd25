"""LoRA / rsLoRA / DoRA layers, adapter control and freeze tuning, checked against the papers' formulas
written out here (Hu et al. 2021 eq. 3; Kalajdzievski 2023; Liu et al. 2024 eq. 5) and hand-built cases.
The comparisons with peft itself are in test_lora_peft.py."""

import math

import pytest
import torch
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.models.config import ModelConfig
from llmtune.models.transformer import Transformer
from llmtune.peft import (
    LoraLinear,
    ModulesToSave,
    active_adapter,
    apply_freeze,
    apply_lora,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    lora_state_dict,
    merge_adapters,
    merged_weight,
    save_adapter,
    set_adapter,
    unmerge_adapters,
)


def tiny_config(**kw):
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
               tie_word_embeddings=False)
    cfg.update(kw)
    return ModelConfig.from_hf_dict(cfg)


def tiny_model(**kw):
    torch.manual_seed(0)
    return Transformer(tiny_config(**kw)).eval()


def randomize(model, scale=0.2):
    """Random non-zero B (and magnitudes) so the adapters change the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                for b in m.lora_B.values():
                    b.weight.copy_(torch.randn(b.weight.shape, generator=g) * scale)
                for mag in m.lora_magnitude_vector.values():
                    mag.mul_(1 + 0.1 * torch.randn(mag.shape, generator=g))


def logits(model, ids):
    with torch.no_grad():
        return model.lm_head(model(ids)).float()


IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41], [3, 3, 8, 60, 12, 0, 22, 19]])


# --- one layer against the formulas ---------------------------------------------------------------
def test_lora_linear_formula_and_init():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    layer = LoraLinear(base)
    layer.update_layer("default", r=4, lora_alpha=8)
    a = layer.lora_A["default"].weight
    # Kaiming-uniform(a=sqrt(5)) on (r, in): bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5))
    bound = math.sqrt(2 / 6) * math.sqrt(3 / 16)
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))  # starts as the base exactly
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    b = layer.lora_B["default"].weight
    expected = x @ base.weight.T + base.bias + (8 / 4) * (x @ a.T @ b.T)  # Hu et al. eq. 3
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_rslora_scaling():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=False)
    layer = LoraLinear(base)
    layer.update_layer("default", r=4, lora_alpha=8, use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(7, 16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), x @ base.weight.T + 4.0 * (x @ a.T @ b.T), atol=1e-5, rtol=1e-5)


def test_dora_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    layer = LoraLinear(base)
    layer.update_layer("default", r=4, lora_alpha=8, use_dora=True)
    w0 = base.weight.detach()
    # magnitude starts at the row norms of W0 (out,), so the layer starts as the base
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), w0.norm(dim=1))
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, 12))
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    m = layer.lora_magnitude_vector["default"].detach()
    v = w0 + 2.0 * b @ a  # Liu et al. eq. 5: W' = m * V / ||V||, norm per output row in (out, in) layout
    w_new = m[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w_new.T + base.bias, atol=1e-5, rtol=1e-5)
    # the norm is detached (paper section 4.3): grad of sum(y) wrt m is sum_batch (V x / ||V||)
    base.requires_grad_(False)
    layer(x).sum().backward()
    gm = ((x @ v.T) / v.norm(dim=1)).sum(0)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].grad, gm, atol=1e-4, rtol=1e-4)
    # grad wrt B treats 1/||V|| as a constant: d/dB sum(m/||V|| * s * B A x) = s * (m/||V||)[:,None] * sum(A x)
    gb = 2.0 * (m / v.norm(dim=1))[:, None] * (x @ a.T).sum(0)[None, :]
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, gb, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_roundtrip(use_dora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    w0 = base.weight.detach().clone()
    layer = LoraLinear(base)
    layer.update_layer("default", r=4, lora_alpha=8, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 16)
    y = layer(x).detach()
    layer.merge()
    assert layer.merged_adapters == ["default"]
    assert not torch.allclose(base.weight, w0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_weight(layer), base.weight.detach(), atol=1e-6, rtol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


class FakeLinear4bit(nn.Module):
    """Stand-in for llmtune.quant.Linear4bit: packed storage, dequantize() and forward()."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("packed", weight.to(torch.bfloat16))
        self.bias = bias
        self.compute_dtype = torch.float32

    def dequantize(self):
        return self.packed.to(self.compute_dtype)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(), self.bias)


def test_quantized_base():
    torch.manual_seed(0)
    w = torch.randn(12, 16)
    q = FakeLinear4bit(w)
    layer = LoraLinear(q)
    layer.update_layer("default", r=4, lora_alpha=4)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected_w = q.dequantize() + b @ a
    torch.testing.assert_close(layer(x), x @ expected_w.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_weight(layer), expected_w.detach(), atol=1e-6, rtol=1e-6)
    with pytest.raises(LLMTuneError, match="quantized"):
        layer.merge()


# --- whole model ----------------------------------------------------------------------------------
def test_apply_lora_starts_equal_and_freezes():
    model = tiny_model()
    ref = logits(model, IDS)
    apply_lora(model, lora_rank=4, lora_target="all")
    assert torch.equal(logits(model, IDS), ref)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    leaves = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(wrapped) == 7 * 3 and "lm_head" not in wrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0  # alpha default 2r, alpha/r
    # PEFT's module layout: base_layer + lora_A.default
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in sd
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in sd
    keys = lora_state_dict(model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"].shape == (32, 4)


def test_lora_target_names_and_errors():
    model = tiny_model()
    apply_lora(model, lora_rank=2, lora_target="q_proj, v_proj")
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear))
    assert wrapped == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj"))
    with pytest.raises(LLMTuneError) as e:
        apply_lora(tiny_model(), lora_target="value")
    msg = str(e.value)
    assert "lora_target" in msg and "'value'" in msg and "q_proj" in msg and "down_proj" in msg
    with pytest.raises(LLMTuneError, match="additional_target"):
        apply_lora(tiny_model(), lora_target="embed_tokens")
    with pytest.raises(LLMTuneError, match="additional_target"):
        apply_lora(tiny_model(), additional_target="embed_tokenz")
    model = tiny_model()
    apply_lora(model, lora_target=["lm_head"])  # explicit lm_head is allowed
    assert isinstance(model.lm_head, LoraLinear)


@pytest.mark.parametrize("use_dora", [False, True])
def test_weight_attribute_includes_adapters(use_dora):
    """Losses project with F.linear(h, model.lm_head.weight): a LoRA-wrapped lm_head must still apply."""
    model = tiny_model()
    apply_lora(model, lora_rank=4, lora_target="lm_head,q_proj", use_dora=use_dora)
    randomize(model)
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(nn.functional.linear(h, model.lm_head.weight), model.lm_head(h),
                               atol=1e-5, rtol=1e-5)
    nn.functional.linear(h, model.lm_head.weight).sum().backward()
    assert model.lm_head.lora_B["default"].weight.grad.abs().sum() > 0
    with disable_adapters(model):
        assert model.lm_head.weight is model.lm_head.base_layer.weight


def test_disable_adapters_gives_base():
    model = tiny_model()
    ref = logits(model, IDS)
    apply_lora(model, lora_rank=4, additional_target="lm_head")
    randomize(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.5)
    tuned = logits(model, IDS)
    assert (tuned - ref).abs().max() > 1e-2
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, IDS), ref, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, IDS), tuned, atol=0, rtol=0)


def test_multiple_adapters_switching():
    model = tiny_model()
    apply_lora(model, lora_rank=4, lora_target="q_proj,o_proj", adapter_name="a")
    randomize(model)
    only_a = logits(model, IDS)
    apply_lora(model, lora_rank=2, lora_alpha=8, lora_target="q_proj", adapter_name="b")
    assert list_adapters(model) == ["a", "b"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.active_adapters == ["b"] and q.scaling["b"] == 4.0
    # only b's parameters train after applying b
    assert not q.lora_A["a"].weight.requires_grad and q.lora_A["b"].weight.requires_grad
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoraLinear) and "b" in m.lora_B:
                m.lora_B["b"].weight.normal_()
    only_b = logits(model, IDS)
    set_adapter(model, "a")
    torch.testing.assert_close(logits(model, IDS), only_a, atol=0, rtol=0)
    with active_adapter(model, "b"):
        torch.testing.assert_close(logits(model, IDS), only_b, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, IDS), only_a, atol=0, rtol=0)
    # hand check of one layer with b active: base + 4 * B_b A_b x
    x = torch.randn(2, 32)
    set_adapter(model, "b")
    expected = q.base_layer(x) + 4.0 * (x @ q.lora_A["b"].weight.T @ q.lora_B["b"].weight.T)
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(LLMTuneError, match="no adapter named 'c'"):
        set_adapter(model, "c")
    with pytest.raises(LLMTuneError, match="already has an adapter"):
        apply_lora(model, adapter_name="a")
    delete_adapter(model, "b")
    assert list_adapters(model) == ["a"]
    set_adapter(model, "a")
    torch.testing.assert_close(logits(model, IDS), only_a, atol=0, rtol=0)
    delete_adapter(model, "a")
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_adapters_unloads(use_dora):
    model = tiny_model()
    names = set(model.state_dict())
    apply_lora(model, lora_rank=4, use_dora=use_dora, additional_target="norm")
    randomize(model)
    with torch.no_grad():
        model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    tuned = logits(model, IDS)
    merge_adapters(model)
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())
    assert set(model.state_dict()) == names
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(model, IDS), tuned, atol=1e-5, rtol=1e-5)


def test_merge_in_place_and_unmerge():
    model = tiny_model()
    apply_lora(model, lora_rank=4, use_dora=True)
    randomize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    tuned = logits(model, IDS)
    merge_adapters(model, unload=False)
    torch.testing.assert_close(logits(model, IDS), tuned, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p.detach(), before[n], atol=1e-6, rtol=1e-6)


def test_tied_lm_head_merge_unties():
    model = tiny_model(tie_word_embeddings=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    apply_lora(model, lora_rank=4, lora_target="lm_head")
    randomize(model)
    tuned = logits(model, IDS)
    merge_adapters(model)
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), emb, atol=0, rtol=0)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(model, IDS), tuned, atol=1e-5, rtol=1e-5)


def test_upcast_bf16_base():
    model = tiny_model().to(torch.bfloat16)
    ref = logits(model, IDS)
    apply_lora(model, lora_rank=4, additional_target="lm_head")
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.dtype == torch.float32
    assert q.base_layer.weight.dtype == torch.bfloat16
    assert model.lm_head.modules_to_save["default"].weight.dtype == torch.float32
    out = model(IDS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(logits(model, IDS), ref, atol=2e-2, rtol=0)  # lm_head copy runs in f32
    with torch.no_grad():  # B starts at zero, which would make A's gradient zero: give B values first
        q.lora_B["default"].weight.normal_(0, 0.1)
    model.lm_head(model(IDS)).float().logsumexp(-1).sum().backward()
    for w in (q.lora_A["default"].weight, q.lora_B["default"].weight,
              model.lm_head.modules_to_save["default"].weight):
        assert w.grad is not None and w.grad.dtype == torch.float32
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    apply_lora(m2 := tiny_model().to(torch.bfloat16), lora_rank=4, upcast=False)
    assert m2.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_lora_forward_and_grads_match_a_float64_reference(autocast):
    """A bf16 base with float32 adapters under bf16 autocast (the trainer's setting: one fused accumulate of the
    rank-r product into the base output) and bf16 adapters without autocast: output and adapter gradients
    against Hu et al. eq. 3 in float64 from the same (bf16-rounded) values."""
    torch.manual_seed(0)
    base = nn.Linear(40, 24, bias=True).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.update_layer("default", r=3, lora_alpha=6, dtype=torch.float32 if autocast else torch.bfloat16)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    x = torch.randn(2, 7, 40).to(torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = torch.randn(2, 7, 24, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    (out.double() * g).sum().backward()
    x64, w64, bias64 = x.double(), base.weight.double(), base.bias.double()
    a64, b64 = (t.detach().to(torch.bfloat16).double().requires_grad_() for t in (a, b))
    ref = x64 @ w64.T + bias64 + 2.0 * (x64 @ a64.T @ b64.T)
    (ref * g).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.02)  # bf16 output: 2**-8 relative
    for p_, r_ in ((a, a64), (b, b64)):
        assert p_.grad.dtype == p_.dtype
        torch.testing.assert_close(p_.grad.double(), r_.grad, atol=0.05 * r_.grad.abs().max().item(), rtol=0.03)


def test_dropout_only_in_training():
    model = tiny_model()
    apply_lora(model, lora_rank=4, lora_dropout=0.5)
    randomize(model)
    eval_out = logits(model, IDS)
    torch.testing.assert_close(logits(model, IDS), eval_out, atol=0, rtol=0)
    model.train()
    assert not torch.allclose(logits(model, IDS), eval_out)


def test_save_load_roundtrip_and_errors(tmp_path):
    model = tiny_model()
    apply_lora(model, lora_rank=4, lora_target="q_proj,v_proj", use_dora=True, additional_target="lm_head")
    randomize(model)
    tuned = logits(model, IDS)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(tmp_path))
    import json

    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_dora"]
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["modules_to_save"] == ["lm_head"]
    assert cfg["base_model_name_or_path"] == str(tmp_path.resolve()) and cfg["task_type"] == "CAUSAL_LM"
    fresh = tiny_model()
    load_adapter(fresh, tmp_path / "ad")
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)
    torch.testing.assert_close(logits(fresh, IDS), tuned, atol=1e-6, rtol=1e-6)
    # resume training: adapter trainable, base frozen
    fresh2 = tiny_model()
    load_adapter(fresh2, tmp_path / "ad", is_trainable=True)
    trainable = {n for n, p in fresh2.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    # wrong rank in the config -> shape mismatch naming the dir, key and shapes
    cfg["r"] = 8
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMTuneError) as e:
        load_adapter(tiny_model(), tmp_path / "ad")
    msg = str(e.value)
    assert str(tmp_path / "ad") in msg and "lora_A.weight" in msg and "(4, 32)" in msg and "(8, 32)" in msg
    with pytest.raises(LLMTuneError, match="no adapter_config.json"):
        load_adapter(tiny_model(), tmp_path)
    with pytest.raises(LLMTuneError, match="does not exist"):
        load_adapter(tiny_model(), tmp_path / "nope")
    # an adapter for a bigger model -> the message names the key and both shapes
    big = Transformer(tiny_config(hidden_size=48, intermediate_size=64))
    apply_lora(big, lora_rank=4, lora_target="q_proj")
    save_adapter(big, tmp_path / "big", base_model_name_or_path="some/hub-id")
    with pytest.raises(LLMTuneError, match=r"q_proj\.lora_A\.weight has shape \(4, 48\).*\(4, 32\)"):
        load_adapter(tiny_model(), tmp_path / "big")


# --- freeze ---------------------------------------------------------------------------------------
def test_apply_freeze_last_layers():
    model = tiny_model()
    apply_freeze(model, freeze_trainable_layers=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2."))}
    assert trainable == expected


def test_apply_freeze_first_layers_modules_extra():
    model = tiny_model().to(torch.bfloat16)
    apply_freeze(model, freeze_trainable_layers=-1, freeze_trainable_modules="mlp,input_layernorm",
                 freeze_extra_modules=["embed_tokens", "norm"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                         "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
                         "model.embed_tokens.weight", "model.norm.weight"}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(LLMTuneError, match="freeze_trainable_modules.*'mlpp'.*self_attn"):
        apply_freeze(tiny_model(), freeze_trainable_modules="mlpp")
    with pytest.raises(LLMTuneError, match="freeze_extra_modules.*lm_head"):
        apply_freeze(tiny_model(), freeze_extra_modules="lm_headd")
    m = tiny_model()
    apply_freeze(m, freeze_trainable_layers=10)
    assert all(p.requires_grad for n, p in m.named_parameters() if ".layers." in n)
