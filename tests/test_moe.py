"""Qwen2-MoE / Qwen3-MoE: logits and the load-balancing loss against transformers (test-only reference), the
grouped expert compute against a naive per-token loop, LoRA on experts, PEFT interop, GGUF, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmtune import runs as llmtune_runs
from llmtune.models.loader import load_model

tf = pytest.importorskip("transformers")

VOCAB = 80
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, moe_intermediate_size=16, num_experts=4)

#: routing settings: (id, family, extra config)
SETTINGS = [
    ("q2_top2", "qwen2_moe", dict(num_experts_per_tok=2, shared_expert_intermediate_size=24)),
    ("q2_top1_norm", "qwen2_moe", dict(num_experts_per_tok=1, norm_topk_prob=True, shared_expert_intermediate_size=24)),
    ("q2_step2_mlponly", "qwen2_moe", dict(num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[0],
                                           shared_expert_intermediate_size=24, tie_word_embeddings=True)),
    ("q3_top2_norm", "qwen3_moe", dict(num_experts_per_tok=2, norm_topk_prob=True, head_dim=16)),
    ("q3_top1", "qwen3_moe", dict(num_experts_per_tok=1, norm_topk_prob=False)),
    ("q3_mlponly", "qwen3_moe", dict(num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])),
]


def hf_config(family: str, **extra):
    kw = {**COMMON, **extra}
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**kw)
    kw.pop("shared_expert_intermediate_size", None)
    return tf.Qwen3MoeConfig(**kw)



def spread_weights(model) -> None:
    """Weights spread widely enough for routing and logits to differ between implementations' mistakes: norms
    around 1, router logits N(0, 0.5), the rest N(0, 0.15), in place from the current torch seed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))

