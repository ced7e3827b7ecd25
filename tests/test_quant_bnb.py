"""bitsandbytes 4-bit checkpoint tensors <-> Linear4bit; checked against bitsandbytes and transformers.

bitsandbytes >= 0.45 quantizes on the CPU. Its CPU *dequantize_4bit* (0.50.2, native kernel) returns wrong
values when a row length is not a multiple of the block size (it indexes scales per row), so comparisons
with bitsandbytes' own dequantization use in_features that are multiples of 64; other shapes are compared
with the formula written in this file.
"""

import json

import pytest
import torch
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.models.config import ModelConfig
from llmtune.models.transformer import Transformer
from llmtune.quant import Linear4bit
from llmtune.quant.bnb import (BnbPlacer, bnb_4bit_options, bnb_quantization_config, bnb_tensors_from_linear4bit,
                               is_bnb_4bit_config, linear4bit_from_bnb_tensors)


def _formula(tensors, prefix):
    """float64 weight from bitsandbytes tensors, written here from the format description."""
    meta = json.loads(bytes(tensors[prefix + "weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    n = meta["shape"][0] * meta["shape"][1]
    p = tensors[prefix + "weight"].reshape(-1)
    codes = torch.stack([p >> 4, p & 15], 1).reshape(-1)[:n].long()
    a = tensors[prefix + "weight.absmax"]
    if "nested_offset" in meta:
        nb = a.numel()
        a = (tensors[prefix + "weight.nested_quant_map"][a.long()]
             * tensors[prefix + "weight.nested_absmax"].repeat_interleave(meta["nested_blocksize"])[:nb]
             + torch.tensor(meta["nested_offset"], dtype=torch.float32))  # float32, as stored
    w = tensors[prefix + "weight.quant_map"].double()[codes] * a.double().repeat_interleave(meta["blocksize"])[:n]
    return w.view(*meta["shape"])


@pytest.mark.parametrize("in_features", [128, 100])
def test_round_trip_and_layout(in_features):
    layer = Linear4bit.from_float(torch.randn(24, in_features), torch.randn(24), compute_dtype=torch.float32)
    t = bnb_tensors_from_linear4bit(layer, "model.layers.0.mlp.up_proj")
    p = "model.layers.0.mlp.up_proj."
    assert set(t) == {p + s for s in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                      "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias")}
    assert t[p + "weight"].shape == (24 * in_features // 2, 1) and t[p + "weight"].dtype == torch.uint8
    meta = json.loads(bytes(t[p + "weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert meta == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [24, in_features],
                    "nested_blocksize": 256, "nested_dtype": "float32",
                    "nested_offset": pytest.approx(float(layer.nested_offset))}
    back = linear4bit_from_bnb_tensors(t, compute_dtype=torch.float32)
    for name, buf in layer.state_dict().items():
        assert torch.equal(back.state_dict()[name], buf), name
    torch.testing.assert_close(back.dequantize().double(), _formula(t, p), rtol=1e-6, atol=0)


def test_missing_tensor_is_clear():
    layer = Linear4bit.from_float(torch.randn(8, 64))
    t = bnb_tensors_from_linear4bit(layer, "x")
    del t["x.weight.absmax"]
    with pytest.raises(LLMTuneError, match="weight.absmax"):
        linear4bit_from_bnb_tensors(t)


def test_config_detection():
    q = bnb_quantization_config("nf4", True, torch.bfloat16)
    assert is_bnb_4bit_config({"quantization_config": q}) and is_bnb_4bit_config(q)
    assert not is_bnb_4bit_config({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}})
    assert not is_bnb_4bit_config({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert not is_bnb_4bit_config({"model_type": "llama"})
    assert is_bnb_4bit_config({"quantization_config": {"quant_method": "bitsandbytes", "_load_in_4bit": True}})
    assert bnb_4bit_options({"quantization_config": q}) == {"quant_type": "nf4", "double_quant": True,
                                                           "compute_dtype": torch.bfloat16}
    transformers = pytest.importorskip("transformers")
    ref = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16).to_dict()
    assert set(q) == set(ref)
    assert {k: v for k, v in q.items() if k != "llm_int8_skip_modules"} == {
        k: v for k, v in ref.items() if k != "llm_int8_skip_modules"}


@pytest.mark.parametrize("in_features,double_quant", [(128, True), (192, False), (100, True)])
def test_bitsandbytes_quantized_tensor_loads(in_features, double_quant):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed (pip install bitsandbytes)")
    w = torch.randn(40, in_features) * 0.03
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    p = "model.layers.3.self_attn.o_proj."
    tensors = {p + "weight": q}
    tensors.update({p + "weight." + k: v for k, v in state.as_dict(packed=True).items()})
    layer = linear4bit_from_bnb_tensors(tensors, compute_dtype=torch.float32)
    ours = layer.dequantize()
    torch.testing.assert_close(ours.double(), _formula(tensors, p), rtol=1e-6, atol=0)
    if in_features % 64 == 0:
        assert torch.equal(ours, F.dequantize_4bit(q, state))
    # our quantizer writes the same 4-bit codes and float32 scales as bitsandbytes
    plain_q, plain_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    mine = Linear4bit.from_float(w, double_quant=False, compute_dtype=torch.float32)
    assert torch.equal(mine.weight, plain_q.reshape(-1)) and torch.equal(mine.absmax, plain_state.absmax)
    # and bitsandbytes reads what we export
    exported = bnb_tensors_from_linear4bit(layer, p)
    qs = F.QuantState.from_dict({k[len(p):]: v for k, v in exported.items() if k != p + "weight"}, torch.device("cpu"))
    if in_features % 64 == 0:
        assert torch.equal(F.dequantize_4bit(exported[p + "weight"], qs), ours)


def _tiny_hf_config():
    # in_features multiples of 64 (see the module docstring)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
                torch_dtype="float32", hidden_act="silu")


def _stream_into(model, tensors, placer):
    for name, t in tensors.items():
        if placer.place(name, t):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Parameter(t.clone(), requires_grad=False))
    placer.finish()


def test_bnb_placer_streams_any_order_and_reports_incomplete():
    cfg = ModelConfig.from_hf_dict(_tiny_hf_config())
    dense = Transformer(cfg)
    tensors = {}
    for name, mod in dense.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("model.layers"):
            tensors.update(bnb_tensors_from_linear4bit(Linear4bit.from_float(mod.weight.detach(), compute_dtype=torch.float32), name))
    tensors.update({k: v for k, v in dense.state_dict().items() if k not in {n.rsplit(".", 1)[0] + ".weight" for n in tensors}
                    and not k.endswith("inv_freq")})
    names = list(tensors)
    g = torch.Generator().manual_seed(3)
    shuffled = {names[i]: tensors[names[i]] for i in torch.randperm(len(names), generator=g).tolist()}
    with torch.device("meta"):
        model = Transformer(cfg)
    placer = BnbPlacer(model, torch.float32)
    _stream_into(model, shuffled, placer)
    assert len(placer.placed) == 14 and isinstance(model.model.layers[1].mlp.down_proj, Linear4bit)
    assert not isinstance(model.lm_head, Linear4bit)
    with torch.device("meta"):
        model2 = Transformer(cfg)
    broken = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight.nested_absmax"}
    with pytest.raises(LLMTuneError, match="model.layers.1.mlp.up_proj"):
        _stream_into(model2, broken, BnbPlacer(model2, torch.float32))


def test_transformers_loads_our_export_and_we_load_theirs(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install bitsandbytes)")
    from safetensors.torch import save_file

    hf_cfg = _tiny_hf_config()
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    for name, mod in list(ours.named_modules()):
        if isinstance(mod, nn.Linear) and name.startswith("model.layers"):
            parent, _, leaf = name.rpartition(".")
            setattr(ours.get_submodule(parent), leaf, Linear4bit.from_float(mod.weight.detach(), compute_dtype=torch.float32))
    tensors = {}
    for name, mod in ours.named_modules():
        if isinstance(mod, Linear4bit):
            tensors.update(bnb_tensors_from_linear4bit(mod, name))
    for name, p in ours.named_parameters():
        if not any(name.startswith(m + ".") for m in {n.rsplit(".weight", 1)[0] for n in tensors}):
            tensors[name] = p.detach().contiguous()
    out = tmp_path / "nf4"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**hf_cfg, "quantization_config": bnb_quantization_config(
        "nf4", True, torch.float32)}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    assert type(hf.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    # bitsandbytes' CPU eval path (no grad, AVX512-BF16 CPUs) repacks the weight for a bfloat16 kernel;
    # training mode keeps its exact float32 dequantize-then-matmul (no dropout in Llama)
    hf.train()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.lm_head(ours(ids))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # bitsandbytes' own serialisation of that model (the state dict save_pretrained writes; transformers 5.24
    # cannot re-save a model loaded pre-quantized) loads back through BnbPlacer with bit-equal buffers
    theirs = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    assert theirs["model.layers.0.mlp.up_proj.weight"].shape == (64 * 128 // 2, 1)
    with torch.device("meta"):
        back = Transformer(cfg)
    _stream_into(back, {k: v for k, v in theirs.items() if not k.endswith("inv_freq")}, BnbPlacer(back, torch.float32))
    back.inv_freq = ours.inv_freq
    for name, mod in ours.named_modules():
        if isinstance(mod, Linear4bit):
            other = back.get_submodule(name)
            assert torch.equal(other.weight, mod.weight) and torch.equal(other.absmax, mod.absmax)
    with torch.no_grad():
        torch.testing.assert_close(back.lm_head(back(ids)), got, rtol=0, atol=0)

    # and the loader reads such a *-bnb-4bit folder directly (config.json quantization_config detected)
    from llmtune.models.loader import load_model

    folder = tmp_path / "theirs"
    folder.mkdir()
    save_file({k: v for k, v in theirs.items() if not k.endswith("inv_freq")}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text((out / "config.json").read_text())
    loaded = load_model(folder, dtype="float32")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(loaded.lm_head(loaded(ids)), ref, rtol=1e-4, atol=1e-4)
