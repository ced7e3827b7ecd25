"""Linear4bit against dense float64 computations, the loader hook, and the real model with quantization_bit=4."""

import pytest
import torch
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.models.config import ModelConfig
from llmtune.models.transformer import Transformer
from llmtune.quant import Linear4bit, place_quantized


def _dense64(layer: Linear4bit) -> torch.Tensor:
    """float64 weight from the buffers, written here: code[nibble] * absmax[flat // blocksize]."""
    n = layer.out_features * layer.in_features
    p = layer.weight
    codes = torch.stack([p >> 4, p & 15], 1).reshape(-1)[:n].long()
    if layer.double_quant:
        q = layer.absmax.long()
        nb = q.numel()
        absmax = (layer.nested_quant_map.double()[q] * layer.nested_absmax.double().repeat_interleave(256)[:nb]
                  + layer.nested_offset.double())
    else:
        absmax = layer.absmax.double()
    absmax = absmax.float().double()  # the scales are float32 values
    return (layer.quant_map.double()[codes] * absmax.repeat_interleave(layer.blocksize)[:n]).view(
        layer.out_features, layer.in_features)


@pytest.mark.parametrize("in_features", [128, 100, 33])  # 100 and 33: not multiples of the block size 64
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_backward_vs_dense_float64(in_features, double_quant):
    out_features = 24
    w = torch.randn(out_features, in_features) * 0.05
    b = torch.randn(out_features)
    layer = Linear4bit.from_float(w, b, compute_dtype=torch.float32, double_quant=double_quant)
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    w64 = _dense64(layer)
    assert torch.allclose(layer.dequantize().double(), w64, rtol=1e-6, atol=0)
    assert (w64 - w.double()).abs().max() < 0.3 * w.abs().max()  # it is a 4-bit approximation of w
    x = torch.randn(3, 5, in_features, dtype=torch.float64).float().requires_grad_(True)
    y = layer(x)
    assert y.shape == (3, 5, out_features) and y.dtype == torch.float32
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(y.double(), x.detach().double() @ w64.t() + b.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gy.double() @ w64, rtol=1e-5, atol=1e-5)


def test_bf16_compute_and_trainable_bias():
    w = torch.randn(16, 64)
    layer = Linear4bit.from_float(w, torch.zeros(16))  # compute_dtype bf16 by default
    assert layer.dequantize().dtype == torch.bfloat16 and layer.dequantize().shape == (16, 64)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input dtype
    y.sum().backward()
    w64 = _dense64(layer)
    torch.testing.assert_close(layer.bias.grad.float(), torch.full((16,), 4.0))
    torch.testing.assert_close(x.grad.double(), torch.ones(4, 16, dtype=torch.float64) @ w64, rtol=2e-2, atol=2e-2)
    ref = x.detach().double() @ w64.t()
    assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_memory_under_0_6_bytes_per_param():
    for shape in [(576, 576), (192, 576), (1536, 576)]:
        layer = Linear4bit.from_float(torch.randn(*shape))
        assert layer.storage_bytes() / (shape[0] * shape[1]) < 0.6
    layer = Linear4bit.from_float(torch.randn(4096, 4096))
    assert layer.storage_bytes() * 8 / 4096 ** 2 == pytest.approx(4.127, abs=1e-3)


def test_from_float_errors():
    with pytest.raises(LLMTuneError, match="2-D"):
        Linear4bit.from_float(torch.randn(8))
    with pytest.raises(LLMTuneError, match="bias"):
        Linear4bit.from_float(torch.randn(8, 8), bias=torch.randn(7))


def test_state_dict_round_trip_and_to():
    layer = Linear4bit.from_float(torch.randn(8, 64), torch.randn(8), compute_dtype=torch.float32)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset", "bias"}
    fresh = Linear4bit(64, 8, compute_dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(layer.to("cpu")(x), layer(x))


def _tiny(qkv_bias=False):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, qkv_bias=qkv_bias)
    return cfg


@pytest.mark.parametrize("bias_first", [False, True])
def test_place_quantized_on_meta_model_qwen2_biases(bias_first):
    cfg = _tiny(qkv_bias=True)
    torch.manual_seed(1)
    dense = Transformer(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    items = list(dense.state_dict().items())
    if bias_first:  # biases before their weights
        items.sort(key=lambda kv: 0 if kv[0].endswith(".bias") else 1)
    for name, t in items:
        if place_quantized(model, name, t.clone(), torch.float32):
            continue
        parent, _, leaf = name.rpartition(".")
        mod = model.get_submodule(parent)
        setattr(mod, leaf, nn.Parameter(t.clone(), requires_grad=False))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit) and isinstance(model.model.layers[1].mlp.down_proj, Linear4bit)
    assert not isinstance(model.lm_head, Linear4bit) and not isinstance(model.model.embed_tokens, Linear4bit)
    assert torch.equal(q.bias, dense.model.layers[0].self_attn.q_proj.bias)
    model.inv_freq = dense.inv_freq  # non-persistent buffer (the loader sets it the same way)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert place_quantized(model, "model.norm.weight", torch.ones(64), torch.float32) is False
    assert place_quantized(model, "lm_head.weight", torch.ones(64, 64), torch.float32) is False
    # forward equals the dense model whose linear weights are replaced by the 4-bit values
    for name, mod in model.named_modules():
        if isinstance(mod, Linear4bit):
            dense.get_submodule(name).weight.data = _dense64(mod).float()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), rtol=1e-4, atol=1e-4)


def test_place_quantized_shape_mismatch_is_clear():
    with torch.device("meta"):
        model = Transformer(_tiny())
    with pytest.raises(LLMTuneError, match="q_proj.weight"):
        place_quantized(model, "model.layers.0.self_attn.q_proj.weight", torch.randn(3, 3), torch.float32)


@pytest.mark.real
def test_real_model_quantization_bit_4(real_model_path):
    from llmtune.models.loader import load_model
    from llmtune.tokenizer import load_tokenizer

    qm = load_model(real_model_path, dtype="bfloat16", quantization_bit=4)
    mods = {n: m for n, m in qm.named_modules() if isinstance(m, Linear4bit)}
    assert len(mods) == 30 * 7
    params = sum(m.in_features * m.out_features for m in mods.values())
    bytes_ = sum(m.storage_bytes() for m in mods.values())
    print(f"4-bit linear storage: {bytes_ / params:.4f} bytes/param ({8 * bytes_ / params:.3f} bits)")
    assert bytes_ / params < 0.6
    assert not isinstance(qm.lm_head, Linear4bit)
    dense = load_model(real_model_path, dtype="bfloat16")
    tok = load_tokenizer(real_model_path)
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
    kls = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            lq = qm.lm_head(qm(ids)).float().log_softmax(-1)
            ld = dense.lm_head(dense(ids)).float().log_softmax(-1)
            kls.append((ld.exp() * (ld - lq)).sum(-1).mean().item())  # KL(dense || 4-bit) per token
    print("KL(bf16 || nf4) per prompt:", [round(k, 4) for k in kls])
    assert max(kls) < 1.0
