"""Fast export tests on tiny random Llama models.

References (independent of llmtune): transformers' LlamaForCausalLM (safetensors and GGUF loaders) for
the exported files, peft for the LoRA merge (adapters are written by peft itself), safetensors' own reader
for shard sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.export import export, plan_shards

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_config(tie=False, hidden=64):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie, initializer_range=0.2, bos_token_id=0, eos_token_id=1)


def _make_base(path: Path, tie=False, dtype=torch.float32, hidden=64) -> Path:
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(_hf_config(tie, hidden)).to(dtype)
    model.save_pretrained(str(path))
    return path


def _make_adapter(base: Path, out: Path, seed=2, base_record=None, reference_model=None):
    """A peft LoRA adapter with random non-zero B; returns the peft model (reference)."""
    torch.manual_seed(seed)
    model = reference_model or transformers.LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(str(out))
    if base_record is not None:
        f = out / "adapter_config.json"
        c = json.loads(f.read_text())
        c["base_model_name_or_path"] = str(base_record)
        f.write_text(json.dumps(c))
    return pm.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = _make_base(root / "base")
    ref = _make_adapter(base, root / "lora", base_record=base)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
    ref_state = {k: v.detach().clone() for k, v in ref.merge_and_unload().state_dict().items()}
    return {"root": root, "base": base, "lora": root / "lora", "ids": ids, "ref_logits": ref_logits,
            "ref_state": ref_state}


def _hf_logits(folder: Path, ids, **kw):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_plan_shards_hand_case():
    sizes = [("a", 40), ("b", 40), ("c", 30), ("d", 200), ("e", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards([], 100) == [[]]


def test_merged_sharded_folder_loads_in_transformers(tiny, tmp_path):
    out = tmp_path / "merged"
    # 20 kB shards (export_size is in GB = 1e9 bytes): several shards
    export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(tiny["lora"]),
            "export_dir": str(out), "export_size": 2e-5, "infer_dtype": "float32"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    from safetensors import safe_open

    total, keys = 0, set()
    for s in shards:
        with safe_open(str(out / s), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
                keys.add(k)
                assert index["weight_map"][k] == s
                assert t.dtype == torch.float32
    assert index["metadata"]["total_size"] == total
    hf_keys = set(transformers.LlamaForCausalLM(_hf_config()).state_dict())
    assert keys == hf_keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is False
    got = _hf_logits(out, tiny["ids"])
    torch.testing.assert_close(got, tiny["ref_logits"], atol=1e-5, rtol=1e-5)
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_auto_dtype_follows_base_and_tied_head_not_written(tmp_path):
    base = _make_base(tmp_path / "base_bf16", tie=True, dtype=torch.bfloat16)
    out = tmp_path / "out"
    export({"model_name_or_path": str(base), "export_dir": str(out)})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    ref = transformers.LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    got = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


def _block_bound(ref: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """Per-element error bound of ggml's block formats (blocks of 32 along rows; ggml ``quants.c``):
    Q8_0 stores ``d = absmax/127`` (f16) and ``round(x/d)``: error <= d/2 plus the f16 rounding of d times
    127; Q4_0 stores ``d = max/-8`` (max = the value of largest magnitude) and ``q = min(15, x/d + 8.5)``:
    error <= |d| (the clamp at 15)."""
    blocks = ref.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    if gguf_type == "q8_0":
        bound = amax / 254 + amax * 2.0 ** -10
    else:
        bound = amax / 8 + amax * 2.0 ** -10
    return (bound + 1e-7).expand_as(blocks).reshape(ref.shape)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_export_reimports(tiny, tmp_path, gguf_type):
    out = tmp_path / "gguf"
    export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(tiny["lora"]),
            "export_dir": str(out), "export_format": "gguf", "gguf_type": gguf_type})
    name = f"model-{gguf_type}.gguf"
    assert sorted(os.listdir(out)) == [name]
    import gguf

    reader = gguf.GGUFReader(str(out / name))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == gguf_type.upper()
    assert "output.weight" in types  # untied base
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32)
    ref_state = tiny["ref_state"]
    for k, got in theirs.state_dict().items():
        ref = ref_state[k]
        if gguf_type == "f32" or got.ndim == 1:
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6, msg=k)
        elif gguf_type in ("f16", "bf16"):  # exactly the rounded weight, up to one ulp of the float32 merge
            dt = torch.float16 if gguf_type == "f16" else torch.bfloat16
            eps = torch.finfo(dt).eps
            torch.testing.assert_close(got, ref.to(dt).float(), atol=1e-6, rtol=eps, msg=k)
        else:
            assert bool(((got - ref).abs() <= _block_bound(ref, gguf_type)).all()), k
    with torch.no_grad():
        got_logits = theirs(input_ids=tiny["ids"]).logits
    err = (got_logits - tiny["ref_logits"]).abs().max().item()
    print(f"gguf {gguf_type}: max |logit error| = {err:.3g} (logit scale {tiny['ref_logits'].abs().max():.3g})")
    if gguf_type == "f32":
        assert err < 1e-4
    # llmtune's own GGUF import gives the same weights as transformers' GGUF loader
    from llmtune.models.loader import load_model

    ours = load_model(str(out / name), dtype="float32").state_dict()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("record", ["llmtune_parent_adapters", "base_is_parent_folder"])
def test_adapter_chain_recorded_by_parent_is_applied(tiny, tmp_path, capsys, record):
    # adapter2 was trained on base + lora1: exporting base + adapter2 applies the whole chain
    root = tmp_path
    merged1 = transformers.LlamaForCausalLM.from_pretrained(str(tiny["base"]), dtype=torch.float32)
    merged1 = peft.PeftModel.from_pretrained(merged1, str(tiny["lora"])).merge_and_unload()
    if record == "base_is_parent_folder":  # PEFT style: base_model_name_or_path is the parent adapter
        ref2 = _make_adapter(tiny["base"], root / "lora2", seed=5, base_record=tiny["lora"], reference_model=merged1)
    else:  # llmtune's trainer: root base + the parents in merge order
        ref2 = _make_adapter(tiny["base"], root / "lora2", seed=5, base_record=tiny["base"], reference_model=merged1)
        f = root / "lora2" / "adapter_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "llmtune_parent_adapters": [str(tiny["lora"])]}))
    with torch.no_grad():
        ref_logits = ref2(input_ids=tiny["ids"]).logits
    out = root / "out"
    export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(root / "lora2"),
            "export_dir": str(out), "infer_dtype": "float32"})
    assert "whole recorded chain" in capsys.readouterr().err
    torch.testing.assert_close(_hf_logits(out, tiny["ids"]), ref_logits, atol=1e-5, rtol=1e-5)


def test_resolve_chain_quiet_gives_the_same_chain_without_notices(tiny, tmp_path, capsys):
    """A check that resolves the chain before the load (stage ppo's) passes quiet=True: one notice per run."""
    from llmtune.runs import resolve_chain

    _make_adapter(tiny["base"], tmp_path / "lora2", seed=5, base_record=tiny["base"])
    f = tmp_path / "lora2" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "llmtune_parent_adapters": [str(tiny["lora"])]}))
    loud = resolve_chain(str(tiny["base"]), str(tmp_path / "lora2"))
    assert capsys.readouterr().err.count("llmtune: notice:") == 1
    quiet = resolve_chain(str(tiny["base"]), str(tmp_path / "lora2"), quiet=True)
    assert capsys.readouterr().err == ""
    assert quiet == loud and len(quiet.adapters) == 2


