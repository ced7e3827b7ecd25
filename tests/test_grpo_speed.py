"""GRPO step savings (issue 28): padding-free completion log-probs against per-row forwards computed by hand,
micro-batches split by ``max_tokens_per_micro_batch`` without changing the loss or the gradients (float32,
1e-6), no old-policy forward when ``num_iterations`` is 1, and the rollout weights' casts, merges, packed and
fused products against ``F.linear`` of weights merged by hand."""

from __future__ import annotations

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.rollout import generate_rollouts
from llmtune.train.stages import grpo as grpo_mod
from llmtune.train.stages.grpo import GRPOStage, completion_forward, micro_batch_slices
from llmtune.train.trainer import Trainer
from test_grpo import ROWS, grpo_config
from test_ppo import EOS, PAD, PROMPTS, FakeTokenizer, lora_model


def _rollout(model, seed=0):
    torch.manual_seed(seed)
    prompts = [p for p in PROMPTS for _ in range(2)]
    return generate_rollouts(model, prompts, max_new_tokens=6, do_sample=True, temperature=1.0, top_k=0,
                             eos_token_ids=EOS, pad_token_id=PAD)


def test_packed_completion_logps_and_entropy_equal_per_row_forwards_by_hand():
    model = lora_model().eval()
    ro = _rollout(model)
    p, t = ro.prompt_len, 0.7
    with torch.no_grad():
        packed = completion_forward(model, ro.input_ids, ro.attention_mask, p, ro.completion_mask, t, entropy=True)
        padded = completion_forward(model, ro.input_ids, ro.attention_mask, p, ro.completion_mask, t, entropy=True,
                                    packed=False)
        for i in range(ro.input_ids.shape[0]):  # reference: each row alone, no padding, softmax by hand
            ids = ro.input_ids[i][ro.attention_mask[i] > 0]
            plen = int(ro.attention_mask[i, :p].sum())
            logits = model(ids[None])[0] @ model.lm_head.weight.T / t              # (L, V)
            logp = torch.log_softmax(logits.float(), -1)
            n = int(ro.completion_mask[i].sum())
            want = logp[plen - 1:plen - 1 + n].gather(-1, ids[plen:plen + n, None])[:, 0]
            ent = -(logp.exp() * logp).sum(-1)[plen - 1:plen - 1 + n]
            torch.testing.assert_close(packed["logps"][i, :n], want, atol=1e-5, rtol=0)
            torch.testing.assert_close(packed["entropy"][i, :n], ent, atol=1e-5, rtol=0)
            assert (packed["logps"][i, n:] == 0).all()
    torch.testing.assert_close(packed["logps"], padded["logps"], atol=1e-5, rtol=0)


def test_micro_batch_slices_hand_cases_and_one_row_over_the_budget_is_one_clear_error():
    assert micro_batch_slices([3, 3, 3, 1], 4, None) == [slice(0, 4)]
    assert micro_batch_slices([3, 3, 3, 1], 2, None) == [slice(0, 2), slice(2, 4)]
    assert micro_batch_slices([3, 3, 3, 1], 4, 6) == [slice(0, 2), slice(2, 4)]
    assert micro_batch_slices([3, 3, 3, 1, 5], 4, 7) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    with pytest.raises(LLMTuneError, match="max_tokens_per_micro_batch.*completion 1.*10 tokens"):
        micro_batch_slices([3, 10, 2], 4, 5)


