"""LoRA on MoE experts as grouped products (llmtune/peft/experts.py, models/moe.py ``_grouped_frozen``).

References: the per-expert loop (``GROUPED_FROZEN = False``: each expert's ``LoraLinear`` called on its rows,
the path of earlier versions) for gradients; a per-token, per-expert loop written here from LoRA's formula
(Hu et al. 2021, eq. 3) and top-k routing for the block output; transformers' Qwen3-MoE with the merged
weights for the logits; PEFT (test-only) for the adapter file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmtune.models.moe as moe
from llmtune.models.loader import load_model
from test_moe import spread_weights

tf = pytest.importorskip("transformers")

VOCAB = 64
CFG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1,
           eos_token_id=2, pad_token_id=0, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
           norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random-init Qwen3-MoE (transformers, float32, well-spread weights) saved as safetensors."""
    torch.manual_seed(0)
    ref = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**CFG)).float()
    spread_weights(ref)
    out = tmp_path_factory.mktemp("q3moe")
    ref.save_pretrained(out, safe_serialization=True)
    return out


def _lora_model(folder, seed=3, target="all", rank=4):
    from llmtune.peft import apply_lora

    model = load_model(folder, dtype="float32")
    torch.manual_seed(seed)
    apply_lora(model, lora_rank=rank, lora_alpha=8, lora_target=target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # B = 0 at init would make every lora_A gradient zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return ids, mask


def _loss_and_grads(model, ids, mask):
    model.train()
    hidden = model(ids, attention_mask=mask)
    logits = model.lm_head(hidden).float()
    loss = F.cross_entropy(logits[:, :-1][mask[:, 1:].bool()], ids[:, 1:][mask[:, 1:].bool()]) + model.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), model.aux_loss.detach(), grads