def test_export_4bit_bitsandbytes_layout(tiny, tmp_path):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    out = tmp_path / "q4"
    export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(tiny["lora"]),
            "export_dir": str(out), "export_quantization_bit": 4, "infer_dtype": "float32"})
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_4bit"] is True
    assert q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"] is True
    assert q["bnb_4bit_compute_dtype"] == "float32"
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    n4 = 0
    for name, mod in m.named_modules():
        if hasattr(mod, "weight") and hasattr(mod.weight, "quant_state") and mod.weight.quant_state is not None:
            n4 += 1
            got = bnb_f.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            ref = tiny["ref_state"][name + ".weight"]
            # NF4 bound (QLoRA): each value is within half the largest gap between NF4 codes
            # ((-0.6961928 - (-1)) / 2) times its block's absmax (block 64), plus <= 2% absmax error
            # from double quantization
            amax = ref.reshape(-1, 64).abs().amax(1, keepdim=True).expand(-1, 64).reshape(ref.shape)
            assert bool(((got - ref).abs() <= amax * (0.1519036 + 0.02) + 1e-6).all()), name
            # bitsandbytes' own quantization of the merged weight: the same codes almost everywhere (the
            # double-quantized absmax may differ in its last bits and flip a few near-ties)
            qw, st = bnb_f.quantize_4bit(ref, blocksize=64, quant_type="nf4", compress_statistics=True)
            same = ((got - bnb_f.dequantize_4bit(qw, st).float()).abs() <= 1e-3 * amax + 1e-6).float().mean()
            assert same > 0.98, (name, same)
    assert n4 == 2 * 7
    with torch.no_grad():
        err = (m(input_ids=tiny["ids"]).logits - tiny["ref_logits"]).abs().max().item()
    print(f"bnb nf4 export: max |logit error| = {err:.3g}")


