"""GGUF import. References: transformers' GGUF loader (weights bit-equal, logits), llama.cpp's q/k permutation
written out here from its convert script, and hand-written GGUF files (gguf.GGUFWriter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.tiny_models import make_hf_model
from llmtune.errors import LLMTuneError
from llmtune.models.gguf import gguf_config, gguf_to_hf_name, reverse_permute
from llmtune.models.loader import load_model


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(path, model, qtype=None, arch="llama"):
    """Write a transformers Llama model as llama.cpp would: GGUF names, permuted q/k, optional quantization."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"
        if gname.endswith("attn_q.weight"):
            a = llamacpp_permute(a, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            a = llamacpp_permute(a, cfg.num_key_value_heads)
        if qtype is not None and a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reverse_permute_inverts_llamacpp():
    w = torch.randn(4 * 8, 5)
    permuted = torch.from_numpy(llamacpp_permute(w.numpy(), 4))
    assert not torch.equal(permuted, w)
    assert torch.equal(reverse_permute(permuted, 4), w)


def test_tensor_names():
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None
    with pytest.raises(LLMTuneError, match="blk.0.ssm_in.weight"):
        gguf_to_hf_name("blk.0.ssm_in.weight")


@pytest.mark.parametrize("qtype", [None, "Q8_0"])
def test_synthetic_llama_gguf(tmp_path, qtype):
    import gguf

    ref = make_hf_model("mistral")  # a plain Llama-layout model without rope scaling
    import transformers as tf

    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**{k: v for k, v in ref.config.to_dict().items()
                                                  if k in tf.LlamaConfig().to_dict() and k != "architectures"}))
    llama.load_state_dict(ref.state_dict())
    llama.eval()
    q = None if qtype is None else getattr(gguf.GGMLQuantizationType, qtype)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, llama, q)
    model = load_model(path)
    assert model.name_or_path == str(path.resolve())
    assert model.dtype == torch.float32 and not model.config.tie_word_embeddings
    ours = dict(model.named_parameters())
    for name, t in llama.state_dict().items():
        expect = t
        if q is not None and t.ndim == 2:  # quantization is lossy: the reference is gguf's round trip
            a = t.numpy()
            if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
                n = llama.config.num_attention_heads if "q_proj" in name else llama.config.num_key_value_heads
                a = llamacpp_permute(a, n)
                expect = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q))
                expect = reverse_permute(expect, n)
            else:
                expect = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q))
        assert torch.equal(ours[name], expect), name
    if q is None:
        ids = torch.randint(3, 96, (2, 8))
        with torch.no_grad():
            assert (model.lm_head(model(ids)) - llama(ids).logits).abs().max() <= 1e-5


def test_non_llama_gguf_is_refused(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LLMTuneError, match="GGUF architecture 'gpt2' is not supported"):
        load_model(path)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(LLMTuneError, match="bad.gguf"):
        load_model(path)


# -- the real model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_gguf_reference(hf_real_model_copy):
    """transformers' own GGUF import of the real model (float32; one load per session, see conftest)."""
    return hf_real_model_copy()


@pytest.mark.real
def test_real_config_matches_transformers(real_model_path, hf_gguf_reference):
    cfg = gguf_config(real_model_path)
    ref = hf_gguf_reference.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert cfg.get("rope_scaling") is None


@pytest.mark.real
def test_real_weights_bit_equal_and_logits(real_model_path, hf_gguf_reference):
    model = load_model(real_model_path)
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = hf_gguf_reference.state_dict()
    assert set(ours) == set(theirs)
    not_equal = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not not_equal
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 638, 359, 346, 47, 2, 198],
                        [0, 0, 0, 1, 4093, 198, 6121, 30, 2, 198, 1, 520]])
    mask = (torch.arange(12) >= torch.tensor([[0], [3]])).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model.lm_head(model(ids, attention_mask=mask))
        b = hf_gguf_reference(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max().item() <= 1e-3


@pytest.mark.real
def test_real_bfloat16(real_model_path):
    model = load_model(real_model_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    with torch.no_grad():
        hidden = model(torch.tensor([[1, 9690, 198]]))
    assert torch.isfinite(hidden).all()
