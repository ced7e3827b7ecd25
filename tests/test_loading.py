"""load_model on tiny transformers checkpoints (reference: transformers' own forward), errors, adapter chains,
the quantization hook."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from fixtures.tiny_models import VOCAB, save_hf_model
from llmtune.errors import LLMTuneError
from llmtune.models.loader import load_model, parse_dtype
from llmtune.runs import resolve_model_chain, same_base

KINDS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (folder, transformers model)."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = (folder, save_hf_model(kind, folder))
    return out


def _hf_logits(ref, ids, mask):
    # transformers takes positions from the caller; for left padding they must start at each sequence's
    # first token (as its generate() does): cumsum(mask) - 1.
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _batch(left: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    lengths = [9, 6, 3]
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, 9 - n:] = 1
        else:
            mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_match_transformers(checkpoints, kind, left):
    folder, ref = checkpoints[kind]
    model = load_model(folder)
    assert model.name_or_path == str(folder.resolve())
    assert model.dtype == torch.float32
    ids, mask = _batch(left)
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
    theirs = _hf_logits(ref, ids, mask)
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_kv_cache_decoding_equals_full_forward(checkpoints, kind):
    folder, _ = checkpoints[kind]
    model = load_model(folder)
    ids, mask = _batch(left=True)
    with torch.no_grad():
        full = model.lm_head(model(ids, attention_mask=mask))
        hidden, cache = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [model.lm_head(hidden)]
        for t in range(5, 9):
            hidden, cache = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
            steps.append(model.lm_head(hidden))
    inc = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (inc[real] - full[real]).abs().max().item() <= 1e-5


def test_tied_lm_head_is_the_embedding(checkpoints):
    model = load_model(checkpoints["qwen2"][0])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta


def test_inv_freq_materialized_with_llama3_scaling(checkpoints):
    folder, ref = checkpoints["llama"]
    model = load_model(folder)
    assert not model.inv_freq.is_meta
    torch.testing.assert_close(model.inv_freq, ref.model.rotary_emb.inv_freq.float(), rtol=0, atol=0)


def test_sharded_checkpoint(tmp_path):
    ref = save_hf_model("llama", tmp_path, max_shard_size="40KB", seed=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = load_model(tmp_path)
    ids, mask = _batch(left=False)
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
    theirs = _hf_logits(ref, ids, mask)
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                           ("fp16", torch.float16), ("float32", torch.float32),
                                           (torch.bfloat16, torch.bfloat16)])
def test_dtype_names(name, expected):
    assert parse_dtype(name) == expected


def test_bfloat16_load_and_auto_dtype(checkpoints, tmp_path):
    folder, ref = checkpoints["qwen3"]
    model = load_model(folder, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    w = ref.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w)
    # "auto" follows config.json's dtype
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path).dtype == torch.bfloat16


def test_bfloat16_checkpoint_loaded_without_a_cast_stays_a_private_copy(checkpoints, tmp_path):
    # a bf16 folder loaded as bf16 is memory-mapped copy-on-write (models/folder.py): the weights equal
    # transformers', as a float32 load (read and cast) does, and writing to them never reaches the file
    folder, ref = checkpoints["llama"]
    ref.to(torch.bfloat16).save_pretrained(tmp_path)
    ref.to(torch.float32)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    file = tmp_path / "model.safetensors"
    before = file.read_bytes()
    expect = {n: p.detach().to(torch.bfloat16) for n, p in ref.named_parameters()}
    mapped, cast = load_model(tmp_path, dtype="bf16"), load_model(tmp_path, dtype="float32")
    for name, p in mapped.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), expect[name]), name
        assert torch.equal(cast.get_parameter(name).detach(), expect[name].float()), name
    with torch.no_grad():
        for p in mapped.parameters():
            p.add_(1.0)   # what a full fine-tuning step or a merge does in place
    assert file.read_bytes() == before
    again = load_model(tmp_path, dtype="bf16")
    assert all(torch.equal(p.detach(), expect[n]) for n, p in again.named_parameters())


# -- errors ------------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_error_missing_path(tmp_path):
    with pytest.raises(LLMTuneError, match="no such file or folder"):
        load_model(tmp_path / "nope")


def test_error_hub_offline():
    with pytest.raises(LLMTuneError, match="Hugging Face Hub"):
        load_model("no-such-owner-xyz/no-such-model-xyz")


def test_error_bin_only_folder(checkpoints, tmp_path):
    (tmp_path / "config.json").write_text((checkpoints["llama"][0] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(LLMTuneError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        load_model(tmp_path)


def test_error_truncated_safetensors(checkpoints, tmp_path):
    d = _copy(checkpoints["llama"][0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LLMTuneError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_model(d)


def test_error_unsupported_architecture(checkpoints, tmp_path):
    d = _copy(checkpoints["llama"][0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMTuneError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_model(d)


def test_error_unknown_dtype(checkpoints):
    with pytest.raises(LLMTuneError, match="dtype 'bfloat61' is not known.*Did you mean: bfloat16"):
        load_model(checkpoints["llama"][0], dtype="bfloat61")


def test_error_missing_unexpected_and_misshaped_tensors(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(checkpoints["llama"][0], tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LLMTuneError) as err:
        load_model(d)
    msg = str(err.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors: model.layers.0.extra.weight" in msg
    assert "model.norm.weight (3,) (model expects (64,))" in msg


def test_error_quantization_bits(checkpoints):
    with pytest.raises(LLMTuneError, match="quantization_bit 8: only 4-bit"):
        load_model(checkpoints["llama"][0], quantization_bit=8)


# -- quantization hook ----------------------------------------------------------------------------------

def test_quantization_not_available(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "llmtune.quant", types.ModuleType("llmtune.quant"))
    with pytest.raises(LLMTuneError, match="quantization is not available"):
        load_model(checkpoints["llama"][0], quantization_bit=4)


def test_quantization_hook_sees_every_tensor(checkpoints, monkeypatch):
    calls = []

    def place_quantized(model, name, tensor, compute_dtype, quant_type, double_quant):
        calls.append((name, tuple(tensor.shape), compute_dtype, quant_type, double_quant))
        return False  # keep everything dense

    fake = types.ModuleType("llmtune.quant")
    fake.place_quantized = place_quantized
    monkeypatch.setitem(sys.modules, "llmtune.quant", fake)
    folder, ref = checkpoints["mistral"]
    model = load_model(folder, dtype="bf16", quantization_bit=4, double_quantization=False)
    names = {c[0] for c in calls}
    assert names == set(ref.state_dict())
    assert {c[2:] for c in calls} == {(torch.bfloat16, "nf4", False)}
    assert model.dtype == torch.bfloat16


# -- adapter chains -------------------------------------------------------------------------------

def _adapter(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    return folder


def test_resolve_model_chain_relative_and_recursive(checkpoints, tmp_path):
    base = _copy(checkpoints["llama"][0], tmp_path / "base")
    a1 = _adapter(tmp_path / "pt_out", "../base")  # relative to the adapter folder
    a2 = _adapter(tmp_path / "sft_out", str(a1))
    a3 = _adapter(tmp_path / "dpo_out", str(tmp_path / "sft_out"))
    root, chain = resolve_model_chain(a3)
    assert root == str(base.resolve())
    assert chain == [a1.resolve(), a2.resolve(), a3.resolve()]
    assert resolve_model_chain(base) == (str(base), [])
    assert resolve_model_chain("owner/repo") == ("owner/repo", [])


def test_resolve_model_chain_follows_llmtune_parent_records(checkpoints, tmp_path):
    """llmtune's trainer records the root base plus the parent adapters of each run (each run only its direct
    parent): the chain of pt -> sft -> dpo runs expands to all three, root first (the seed's chat/export)."""
    base = _copy(checkpoints["llama"][0], tmp_path / "base")
    pt = _adapter(tmp_path / "pretrain_output", str(base))
    sft = _adapter(tmp_path / "sft_output", str(base))
    dpo = _adapter(tmp_path / "dpo_output", str(base))
    for folder, parents in ((sft, [pt]), (dpo, [sft])):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["llmtune_parent_adapters"] = [str(p) for p in parents]
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert resolve_model_chain(dpo) == (str(base.resolve()), [pt.resolve(), sft.resolve(), dpo.resolve()])


def test_resolve_model_chain_errors(tmp_path):
    a = _adapter(tmp_path / "a", str(tmp_path / "b"))
    _adapter(tmp_path / "b", str(a))
    with pytest.raises(LLMTuneError, match="loops"):
        resolve_model_chain(a)
    c = tmp_path / "c"
    c.mkdir()
    (c / "adapter_config.json").write_text("{}")
    with pytest.raises(LLMTuneError, match="no base_model_name_or_path"):
        resolve_model_chain(c)


def test_load_adapter_folder_merges_chain_in_order(checkpoints, tmp_path, monkeypatch):
    from llmtune import peft, runs

    calls = []
    monkeypatch.setattr(peft, "load_adapter", lambda model, d, adapter_name="default", is_trainable=False:
                        calls.append(("load", Path(d).name, is_trainable)))
    monkeypatch.setattr(peft, "merge_adapters", lambda model: calls.append(("merge",)))
    base = _copy(checkpoints["qwen2"][0], tmp_path / "base")
    a1 = _adapter(tmp_path / "sft_out", str(base))
    a2 = _adapter(tmp_path / "dpo_out", str(a1))
    model = runs.load_model(a2)
    assert model.name_or_path == str(base.resolve())
    assert calls == [("load", "sft_out", False), ("merge",), ("load", "dpo_out", False), ("merge",)]
    assert model.adapter_chain == runs.AdapterChain(str(base.resolve()), (a1.resolve(), a2.resolve()))
    # the seed's chat: base + the last adapter of a chain rooted at that base -> the whole chain
    calls.clear()
    model = runs.load_model(base, adapter_name_or_path=str(a2))
    assert [c[1] for c in calls if c[0] == "load"] == ["sft_out", "dpo_out"]
    assert model.adapter_chain.adapters == (a1.resolve(), a2.resolve())  # the chain applied is the one recorded
    # ... also when the base is given at another path with the same weights (compared by content)
    calls.clear()
    copy = _copy(base, tmp_path / "elsewhere")
    runs.load_model(copy, adapter_name_or_path=str(a2))
    assert [c[1] for c in calls if c[0] == "load"] == ["sft_out", "dpo_out"]


def test_weights_loader_refuses_an_adapter_folder_with_a_pointer(checkpoints, tmp_path):
    base = _copy(checkpoints["qwen2"][0], tmp_path / "base")
    a1 = _adapter(tmp_path / "sft_out", str(base))
    with pytest.raises(LLMTuneError, match="LoRA output folder.*llmtune.load_model"):
        load_model(a1)


def test_same_base_compares_weight_bytes_not_paths(checkpoints, tmp_path):
    base = _copy(checkpoints["llama"][0], tmp_path / "base")
    copy = _copy(base, tmp_path / "copy")
    assert same_base(base, copy) and same_base(str(base) + "/", base)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert not same_base(base, copy)
    assert not same_base(base, tmp_path / "missing") and same_base("owner/repo", "owner/repo")