def test_adapter_for_other_base_that_fits_is_applied_with_notice(tiny, tmp_path, capsys):
    lora = tmp_path / "lora_other"
    _make_adapter(tiny["base"], lora, base_record="/somewhere/else/model")
    export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(lora),
            "export_dir": str(tmp_path / "out"), "infer_dtype": "float32"})
    assert "/somewhere/else/model" in capsys.readouterr().err


def test_a_copy_of_the_base_at_another_path_is_the_same_base(tiny, tmp_path, capsys):
    # the adapter records tiny["base"]; a byte-identical copy elsewhere is the same base: no notice
    import shutil

    copy = tmp_path / "base_copy"
    shutil.copytree(tiny["base"], copy)
    out = tmp_path / "out"
    export({"model_name_or_path": str(copy), "adapter_name_or_path": str(tiny["lora"]), "export_dir": str(out),
            "infer_dtype": "float32"})
    err = capsys.readouterr().err
    assert "was trained on base" not in err, err
    torch.testing.assert_close(_hf_logits(out, tiny["ids"]), tiny["ref_logits"], atol=1e-5, rtol=1e-5)


def test_adapter_that_does_not_fit_is_refused(tiny, tmp_path):
    other = _make_base(tmp_path / "wide", hidden=96)
    lora = tmp_path / "lora_wide"
    _make_adapter(other, lora, base_record=tiny["base"])
    out = tmp_path / "out"
    with pytest.raises(LLMTuneError, match=r"adapter_model.safetensors.*shape"):
        export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(lora),
                "export_dir": str(out)})
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_non_empty_export_dir_is_refused_then_overwritten_on_request(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = {"model_name_or_path": str(tiny["base"]), "export_dir": str(out)}
    with pytest.raises(LLMTuneError, match="overwrite_export_dir"):
        export(args)
    assert (out / "keep.txt").read_text() == "user data" and len(os.listdir(out)) == 1
    (out / "model-00001-of-00002.safetensors").write_text("an earlier export's shard")
    export({**args, "overwrite_export_dir": True})
    # issue 15: overwriting replaces only what an export writes (a stale shard goes); the user's file stays
    assert (out / "keep.txt").read_text() == "user data" and (out / "model.safetensors").is_file()
    assert not (out / "model-00001-of-00002.safetensors").exists() and not (out / ".llmtune.lock").exists()


def test_bad_gguf_type_is_refused(tiny, tmp_path):
    with pytest.raises(LLMTuneError, match="gguf_type"):
        export({"model_name_or_path": str(tiny["base"]), "export_dir": str(tmp_path / "o"),
                "export_format": "gguf", "gguf_type": "q4_k_m"})


def test_generation_config_eos_holds_template_stop(tmp_path):
    from llmtune.export import save_hf_folder
    from llmtune.models import ModelConfig, Transformer

    class Tok:  # the attributes of llmtune's Tokenizer that save_hf_folder reads
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

        def save_pretrained(self, d):
            Path(d, "tokenizer_config.json").write_text("{}")

    model = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2))
    save_hf_folder(model, tmp_path, dtype=torch.float32, tokenizer=Tok(), stop_token_ids=[7, 1])
    gen = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert gen.eos_token_id == [1, 7]
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [1, 7]