def test_expert_lora_gradients_equal_the_per_expert_loop(folder, monkeypatch):
    model = _lora_model(folder)
    ids, mask = _batch()
    grouped = _loss_and_grads(model, ids, mask)
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts._llmtune_groups   # the grouped path ran and keeps the base weights stacked
    w = experts[5].up_proj.base_layer.weight
    assert w.data_ptr() == gate_up[5, 16:].data_ptr() and not w.requires_grad
    monkeypatch.setattr(moe, "GROUPED_FROZEN", False)
    loop = _loss_and_grads(model, ids, mask)
    torch.testing.assert_close(grouped[0], loop[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped[1], loop[1], atol=1e-6, rtol=1e-6)   # load-balancing loss unchanged
    assert grouped[2].keys() == loop[2].keys()
    assert any(".mlp.experts.7.down_proj.lora_A" in n for n in grouped[2])
    for name in loop[2]:
        torch.testing.assert_close(grouped[2][name], loop[2][name], atol=1e-5, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grouped[2].items() if "experts.3.gate_proj.lora_A" in n)


def _hand_block(block, x):
    """A MoE block from the formulas: per token, per chosen expert, SwiGLU with ``W + s B A`` weights."""
    probs = torch.softmax(block.gate(x).double(), -1)
    p, idx = torch.topk(probs, block.top_k, -1)
    p = p / p.sum(-1, keepdim=True)

    def w(lin):
        eff = lin.base_layer.weight.double()
        for name in lin.active_adapters:
            eff = eff + lin.scaling[name] * lin.lora_B[name].weight.double() @ lin.lora_A[name].weight.double()
        return eff

    out = torch.zeros_like(x, dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(block.top_k):
            e = block.experts[int(idx[n, j])]
            xn = x[n].double()
            h = F.silu(w(e.gate_proj) @ xn) * (w(e.up_proj) @ xn)
            out[n] += p[n, j] * (w(e.down_proj) @ h)
    return out


def test_block_output_with_expert_lora_equals_a_hand_built_reference(folder):
    model = _lora_model(folder)
    block = model.model.layers[1].mlp
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        got = block(x)[0]
    assert hasattr(block.experts, "_llmtune_groups")
    torch.testing.assert_close(got.double(), _hand_block(block, x[0]), atol=1e-5, rtol=1e-5)


def test_logits_with_expert_lora_equal_transformers_with_merged_weights(folder):
    model = _lora_model(folder).eval()
    ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            hx = ref.model.layers[i].mlp.experts
            for e, ex in enumerate(layer.mlp.experts):
                gate, up, down = (ex.gate_proj.merged_weight(), ex.up_proj.merged_weight(),
                                  ex.down_proj.merged_weight())
                hx.gate_up_proj[e].copy_(torch.cat([gate, up]))
                hx.down_proj[e].copy_(down)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(ref.model.layers[i].self_attn, n).weight.copy_(
                    getattr(layer.self_attn, n).merged_weight())
    ids, mask = _batch()
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


def test_expert_adapter_save_load_round_trip_and_peft_keys(folder, tmp_path):
    from safetensors.torch import load_file

    from llmtune.peft import load_adapter, save_adapter

    model = _lora_model(folder).eval()
    ids, mask = _batch()
    with torch.no_grad():
        want = model.lm_head(model(ids, attention_mask=mask))
    save_adapter(model, tmp_path / "ad", str(folder))
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.experts.6.up_proj.lora_A.weight"   # PEFT's per-expert key
    assert keys[key].shape == (4, 32)
    assert keys[key.replace("lora_A", "lora_B")].shape == (16, 4)
    fresh = load_model(folder, dtype="float32")
    load_adapter(fresh, tmp_path / "ad")
    fresh.eval()
    with torch.no_grad():
        got = fresh.lm_head(fresh(ids, attention_mask=mask))
    assert hasattr(fresh.model.layers[0].mlp.experts, "_llmtune_groups")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(keys[key], model.model.layers[1].mlp.experts[6].up_proj.lora_A["default"].weight)


def test_weights_given_new_storage_are_grouped_again(folder):
    """A weight replaced through ``.data`` (a reload, ``.to()``) is no longer a view: the next forward
    groups the experts again and uses the new values; the state-dict names stay per expert."""
    model = _lora_model(folder).eval()
    block = model.model.layers[0].mlp
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        block(x)
        first = block.experts._llmtune_groups
        lin = block.experts[2].down_proj.base_layer
        lin.weight.data = lin.weight.data.clone() * 2.0
        got = block(x)[0]
    assert block.experts._llmtune_groups[1].data_ptr() != first[1].data_ptr()
    torch.testing.assert_close(got.double(), _hand_block(block, x[0]), atol=1e-5, rtol=1e-5)
    assert "model.layers.0.mlp.experts.2.down_proj.base_layer.weight" in model.state_dict()


def test_sorted_grouped_mm_layout_equals_the_padded_one(folder, monkeypatch):
    """The CUDA layout (``torch._grouped_mm`` over sorted rows, bf16, widths and ranks multiples of 8), run on
    the CPU where torch has the kernel, against the padded ``bmm`` layout: outputs and adapter gradients."""
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        pytest.skip("this torch has no CPU torch._grouped_mm")
    model = _lora_model(folder, rank=8).to(torch.bfloat16)
    block = model.model.layers[0].mlp
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    weights, top, _ = moe.route(block.gate(x), 2, True)
    runs = []
    for cuda in (False, True):
        monkeypatch.setattr(moe, "is_cuda", lambda t, c=cuda: c)
        y = moe._grouped_frozen(x, block.experts, top, weights)
        y.float().square().sum().backward()
        a = block.experts[4].gate_proj.lora_A["default"].weight
        runs.append((y.detach().float(), a.grad.float().clone()))
        a.grad = None
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=3e-2, rtol=3e-2)


def test_unbalanced_routing_and_dora(folder):
    """Unbalanced routing (expert 0 gets every token): the rows beyond the padded capacity go through a second
    padded product over the crowded experts alone; output and adapter gradients equal the per-expert loop's.
    DoRA experts: no grouped path (None)."""
    from llmtune.peft import apply_lora

    model = _lora_model(folder)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(30, 32, requires_grad=True)
    top = torch.zeros(30, 2, dtype=torch.long)
    top[:, 1] = torch.arange(30) % 7 + 1
    w = torch.softmax(torch.randn(30, 2), -1)
    sizes = torch.bincount(top.reshape(-1), minlength=8).tolist()
    assert moe._capacity(sizes) < max(sizes)
    params = [experts[0].gate_proj.lora_A["default"].weight, experts[0].down_proj.lora_B["default"].weight,
              experts[3].up_proj.lora_B["default"].weight]
    runs = []
    for fn in (lambda: moe._grouped_frozen(x, experts, top, w),
               lambda: moe.experts_forward(x, experts, top, w, grouped=False)):
        y = fn()
        runs.append((y.detach(), torch.autograd.grad(y.square().sum(), [x] + params)))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dora = load_model(folder, dtype="float32")
    apply_lora(dora, lora_rank=4, lora_target="gate_proj", use_dora=True)
    assert moe._grouped_frozen(x, dora.model.layers[0].mlp.experts, top, w) is None


def test_slot_layout_hand_case():
    """Experts with 3, 0, 17 and 16 rows: blocks of 16, (none), 32 and 16 slots, rows in sort order."""
    from llmtune.models.moe_sorted import slot_layout

    sizes = [3, 0, 17, 16]
    eid = torch.tensor([0] * 3 + [2] * 17 + [3] * 16)
    pos = torch.cat([torch.arange(n) for n in sizes if n])
    slot, spans, total = slot_layout(sizes, eid, pos)
    assert spans == [(0, 0, 16), (2, 16, 48), (3, 48, 64)] and total == 64
    assert slot.tolist() == [0, 1, 2] + list(range(16, 33)) + list(range(48, 64))


def test_lora_training_runs_the_sorted_function_and_equals_the_loop(folder, monkeypatch):
    """LoRA on every expert projection, float32, no dropout: the CPU path is ``SortedExpertsLora`` (counted
    here), and its output and every adapter gradient equal the per-expert loop's (1e-5)."""
    calls = []
    real = moe.SortedExpertsLora.apply
    monkeypatch.setattr(moe.SortedExpertsLora, "apply", lambda *a: calls.append(1) or real(*a))
    model = _lora_model(folder, seed=5)
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(37, 32, requires_grad=True)
    top = torch.randint(0, 8, (37, 2))
    top[:, 1] = (top[:, 0] + 1 + torch.arange(37) % 7) % 8
    w = torch.softmax(torch.randn(37, 2), -1)
    params = [p for n, p in experts.named_parameters() if "lora_" in n]
    runs = []
    for fn in (lambda: moe._grouped_frozen(x, experts, top, w),
               lambda: moe.experts_forward(x, experts, top, w, grouped=False)):
        y = fn()
        runs.append((y.detach(), torch.autograd.grad(y.square().sum(), [x] + params)))
    assert calls == [1]
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