def _step(tmp_path, **kw):
    """One GRPO rollout (seeded) and its step loss + gradients, as the trainer accumulates them."""
    cfg = grpo_config(tmp_path, **kw)  # float32: no bf16/fp16
    model = lora_model()
    stage = GRPOStage(cfg, ROWS, [("len", lambda prompts, completions, **k: [float(len(c)) for c in completions])],
                      [1.0], FakeTokenizer(), PAD, EOS)
    trainer = Trainer(model, cfg, ROWS, online=stage)
    torch.manual_seed(0)
    steps = stage.make_experience(trainer)
    micro = steps[0].updates[0]
    model.zero_grad()
    total, items = torch.zeros(()), 0
    for b in micro:
        loss_sum, n, _ = stage.loss(model, b, None)
        total, items = total + loss_sum, items + n
    loss = total / items
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, micro


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_token_budget_splits_micro_batches_without_changing_the_loss(tmp_path, loss_type):
    kw = dict(loss_type=loss_type, beta=0.1, num_iterations=2, per_device_train_batch_size=8,
              gradient_accumulation_steps=1)
    loss_a, grads_a, micro_a = _step(tmp_path / "a", **kw)
    loss_b, grads_b, micro_b = _step(tmp_path / "b", max_tokens_per_micro_batch=20, **kw)
    assert len(micro_a) == 1 and len(micro_b) > 1
    assert all(int(b["attention_mask"].sum()) <= 20 for b in micro_b)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_iterations,beta,forwards", [(1, 0.0, 0), (1, 0.1, 1), (2, 0.1, 2), (2, 0.0, 1)])
def test_log_prob_forwards_only_where_the_loss_needs_them(tmp_path, monkeypatch, num_iterations, beta, forwards):
    calls = []
    real = grpo_mod.completion_forward
    monkeypatch.setattr(grpo_mod, "completion_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = grpo_config(tmp_path, beta=beta, num_iterations=num_iterations, per_device_train_batch_size=8,
                      gradient_accumulation_steps=1)
    stage = GRPOStage(cfg, ROWS, [("len", lambda prompts, completions, **k: [1.0] * len(completions))], [1.0],
                      FakeTokenizer(), PAD, EOS)
    steps = stage.make_experience(Trainer(lora_model(), cfg, ROWS, online=stage))
    assert len(calls) == forwards   # one micro-batch: reference (beta > 0) and old policy (num_iterations > 1)
    b = steps[0].updates[0][0]
    assert ("old_logps" in b) == (num_iterations > 1) and ("ref_logps" in b) == (beta > 0)


def test_frozen_weights_cast_once_gives_autocasts_tokens_and_logps_bitwise_and_restores_the_weights():
    from llmtune.train.precision import frozen_weights_cast

    model = lora_model().eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as the real model
    before = {k: p for k, p in model.named_parameters()}
    runs = []
    for cast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16), frozen_weights_cast(model, torch.bfloat16 if cast else None):
            if cast:  # the frozen base linears hold bf16 copies; LoRA (trainable) and the embedding do not
                assert model.lm_head.weight.dtype == torch.bfloat16
                assert model.model.embed_tokens.weight.dtype == torch.float32
                assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            torch.manual_seed(0)
            ro = generate_rollouts(model, [p for p in PROMPTS for _ in range(2)], max_new_tokens=6, do_sample=True,
                                   temperature=1.0, top_k=0, eos_token_ids=EOS, pad_token_id=PAD, return_logps=True)
        runs.append(ro)
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    assert torch.equal(runs[0].logps, runs[1].logps)
    after = {k: p for k, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _layer_and_merge_by_hand(model, name):
    """The LoRA layer ``name`` and ``bf16(W0 + s B A)`` computed in float64 (Hu et al. 2021, section 4.1)."""
    from llmtune import peft

    layer = dict(peft.lora_layers(model))[name]
    w0, a, b = (t.detach().double() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                               layer.lora_B["default"].weight))
    return layer, (w0 + layer.scaling["default"] * (b @ a)).to(torch.bfloat16)