def make_hf(family: str, seed: int = 0, **extra):
    """A float32 transformers MoE model with well-spread random weights (routing differs per token)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family, **extra), dtype=torch.float32).eval()
    spread_weights(model)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """setting id -> (folder, transformers model)."""
    out = {}
    for sid, family, extra in SETTINGS:
        folder = tmp_path_factory.mktemp(sid)
        ref = make_hf(family, **extra)
        ref.save_pretrained(folder, safe_serialization=True)
        out[sid] = (folder, ref)
    return out


def _batch(left: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 10), generator=g)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for i, n in enumerate([10, 7, 4]):
        if left:
            mask[i, 10 - n:] = 1
        else:
            mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _hf(ref, ids, mask, **kw):
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)


@pytest.mark.parametrize("sid", [s[0] for s in SETTINGS])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_and_aux_loss_match_transformers(checkpoints, sid, left):
    folder, ref = checkpoints[sid]
    model = load_model(folder, dtype="float32")
    cfg = model.config
    assert cfg.num_experts == 4 and cfg.family == ref.config.model_type
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert n_moe == sum("experts" in n for n, _ in ref.named_modules() if n.endswith("mlp.experts"))
    ids, mask = _batch(left)
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
    out = _hf(ref, ids, mask, output_router_logits=True)
    real = mask.bool()
    assert (ours[real] - out.logits[real]).abs().max().item() <= 1e-5
    # the auxiliary loss: transformers' load_balancing_loss_func with the padding mask
    assert model.aux_loss is not None
    assert abs(model.aux_loss.item() - out.aux_loss.item()) <= 1e-5
    assert cfg.router_aux_loss_coef == ref.config.router_aux_loss_coef


def test_transformers_fused_state_dict_loads_after_splitting(checkpoints):
    """transformers 5 keeps experts fused in memory; split_fused_experts maps its state_dict to our names."""
    from llmtune.models import ModelConfig, Transformer
    from llmtune.models.moe import split_fused_experts

    _, ref = checkpoints["q3_top2_norm"]
    sd = ref.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd  # the fused layout this test is about
    ours_sd = dict(pair for name, t in sd.items() for pair in split_fused_experts(name, t))
    model = Transformer(ModelConfig.from_hf_dict(ref.config.to_dict())).float().eval()
    missing, unexpected = model.load_state_dict(ours_sd, strict=False)
    assert not missing and not unexpected
    ids, mask = _batch(False)
    real = mask.bool()
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
    assert (ours[real] - _hf(ref, ids, mask).logits[real]).abs().max().item() <= 1e-5


def test_aux_loss_without_padding_and_with_labels(checkpoints):
    folder, ref = checkpoints["q2_top2"]
    model = load_model(folder, dtype="float32")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = ref(input_ids=ids, labels=ids, output_router_logits=True)
        hidden = model(ids)
    assert abs(model.aux_loss.item() - out.aux_loss.item()) <= 1e-5
    # transformers: loss = mean token cross-entropy + router_aux_loss_coef * aux_loss
    logits = model.lm_head(hidden)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert abs((ce + ref.config.router_aux_loss_coef * model.aux_loss).item() - out.loss.item()) <= 1e-5


def test_kv_cache_decoding_equals_full_forward(checkpoints):
    folder, _ = checkpoints["q2_top2"]
    model = load_model(folder, dtype="float32")
    ids, mask = _batch(left=True)
    with torch.no_grad():
        full = model.lm_head(model(ids, attention_mask=mask))
        hidden, cache = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        assert model.aux_loss is None  # not computed while decoding
        steps = [model.lm_head(hidden)]
        for t in range(6, 10):
            hidden, cache = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
            steps.append(model.lm_head(hidden))
    inc = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (inc[real] - full[real]).abs().max().item() <= 1e-5


def test_balanced_router_gives_top_k():
    """Hand-computed case: a uniform router gives f_e = k / E and P_e = 1 / E, so E * sum f_e P_e = k."""
    from llmtune.models.moe import load_balancing_loss

    probs = torch.full((8, 4), 0.25)
    top = torch.tensor([[0, 1], [2, 3]] * 4)
    assert abs(load_balancing_loss([(probs, top)], 4).item() - 2.0) < 1e-6


# -- expert compute ---------------------------------------------------------------------------------

def _naive_experts(x, experts, top, weights):
    """Reference: a loop over tokens and their chosen experts, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(top.shape[1]):
            e = experts[int(top[n, j])]
            xn = x[n].double()
            h = torch.nn.functional.silu(xn @ e.gate_proj.weight.double().T) * (xn @ e.up_proj.weight.double().T)
            out[n] += float(weights[n, j]) * (h @ e.down_proj.weight.double().T)
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_expert_compute_equals_a_per_token_loop(k):
    from llmtune.models.moe import ExpertMLP, experts_forward

    torch.manual_seed(0)
    experts = torch.nn.ModuleList(ExpertMLP(24, 12) for _ in range(5))
    x = torch.randn(37, 24)
    logits = torch.randn(37, 5)
    logits[:, 4] -= 100.0  # expert 4 gets no token: it must still work (empty batch)
    weights, top = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    ref = _naive_experts(x, experts, top, weights)
    got = experts_forward(x, experts, top, weights, grouped=False)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference skips the experts no token chose
        torch.testing.assert_close(experts_forward(x, experts, top, weights).double(), ref, atol=1e-5, rtol=1e-5)
    got.sum().backward()  # in training the expert no token chose still gets a (zero) gradient: DDP needs it
    assert experts[4].down_proj.weight.grad is not None and not experts[4].down_proj.weight.grad.any()


