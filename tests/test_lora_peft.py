"""Adapters move both ways between llmtune and peft: logits, merged weights and gradients match peft on a
transformers model of the same tiny random config (float32, 1e-5)."""

import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llmtune.models.config import ModelConfig  # noqa: E402
from llmtune.models.transformer import Transformer  # noqa: E402
from llmtune.peft import LoraLinear, apply_lora, load_adapter, merge_adapters, save_adapter  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41, 11], [3, 3, 8, 60, 12, 0, 22, 19, 4]])


def pair(tie=False, family="llama"):
    """A transformers model and an llmtune Transformer holding the same random float32 weights."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if family == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common)
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(**common)
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf = hf.float().eval()
    ours = Transformer(ModelConfig.from_hf_dict(hf_cfg.to_dict())).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and not missing
    ours.tie_weights()
    return hf, ours


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def our_logits(model, ids=IDS):
    with torch.no_grad():
        return model.lm_head(model(ids)).float()


def randomize(model, prefix_filter=None, scale=0.3):
    """Random non-zero LoRA B / DoRA magnitude / modules_to_save weights in any model (ours or peft's)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


CASES = {
    "lora": dict(lora_rank=4, lora_alpha=8, lora_target="all"),
    "rslora": dict(lora_rank=4, lora_alpha=16, lora_target="q_proj,v_proj,down_proj", use_rslora=True),
    "dora": dict(lora_rank=4, lora_alpha=8, lora_target="all", use_dora=True),
    "modules_to_save": dict(lora_rank=2, lora_alpha=4, lora_target="q_proj,o_proj",
                            additional_target="embed_tokens,lm_head"),
    # tied embeddings: as in peft, embed_tokens gets a trainable copy and lm_head keeps the original
    "tied_embed": dict(lora_rank=2, lora_alpha=4, lora_target="v_proj", additional_target="embed_tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft(case, tmp_path):
    hf, ours = pair(tie=case == "tied_embed")
    base = our_logits(ours)
    torch.testing.assert_close(base, hf_logits(hf), atol=1e-5, rtol=1e-5)
    apply_lora(ours, **CASES[case])
    randomize(ours)
    mine = our_logits(ours)
    assert (mine - base).abs().max() > 1e-2  # the adapter matters
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    torch.testing.assert_close(hf_logits(peft_model), mine, atol=1e-5, rtol=1e-5)
    # peft sees exactly our tensors under its own names
    ours_sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items()
              if "lora_" in k or "modules_to_save" in k}
    theirs = {k.replace(".modules_to_save", ""): v for k, v in theirs.items()}
    for k, v in ours_sd.items():
        k2 = k + ".weight" if k.endswith("lora_magnitude_vector") else k
        assert torch.equal(theirs[k2], v), k


@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "modules_to_save", "tied_embed"])
def test_peft_adapter_loads_in_ours(case, tmp_path):
    hf, ours = pair(tie=case == "tied_embed")
    kw = CASES[case]
    targets = (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
               if kw["lora_target"] == "all" else kw["lora_target"].split(","))
    cfg = LoraConfig(r=kw["lora_rank"], lora_alpha=kw["lora_alpha"], target_modules=targets,
                     use_dora=kw.get("use_dora", False), use_rslora=kw.get("use_rslora", False),
                     modules_to_save=kw["additional_target"].split(",") if kw.get("additional_target") else None,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, cfg).eval()
    randomize(peft_model)
    theirs = hf_logits(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(our_logits(ours), theirs, atol=1e-5, rtol=1e-5)


def test_peft_regex_target_modules(tmp_path):
    hf, ours = pair(family="qwen2")
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=r".*layers\.1\.self_attn\.(q|k)_proj", task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, cfg).eval()
    randomize(peft_model)
    theirs = hf_logits(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    load_adapter(ours, tmp_path)
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, LoraLinear))
    assert wrapped == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(our_logits(ours), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_weights_match_peft_merge_and_unload(use_dora, tmp_path):
    hf, ours = pair(tie=True)
    apply_lora(ours, lora_rank=4, lora_alpha=8, use_dora=use_dora)
    randomize(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path=None)
    merged_peft = PeftModel.from_pretrained(hf, str(tmp_path)).merge_and_unload()
    merge_adapters(ours)
    theirs = merged_peft.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs[k], atol=1e-6, rtol=1e-5, msg=k)


def test_dora_gradients_match_peft(tmp_path):
    hf, ours = pair()
    apply_lora(ours, lora_rank=4, lora_alpha=8, lora_target="q_proj,up_proj", use_dora=True)
    randomize(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path=None)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path), is_trainable=True).eval()
    ours.lm_head(ours(IDS)).logsumexp(-1).sum().backward()
    peft_model(input_ids=IDS).logits.logsumexp(-1).sum().backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", "").replace("vector.weight", "vector"): p.grad
              for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs) and len(mine) == 2 * 2 * 3
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-4, rtol=1e-4, msg=k)


def test_adapter_config_is_peft_loadable(tmp_path):
    _, ours = pair()
    apply_lora(ours, lora_rank=4, use_rslora=True, lora_dropout=0.1, additional_target="norm")
    save_adapter(ours, tmp_path, base_model_name_or_path=str(tmp_path))
    cfg = LoraConfig.from_pretrained(str(tmp_path))
    assert cfg.r == 4 and cfg.lora_alpha == 8 and cfg.use_rslora and cfg.lora_dropout == 0.1
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cfg.modules_to_save == ["norm"]
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == str(tmp_path.resolve())
    assert not [k for k in raw if k.startswith("llmtune")]  # llmtune's own record lives in llmtune.json