def test_merged_rollout_weights_equal_the_merge_formula_and_are_restored():
    """``merge_adapters``: each LoRA layer runs on ``bf16(W0 + s B A)`` (Hu et al. 2021, section 4.1, computed by
    hand here) with its adapter path off; on exit the original parameters and active adapters are back."""
    from llmtune.train.precision import frozen_weights_cast

    model = lora_model().eval()
    before = {k: p for k, p in model.named_parameters()}
    layer, want_w = _layer_and_merge_by_hand(model, "model.layers.0.mlp.up_proj")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            frozen_weights_cast(model, torch.bfloat16, merge_adapters=True):
        assert torch.equal(layer.base_layer.weight, want_w) and layer.active_adapters == []
        got = layer(x)
        assert torch.equal(got, torch.nn.functional.linear(x.to(torch.bfloat16), want_w))
        ro = generate_rollouts(model, PROMPTS, max_new_tokens=6, do_sample=False, eos_token_ids=EOS,
                               pad_token_id=PAD)
    with torch.no_grad():   # greedy tokens of the unmerged float32 policy (no near-ties at this size)
        ref = generate_rollouts(model, PROMPTS, max_new_tokens=6, do_sample=False, eos_token_ids=EOS,
                                pad_token_id=PAD)
    assert torch.equal(ro.input_ids, ref.input_ids)
    after = {k: p for k, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert layer.active_adapters == ["default"]


def test_packed_rollout_weights_give_f_linears_bf16_products_bitwise_and_are_removed():
    """``pack=True``: on the CPU each frozen bf16 linear runs on oneDNN's prepacked weight; its output equals
    ``F.linear`` of the merged bf16 weight (the formula above, by hand) bitwise at 1-9 rows and on 3-D input,
    a gradient request raises, greedy rollouts give the unpacked merged rollout's tokens, and on exit no
    packed forward is left and the parameters are the original objects."""
    from llmtune.train.precision import frozen_weights_cast, packed_linear_available

    if not packed_linear_available():
        pytest.skip("this torch build has no oneDNN prepacked bf16 linear (nothing is packed there)")
    model = lora_model().eval()
    before = {k: p for k, p in model.named_parameters()}
    layer, want_w = _layer_and_merge_by_hand(model, "model.layers.0.self_attn.q_proj")
    want_b = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().to(torch.bfloat16)
    ctx = dict(merge_adapters=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with frozen_weights_cast(model, torch.bfloat16, **ctx):
            plain = generate_rollouts(model, PROMPTS, max_new_tokens=6, do_sample=False, eos_token_ids=EOS,
                                      pad_token_id=PAD)
        with frozen_weights_cast(model, torch.bfloat16, pack=True, **ctx):
            assert "forward" in layer.base_layer.__dict__ and layer.active_adapters == []
            for rows in range(1, 10):
                x = torch.randn(rows, layer.in_features)
                assert torch.equal(layer(x), torch.nn.functional.linear(x.to(torch.bfloat16), want_w, want_b))
            x = torch.randn(2, 3, layer.in_features)
            assert torch.equal(layer(x), torch.nn.functional.linear(x.to(torch.bfloat16), want_w, want_b))
            packed = generate_rollouts(model, PROMPTS, max_new_tokens=6, do_sample=False, eos_token_ids=EOS,
                                       pad_token_id=PAD)
    assert torch.equal(packed.input_ids, plain.input_ids)
    with frozen_weights_cast(model, torch.bfloat16, pack=True, **ctx), \
            pytest.raises(RuntimeError, match="no gradient"):
        layer.base_layer(torch.randn(2, layer.in_features, requires_grad=True))
    assert not any("forward" in m.__dict__ for m in model.modules())
    after = {k: p for k, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert layer.active_adapters == ["default"]


def _fused_test_model():
    """A tiny tied model with q/k/v biases (Qwen2) and per-head q/k norms (Qwen3), LoRA on q, v and gate only,
    so each fused product mixes merged and plain frozen projections."""
    from llmtune import peft
    from llmtune.models import ModelConfig, Transformer
    from test_ppo import VOCAB

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, qkv_bias=True,
                      qk_norm=True)
    model = Transformer(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.2)
    peft.apply_lora(model, lora_rank=4, lora_target="q_proj,v_proj,gate_proj")
    with torch.no_grad():
        for _, layer in peft.lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    return model.eval()


def test_fused_qkv_and_gate_up_products_equal_f_linear_of_the_merged_weights_and_the_unfused_rollout(monkeypatch):
    """``pack=True`` fuses each layer's q|k|v and gate|up into one packed product: its output equals the
    concatenated ``F.linear`` of each projection's weight (merged ``bf16(W0 + s B A)`` computed by hand in float64
    for the LoRA layers, Hu et al. 2021 section 4.1; the bf16 weight and bias for the plain ones) bitwise, each
    projection called alone gives its own columns, the rollout's tokens and log-probs equal those of separate
    packed products bitwise, the greedy tokens equal the unmerged float32 policy's, and on exit nothing is left."""
    from llmtune.train import precision
    from llmtune.train.precision import frozen_weights_cast, packed_linear_available

    if not packed_linear_available():
        pytest.skip("this torch build has no oneDNN prepacked bf16 linear (nothing is packed there)")
    model = _fused_test_model()
    before = {k: p for k, p in model.named_parameters()}
    prompts = [p for p in PROMPTS for _ in range(2)]

    def want(prefix, names):
        """Each projection's bf16 weight and bias: merged by hand for a LoRA layer, else cast."""
        out = []
        for n in names:
            mod = model.get_submodule(f"{prefix}.{n}")
            if hasattr(mod, "base_layer"):
                mod = _layer_and_merge_by_hand(model, f"{prefix}.{n}")
                out.append((mod[0], mod[1], mod[0].base_layer.bias))
            else:
                out.append((mod, mod.weight.detach().to(torch.bfloat16), mod.bias))
        return [(m, w, None if b is None else b.detach().to(torch.bfloat16)) for m, w, b in out]

    def rollout(sample):
        torch.manual_seed(0)
        return generate_rollouts(model, prompts, max_new_tokens=6, do_sample=sample, temperature=1.0, top_k=0,
                                 eos_token_ids=EOS, pad_token_id=PAD, return_logps=True)

    runs = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with frozen_weights_cast(model, torch.bfloat16, merge_adapters=True, pack=True):
            for i, layer in enumerate(model.model.layers):
                for owner, attr, names in ((layer.self_attn, "packed_qkv", ("q_proj", "k_proj", "v_proj")),
                                           (layer.mlp, "packed_gate_up", ("gate_proj", "up_proj"))):
                    parts = want(f"model.layers.{i}.{'self_attn' if attr == 'packed_qkv' else 'mlp'}", names)
                    for shape in ((1, 32), (3, 32), (8, 32), (2, 3, 32)):
                        x = torch.randn(shape).to(torch.bfloat16)
                        ref = [torch.nn.functional.linear(x, w, b) for _, w, b in parts]
                        assert torch.equal(owner.__dict__[attr](x), torch.cat(ref, -1))
                        assert all(torch.equal(m(x), r) for (m, _, _), r in zip(parts, ref))
            runs["fused"] = [rollout(False), rollout(True)]
        monkeypatch.setattr(precision, "_fuse_projections", lambda *a: None)   # separate packed products
        with frozen_weights_cast(model, torch.bfloat16, merge_adapters=True, pack=True):
            assert not any("packed_qkv" in m.__dict__ for m in model.modules())
            runs["separate"] = [rollout(False), rollout(True)]
    for a, b in zip(runs["fused"], runs["separate"]):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logps, b.logps)
    with torch.no_grad():   # greedy tokens of the unmerged float32 policy (no near-ties at this size)
        ref = generate_rollouts(model, prompts, max_new_tokens=6, do_sample=False, eos_token_ids=EOS,
                                pad_token_id=PAD)
    assert torch.equal(runs["fused"][0].input_ids, ref.input_ids)
    assert not any({"forward", "packed_qkv", "packed_gate_up"} & m.__dict__.keys() for m in model.modules())
    after = {k: p for k, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


def test_one_query_attention_under_bf16_autocast_is_float32_softmax_attention():
    """A CPU decode step's attention under bf16 autocast keeps its documented float32 products: equal to
    ``softmax(q k^T / sqrt(D)) v`` computed in float64 by hand to float32 rounding (bf16 products would be
    off by ~1e-2), masked keys excluded, grouped query heads sharing their key/value head."""
    from llmtune.models.transformer import attend

    g = torch.Generator().manual_seed(0)
    b, h, hk, length, d = 3, 4, 2, 7, 16
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = torch.randn(b, hk, length, d, generator=g), torch.randn(b, hk, length, d, generator=g)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :3] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attend(q, k, v, mask)
        assert torch.is_autocast_enabled("cpu")
    kk, vv = (t.double().repeat_interleave(h // hk, dim=1) for t in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) / d ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    want_out = (s.softmax(-1) @ vv).transpose(1, 2)
    assert got.dtype == torch.float32 and got.shape == (b, 1, h, d)
    torch.testing.assert_close(got.double(), want_out, rtol=1e-5, atol=1e-6)