def _cpu_grouped_mm() -> bool:
    """True when this torch runs ``torch._grouped_mm`` on the CPU (2.8 has it for CUDA and meta only)."""
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _cpu_grouped_mm(), reason="this torch has no CPU torch._grouped_mm")
def test_grouped_mm_path_equals_the_sorted_loop_with_gradients():
    """The torch._grouped_mm path (llmtune picks it on CUDA + bfloat16; forced here on the CPU in float32)."""
    import llmtune.models.moe as moe

    torch.manual_seed(1)
    experts = torch.nn.ModuleList(moe.ExpertMLP(24, 16) for _ in range(5))
    x = torch.randn(29, 24, requires_grad=True)
    logits = torch.randn(29, 5)
    logits[:, 2] -= 100.0
    weights, top = torch.topk(torch.softmax(logits, -1), 2, dim=-1)
    ref = _naive_experts(x.detach(), experts, top, weights)
    outs, grads = [], []
    for grouped in (True, False):
        y = moe.experts_forward(x, experts, top, weights, grouped=grouped)
        assert not moe._GROUPED_MM_FAILED
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [x, experts[0].up_proj.weight, experts[4].down_proj.weight]))
    torch.testing.assert_close(outs[0].detach().double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_model_config_round_trips_through_transformers():
    from llmtune.models import ModelConfig

    for _, family, extra in SETTINGS:
        hf = hf_config(family, **extra)
        ours = ModelConfig.from_hf_dict(hf.to_dict())
        back = tf.AutoConfig.for_model(**{k: v for k, v in ours.to_hf_dict().items() if k != "model_type"},
                                       model_type=family)
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                    "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"):
            assert getattr(back, key) == getattr(hf, key), key
        if family == "qwen2_moe":
            assert back.shared_expert_intermediate_size == hf.shared_expert_intermediate_size
            assert back.qkv_bias is True
        assert ModelConfig.from_hf_dict(ours.to_hf_dict()) == ours


# -- LoRA / QLoRA on experts ------------------------------------------------------------------------