def test_cli_export_end_to_end(tiny, tmp_path):
    out = tmp_path / "cli_out"
    cmd = [sys.executable, "-m", "llmtune", "export", "--model_name_or_path", str(tiny["base"]),
           "--adapter_name_or_path", str(tiny["lora"]), "--export_dir", str(out), "--export_size", "2",
           "--infer_dtype", "float32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_hf_logits(out, tiny["ids"]), tiny["ref_logits"], atol=1e-5, rtol=1e-5)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("llmtune: error: export_dir") and "Traceback" not in r.stderr


def test_reward_model_value_head_is_copied(tiny, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    rm = tmp_path / "rm"
    shutil.copytree(tiny["lora"], rm)
    head = {"v_head.summary.weight": torch.randn(1, 64), "v_head.summary.bias": torch.randn(1)}
    save_file(head, str(rm / "value_head.safetensors"))
    out = tmp_path / "out"
    export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(rm), "export_dir": str(out)})
    assert (out / "value_head.safetensors").read_bytes() == (rm / "value_head.safetensors").read_bytes()
    assert "value head" in capsys.readouterr().err


def test_a_checkpoint_folder_as_adapter_is_named_as_a_checkpoint(tiny, tmp_path):
    """A checkpoint-N folder (trainable.safetensors + trainer_state.json, no adapter_config.json) given as
    adapter_name_or_path: one error saying it is a checkpoint for resume_from_checkpoint; nothing written."""
    ckpt = tmp_path / "run" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 4}')
    with pytest.raises(LLMTuneError) as err:
        export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(ckpt),
                "export_dir": str(tmp_path / "out")})
    msg = str(err.value)
    assert msg.startswith("adapter_name_or_path:") and "training checkpoint" in msg
    assert "resume_from_checkpoint" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def _tensors_checkpoint(folder: Path, base, record: bool = True, sharded: bool = False) -> Path:
    """A checkpoint-N folder as a freeze run (``trainable.safetensors``) or an FSDP full run (``fsdp_shards/``)
    writes it, with the run record naming ``base`` unless ``record`` is False."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 2}')
    if sharded:
        (folder / "fsdp_shards").mkdir()
    else:
        save_file({"model.norm.weight": torch.ones(64)}, str(folder / "trainable.safetensors"))
    if record:
        (folder / "llmtune.json").write_text(json.dumps({"finetuning_type": "full" if sharded else "freeze",
                                                         "base_model_name_or_path": str(base), "parent_adapters": []}))
    return folder


def test_a_freeze_or_sharded_checkpoint_as_adapter_says_to_pass_it_as_the_model(tiny, tmp_path):
    """issue 25: a freeze or sharded FSDP checkpoint is not an adapter: one line naming it and saying to give it as
    model_name_or_path; nothing written."""
    for name, sharded, what in (("freeze", False, "a freeze fine-tuning checkpoint"),
                                ("fsdp", True, "an FSDP full fine-tuning checkpoint (sharded)")):
        ck = _tensors_checkpoint(tmp_path / name / "checkpoint-2", tiny["base"], sharded=sharded)
        with pytest.raises(LLMTuneError) as err:
            export({"model_name_or_path": str(tiny["base"]), "adapter_name_or_path": str(ck),
                    "export_dir": str(tmp_path / "out")})
        msg = str(err.value)
        assert msg.startswith("adapter_name_or_path:") and what in msg and "\n" not in msg
        assert f"pass it as --model_name_or_path {ck}" in msg
    assert not (tmp_path / "out").exists()


def test_a_tensors_checkpoint_without_its_record_or_base_is_refused_with_what_to_give(tiny, tmp_path):
    """issue 25: a freeze checkpoint as model_name_or_path needs its run record (written by older versions
    without one) and its recorded base; each missing piece is one line saying what to give instead."""
    old = _tensors_checkpoint(tmp_path / "old" / "checkpoint-2", tiny["base"], record=False)
    with pytest.raises(LLMTuneError) as err:
        export({"model_name_or_path": str(old), "export_dir": str(tmp_path / "out")})
    msg = str(err.value)
    assert msg.startswith("model_name_or_path:") and "without a run record" in msg and "output_dir" in msg
    moved = _tensors_checkpoint(tmp_path / "moved" / "checkpoint-2", tmp_path / "gone")
    with pytest.raises(LLMTuneError) as err:
        export({"model_name_or_path": str(moved), "export_dir": str(tmp_path / "out")})
    msg = str(err.value)
    assert msg.startswith("model_name_or_path:") and f"base {tmp_path / 'gone'} no longer exists" in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()
