"""Qwen2-MoE / Qwen3-MoE: logits and the load-balancing loss against transformers (test-only reference), the
grouped expert compute against a naive per-token loop, LoRA on experts, PEFT interop, GGUF, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

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


def make_hf(family: str, seed: int = 0, **extra):
    """A float32 transformers MoE model with well-spread random weights (routing differs per token)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family, **extra), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
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


def test_balanced_router_gives_top_k():
    """Hand-computed case: a uniform router gives f_e = k / E and P_e = 1 / E, so E * sum f_e P_e = k."""
    from llmtune.models.moe import load_balancing_loss

    probs = torch.full((8, 4), 0.25)
    top = torch.tensor([[0, 1], [2, 3]] * 4)
    assert abs(load_balancing_loss([(probs, top)], 4).item() - 2.0) < 1e-6