def _randomize_lora_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("sid", ["q2_top2", "q3_top2_norm"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
def test_lora_step_gives_gradients_on_every_adapter_including_experts(checkpoints, sid, checkpointing):
    from llmtune.peft import apply_lora
    from llmtune.train.stages import StageContext
    from llmtune.train.stages.causal_lm import causal_lm_stage

    folder, _ = checkpoints[sid]
    model = load_model(folder, dtype="float32")
    apply_lora(model, lora_rank=4, lora_target="all")
    _randomize_lora_b(model)  # B = 0 at init would make every lora_A gradient zero
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".mlp.experts.3.down_proj.lora_A" in n for n in names)
    assert any(".mlp.experts.0.gate_proj.lora_B" in n for n in names)
    assert not any(".mlp.gate." in n or "shared_expert_gate" in n for n in names)  # routers stay frozen
    if sid.startswith("q2"):
        assert any("shared_expert.up_proj.lora_A" in n for n in names)
    model.train()
    model.gradient_checkpointing_enable(checkpointing)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    cfg = type("C", (), {"moe_aux_loss_coef": 0.5})()
    loss_sum, n, metrics = causal_lm_stage(model, batch, StageContext(config=cfg))
    assert "aux_loss" in metrics and math.isfinite(float(metrics["aux_loss"]))
    (loss_sum / n).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_router_is_a_lora_target_only_when_named(checkpoints):
    from llmtune.peft.targets import select_lora_targets

    model = load_model(checkpoints["q2_top2"][0], dtype="float32")
    paths, names = select_lora_targets(model, "all")
    assert "model.layers.0.mlp.experts.3.up_proj" in paths and "model.layers.0.mlp.shared_expert.down_proj" in paths
    assert not any(p.endswith(".mlp.gate") or p.endswith("shared_expert_gate") for p in paths)
    assert "gate" not in names and "shared_expert_gate" not in names
    paths, _ = select_lora_targets(model, "gate")
    assert paths == [f"model.layers.{i}.mlp.gate" for i in range(3)]


def test_aux_loss_weight_enters_the_stage_loss(checkpoints):
    from llmtune.losses import causal_lm_loss
    from llmtune.train.stages import StageContext
    from llmtune.train.stages.causal_lm import causal_lm_stage

    folder, _ = checkpoints["q3_top1"]
    model = load_model(folder, dtype="float32")
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        plain, n = causal_lm_loss(model(ids), model.lm_head.weight, ids)
        aux = model.aux_loss
        for coef, expect in ((None, model.config.router_aux_loss_coef), (0.25, 0.25), (0.0, 0.0)):
            cfg = type("C", (), {"moe_aux_loss_coef": coef})()
            loss_sum, n2, metrics = causal_lm_stage(model, batch, StageContext(config=cfg))
            assert int(n2) == int(n)
            torch.testing.assert_close(loss_sum, plain + expect * aux * n)
            torch.testing.assert_close(metrics["aux_loss"], aux)


def test_qlora_quantizes_expert_projections_and_trains(checkpoints, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmtune.peft import apply_lora
    from llmtune.quant import Linear4bit

    folder, _ = checkpoints["q2_top2"]
    model = load_model(folder, dtype="float32", quantization_bit=4)
    block = model.model.layers[0].mlp
    assert isinstance(block.experts[2].up_proj, Linear4bit)
    assert isinstance(block.shared_expert.down_proj, Linear4bit)
    assert type(block.gate) is torch.nn.Linear and type(block.shared_expert_gate) is torch.nn.Linear
    # reference: transformers' model holding the dequantized NF4 weights gives the same logits
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear4bit):
            sd[name + ".weight"] = mod.dequantize().float().contiguous()
            if mod.bias is not None:
                sd[name + ".bias"] = mod.bias.detach().float().contiguous()
    for name, p in model.named_parameters():
        sd.setdefault(name, p.detach().contiguous())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    deq = tmp_path / "dequantized"
    deq.mkdir()
    shutil.copy(folder / "config.json", deq / "config.json")
    save_file({k: sd[k] for k in names}, str(deq / "model.safetensors"))
    ref = tf.AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    ids, mask = _batch(False)
    real = mask.bool()
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
    theirs = _hf(ref, ids, mask).logits
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4
    apply_lora(model, lora_rank=4, lora_target="all")
    _randomize_lora_b(model)
    model.train()
    hidden = model(ids, attention_mask=mask)
    (model.lm_head(hidden)[real].float().logsumexp(-1).mean() + model.aux_loss).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts.1.gate_proj.lora_A" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_peft_loads_our_expert_adapter_onto_transformers(checkpoints, tmp_path):
    """PEFT (test-only) applies our adapter file to transformers' Qwen3-MoE (whose experts are fused 3-D
    parameters: PEFT remaps the per-expert names) and gives the same logits, and our merge equals it."""
    peft = pytest.importorskip("peft")
    from llmtune.peft import apply_lora, merge_adapters, save_adapter

    folder, _ = checkpoints["q3_top2_norm"]
    model = load_model(folder, dtype="float32")
    apply_lora(model, lora_rank=4, lora_alpha=8, lora_target="all")
    _randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter", str(folder))
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= set(acfg["target_modules"])
    assert "gate" not in acfg["target_modules"]
    ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    model.eval()
    ids, mask = _batch(True)
    real = mask.bool()
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
        theirs = _hf(pm, ids, mask).logits
        assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5
        merge_adapters(model)
        merged = model.lm_head(model(ids, attention_mask=mask))
    assert type(model.model.layers[0].mlp.experts[1].up_proj) is torch.nn.Linear
    assert (merged[real] - theirs[real]).abs().max().item() <= 1e-5


def test_peft_applies_attention_and_shared_expert_adapters_of_qwen2_moe(checkpoints, tmp_path):
    """PEFT 0.21 on transformers 5 leaves Qwen2-MoE's fused routed experts without their adapters (documented
    limitation); the attention and shared-expert adapters of the same file load and agree with ours."""
    peft = pytest.importorskip("peft")
    from llmtune.peft import apply_lora, save_adapter

    folder, _ = checkpoints["q2_top2"]
    model = load_model(folder, dtype="float32")
    apply_lora(model, lora_rank=4, lora_alpha=8, lora_target="all")
    _randomize_lora_b(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp.experts." in n and "lora_B" in n:
                p.zero_()
    save_adapter(model, tmp_path / "adapter", str(folder))
    ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    model.eval()
    ids, mask = _batch(False)
    real = mask.bool()
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
        theirs = _hf(pm, ids, mask).logits
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


# -- end to end through the CLI ---------------------------------------------------------------------

WORDS = ("what is the color of sky sea grass snow sun blue green white yellow name your my i am a bot called "
         "tiny made by lab hello hi how are you fine thanks").split()


def _tiny_moe_run_inputs(tmp_path):
    """A tiny Qwen2-MoE folder (transformers' save_pretrained + a word-level ChatML tokenizer) and a dataset."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = tmp_path / "base"
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant", "system"] + list(dict.fromkeys(WORDS)))}
    ref = make_hf("qwen2_moe", num_experts_per_tok=2, shared_expert_intermediate_size=24, eos_token_id=3,
                  bos_token_id=None, pad_token_id=0, decoder_sparse_step=1, mlp_only_layers=[2])
    assert VOCAB >= len(vocab)
    ref.save_pretrained(base, safe_serialization=True)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<pad>",
                                                            "unk_token": "<unk>"}))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"what is the color of {t}", "input": "", "output": c}
            for t, c in (("sky", "blue"), ("sea", "blue"), ("grass", "green"), ("snow", "white"))]
    (data / "toy.json").write_text(json.dumps(rows * 4))
    (data / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.json"}}))
    return base, data, vocab


def test_cli_sft_and_export_on_a_tiny_moe_folder(tmp_path):
    import subprocess
    import sys

    base, data, vocab = _tiny_moe_run_inputs(tmp_path)
    out, exp = tmp_path / "sft", tmp_path / "exported"
    train = [sys.executable, "-m", "llmtune", "train", "--stage", "sft", "--model_name_or_path", str(base),
             "--dataset", "toy", "--dataset_dir", str(data), "--template", "chatml", "--finetuning_type", "lora",
             "--lora_target", "all", "--lora_rank", "4", "--output_dir", str(out), "--cutoff_len", "32",
             "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--max_steps", "3",
             "--logging_steps", "1", "--report_to", "none", "--moe_aux_loss_coef", "0.01"]
    r = subprocess.run(train, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("aux_loss" in row and math.isfinite(row["aux_loss"]) for row in logs)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert "gate" not in acfg["target_modules"] and "shared_expert_gate" not in acfg["target_modules"]
    r = subprocess.run([sys.executable, "-m", "llmtune", "export", "--model_name_or_path", str(base),
                        "--adapter_name_or_path", str(out), "--export_dir", str(exp), "--infer_dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # the exported folder is a plain Qwen2-MoE checkpoint: transformers reads it and agrees with our merge
    ours = llmtune_runs.load_model(base, dtype="float32", adapter_name_or_path=str(out))
    theirs = tf.AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32).eval()
    assert theirs.config.model_type == "qwen2_moe" and theirs.config.mlp_only_layers == [2]
    ids = torch.tensor([[vocab["what"], vocab["is"], vocab["the"], vocab["color"], vocab["of"], vocab["sky"]]])
    with torch.no_grad():
        a = ours.lm_head(ours(ids))
        b = theirs(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    trained = load_model(exp, dtype="float32")
    assert not torch.equal(trained.model.layers[0].mlp.experts[0].down_proj.weight,
                           load_model(base, dtype="float32").model.layers[0].mlp.experts[0].down_proj.weight)


# -- GGUF -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sid", ["q2_top2", "q3_top2_norm"])
def test_gguf_export_and_import_of_moe_tensors(checkpoints, sid, tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    from llmtune.models.gguf import gguf_tensor_names, read_gguf_metadata
    from llmtune.models.gguf_writer import write_gguf

    folder, ref = checkpoints[sid]
    model = load_model(folder, dtype="float32")
    arch = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[model.config.family]
    path = write_gguf(model, tmp_path / "m.gguf", "f32")
    # every tensor name is one of the gguf package's names for this architecture
    allowed = {TENSOR_NAMES[t] for t in MODEL_TENSORS[{"qwen2moe": MODEL_ARCH.QWEN2MOE,
                                                      "qwen3moe": MODEL_ARCH.QWEN3MOE}[arch]]}
    names = gguf_tensor_names(path)
    for name in names:
        base = name.rsplit(".", 1)[0]
        parts = base.split(".")
        templ = "blk.{bid}." + ".".join(parts[2:]) if parts[0] == "blk" else base
        assert templ in allowed, name
    assert "blk.1.ffn_gate_exps.weight" in names and "blk.0.ffn_gate_inp.weight" in names
    assert ("blk.0.ffn_up_shexp.weight" in names) == (arch == "qwen2moe")
    meta = read_gguf_metadata(path)
    k = gguf.Keys.LLM
    assert meta[k.EXPERT_COUNT.format(arch=arch)] == 4
    assert meta[k.EXPERT_USED_COUNT.format(arch=arch)] == 2
    assert meta[k.EXPERT_FEED_FORWARD_LENGTH.format(arch=arch)] == 16
    # our import gives the same model back; transformers' GGUF loader (its tensor mapping; its config
    # mapping lacks expert_feed_forward_length, so the config is given) reads the same weights
    back = load_model(path, dtype="float32")
    assert back.config.num_experts == 4 and back.config.norm_topk_prob == model.config.norm_topk_prob
    ids, mask = _batch(False)
    real = mask.bool()
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
        again = back.lm_head(back(ids, attention_mask=mask))
    assert (ours[real] - again[real]).abs().max().item() <= 1e-5
    theirs_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=ref.config,
                                                           dtype=torch.float32).eval()
    theirs = _hf(theirs_model, ids, mask).logits
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


def test_gguf_q8_0_moe_and_refusals(checkpoints, tmp_path):
    from llmtune.errors import LLMTuneError
    from llmtune.models.gguf_writer import write_gguf

    model = load_model(checkpoints["q3_top2_norm"][0], dtype="float32")
    path = write_gguf(model, tmp_path / "q8.gguf", "q8_0")
    back = load_model(path, dtype="float32")
    w0 = model.model.layers[2].mlp.experts[3].down_proj.weight
    w1 = back.model.layers[2].mlp.experts[3].down_proj.weight
    # Q8_0: 32-value blocks, absmax / 127 scale: error at most half a step per block
    assert (w0 - w1).abs().max() <= w0.abs().max() / 127 * 0.5 + 1e-6
    torch.testing.assert_close(back.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight)  # F32
    for sid in ("q2_step2_mlponly", "q3_top1"):
        with pytest.raises(LLMTuneError, match="export_format gguf"):
            write_gguf(load_model(checkpoints[sid][0], dtype="float32"), tmp_path / f"{sid}.gguf", "f32")


def test_bad_moe_config_keys_give_clear_errors():
    from llmtune.errors import LLMTuneError
    from llmtune.models import ModelConfig

    good = hf_config("qwen3_moe", num_experts_per_tok=2).to_dict()
    for change, match in (({"num_local_experts": None, "num_experts": None}, "num_experts"),
                          ({"moe_intermediate_size": None}, "moe_intermediate_size"),
                          ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
                          ({"mlp_only_layers": 3}, "mlp_only_layers")):
        with pytest.raises(LLMTuneError, match=match):
            ModelConfig.from_hf_dict({**good, **change})


def test_torchrun_ddp_lora_on_a_tiny_moe(tmp_path):
    """Two gloo ranks (torchrun, DDP) train LoRA on every expert: DDP needs every adapter in each step's graph
    (an expert without tokens on a rank is called on an empty batch), the run completes and experts train."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    base, data, _ = _tiny_moe_run_inputs(tmp_path)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    # --standalone: torchrun picks a free port itself (no race with other jobs for a port chosen here)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llmtune", "train", "--stage", "sft", "--model_name_or_path", str(base), "--dataset", "toy",
           "--dataset_dir", str(data), "--template", "chatml", "--finetuning_type", "lora", "--lora_rank", "4",
           "--cutoff_len", "32", "--per_device_train_batch_size", "1", "--max_steps", "2", "--logging_steps", "1",
           "--learning_rate", "1e-2", "--output_dir", str(out), "--ddp_timeout", "300", "--report_to", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any(".experts.3.down_proj.lora_B." in k for k in adapter)
    assert any(".experts." in k and ".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items())
