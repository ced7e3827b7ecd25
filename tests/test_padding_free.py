"""Padding-free batches and segment-aware attention.

References are independent of the code under test: padded batches through the dense-mask attention, and an
explicit float64 softmax attention written here from the definition (a query attends to keys of its own
segment at or before it, within the sliding window).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pref_helpers import kto_rows, lora_pair, pair_rows, sft_rows
from tiny_helpers import rows as tiny_rows
from tiny_helpers import tiny_model

from llmtune.data.collator import get_collator, num_rows, unpack_rows
from llmtune.models import ModelConfig, Transformer
from llmtune.models.transformer import SegmentSpans, attend, segment_spans
from llmtune.train.stages import StageContext, get_stage
from config_helpers import make_config


# -- attention against a float64 reference -----------------------------------------------------------------
def ref_attention(q, k, v, seg_q, seg_k, pos_q, pos_k, window=None):
    """softmax(q k^T / sqrt(d) + mask) v in float64; ``seg``: segment ids (0 = padding), ``pos``: absolute
    positions. Padding queries get 0. q (B,H,T,D), k/v (B,Hkv,L,D) -> (B,T,H,D)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    allowed = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] > 0)
    allowed &= pos_k[None, None, :] <= pos_q[None, :, None]
    if window is not None:
        allowed &= pos_k[None, None, :] > pos_q[None, :, None] - window
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    out = (p @ v).transpose(1, 2)
    return out * (seg_q > 0)[:, :, None, None]


def _qkv(b, t, h=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g),
            torch.randn(b, hkv, t, d, generator=g))


CASES = {
    "causal": [[1] * 9, [1] * 9],
    "right_padded": [[1] * 9, [1] * 5 + [0] * 4],
    "left_padded": [[1] * 9, [0] * 3 + [1] * 6],
    "packed": [[1, 1, 1, 2, 2, 3, 3, 3, 3], [1] * 4 + [2] * 5],
    "packed_padded": [[1, 1, 2, 2, 2, 2, 0, 0, 0], [1] * 9],
    "packed_one_row": [[1, 1, 1, 2, 2, 3, 3, 3, 3, 4]],           # padding-free batches: one packed row
}


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_segment_attention_matches_reference(case, window):
    seg = torch.tensor(CASES[case])
    b, t = seg.shape
    q, k, v = _qkv(b, t)
    pos = torch.arange(t)
    ref = ref_attention(q, k, v, seg, seg, pos, pos, window)
    spans = segment_spans(seg, window)
    assert isinstance(spans, SegmentSpans)
    out = attend(q, k, v, spans)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    # the gradient flows to every input exactly as the reference's does
    qs, ks, vs = (x.clone().double().requires_grad_() for x in (q, k, v))
    w = torch.randn(b, t, q.shape[1], q.shape[3], dtype=torch.float64)
    (attend(qs, ks, vs, segment_spans(seg, window)) * w).sum().backward()
    qr, kr, vr = (x.clone().double().requires_grad_() for x in (q, k, v))
    (ref_attention(qr, kr, vr, seg, seg, pos, pos, window) * w).sum().backward()
    for a, r in ((qs, qr), (ks, kr), (vs, vr)):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("autocast", [True, False])
def test_short_bf16_spans_run_in_float32_on_the_cpu(monkeypatch, autocast):
    """bf16 spans up to 256 tokens go to SDPA in float32 on the CPU, also under bf16 autocast (which would
    recast them); longer spans stay in bf16. Output and gradients against the float64 reference."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], q.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    seg = torch.tensor([[1] * 5 + [2] * 300 + [3] * 7])
    t = seg.shape[1]
    q, k, v = (x.to(torch.bfloat16) for x in _qkv(1, t, d=16))
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = attend(qs, ks, vs, segment_spans(seg))
    assert out.dtype == torch.bfloat16
    assert seen == [(5, torch.float32), (300, torch.bfloat16), (7, torch.float32)]
    pos = torch.arange(t)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref = ref_attention(qr, kr, vr, seg, seg, pos, pos)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    short = torch.cat([torch.arange(5), torch.arange(305, t)])        # the float32 spans: one bf16 rounding
    torch.testing.assert_close(out.double()[:, short], ref[:, short], atol=1e-2, rtol=2**-8)
    w = torch.randn(ref.shape, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for a, r in ((qs, qr), (ks, kr), (vs, vr)):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.double(), r.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_grouped_query_causal_attention(dtype):
    """No mask, grouped-query heads, bf16/fp16 on the CPU: the query heads of a group run as one query with a
    stacked causal mask; output and gradients against the float64 reference (causal, one segment per row)."""
    q, k, v = _qkv(2, 33, h=6, hkv=2, d=16, seed=3)
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    w = torch.randn(2, 33, 6, 16)
    out = attend(*leaves, None)
    (out.float() * w).sum().backward()
    ones, pos = torch.ones(2, 33, dtype=torch.long), torch.arange(33)
    ref_leaves = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
    ref = ref_attention(*ref_leaves, ones, ones, pos, pos)
    (ref * w.double()).sum().backward()
    assert out.dtype == dtype and out.shape == (2, 33, 6, 16)
    assert torch.allclose(out.double(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(leaves, ref_leaves):
        assert torch.allclose(got.grad.double(), want.grad, atol=6e-2, rtol=3e-2)


def test_segment_with_a_gap_falls_back_to_the_dense_mask():
    seg = torch.tensor([[1, 1, 0, 1, 1, 2]])
    assert segment_spans(seg) is None
    model = tiny_model().eval()
    ids = torch.randint(1, 60, (1, 6))
    out = model(ids, attention_mask=seg)
    model.attention_masks = "dense"
    torch.testing.assert_close(out, model(ids, attention_mask=seg), atol=1e-6, rtol=1e-6)


def test_no_dense_mask_is_built_for_packed_batches(monkeypatch):
    import llmtune.models.transformer as tr

    def boom(*a, **k):
        raise AssertionError("dense mask built")

    monkeypatch.setattr(tr, "build_attention_mask", boom)
    model = tiny_model().eval()
    ids = torch.randint(1, 60, (1, 10))
    model(ids, attention_mask=torch.tensor([[1] * 4 + [2] * 6]))          # packed: spans, no mask
    model(torch.randint(1, 60, (2, 10)), attention_mask=torch.tensor([[1] * 10, [0] * 3 + [1] * 7]))


def _model_with_window(window):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=window)
    return Transformer(cfg).float().eval()


@pytest.mark.parametrize("window", [None, 4])
def test_model_spans_equal_each_sequence_alone(window):
    """A packed/padded forward gives each sequence the hidden states it gets alone (float32, tight)."""
    model = _model_with_window(window)
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(1, 61, (n,), generator=g) for n in (5, 9, 3))
    alone = [model(x[None])[0] for x in (a, b, c)]
    packed = model(torch.cat([a, b, c])[None], attention_mask=torch.tensor([[1] * 5 + [2] * 9 + [3] * 3]))[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    left = torch.zeros(2, 9, dtype=torch.long)
    left[0], left[1, 4:] = b, a
    mask = (left != 0).long()
    mask[0] = 1
    out = model(left, attention_mask=mask)
    torch.testing.assert_close(out[1, 4:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], alone[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_kv_cache_decode_with_left_padding_matches_full_forward(window):
    model = _model_with_window(window)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 61, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    full = model(ids, attention_mask=mask)
    hidden, cache = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
    steps = [hidden]
    for i in range(6, 10):
        h, cache = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache)
        steps.append(h)
    inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inc[1, 3:], full[1, 3:], atol=1e-5, rtol=1e-5)


# -- padding-free batches: same losses and gradients as padded ones, every stage -----------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(stage, model, batch, config, extra=None):
    model.zero_grad(set_to_none=True)
    config = make_config(**config) if isinstance(config, dict) else config
    ctx = StageContext(config=config, extra=dict(extra or {}))
    loss, items, metrics = get_stage(stage)(model, batch, ctx)
    loss.backward()
    return loss.detach(), int(items), {k: float(v) for k, v in metrics.items()}, _grads(model)


def _compare(stage, model, rows, config, extra=None, dense=False):
    padded = get_collator(stage, 0, padding_free=False)(rows)
    free = get_collator(stage, 0, padding_free=True)(rows)
    assert free["input_ids"].shape[0] == 1 and "cu_seqlens" in free
    assert num_rows(free) == num_rows(padded)
    if dense:   # the reference: padded batch through the dense (B, 1, T, T) mask
        model.attention_masks = "dense"
    a = _run(stage, model, padded, config, extra)
    model.attention_masks = "spans"
    b = _run(stage, model, free, config, extra)
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-5)
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for key in a[2]:
        assert abs(a[2][key] - b[2][key]) < 1e-4, key
    assert a[3].keys() == b[3].keys() and a[3]
    for n in a[3]:
        torch.testing.assert_close(b[3][n], a[3][n], atol=1e-5, rtol=1e-4, msg=n)
    return a, b


@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_padding_free_causal_lm(stage):
    rows = tiny_rows([7, 12, 4, 9], prompt=3 if stage == "sft" else 0)
    if stage == "pt":
        for r in rows:
            r["labels"] = list(r["input_ids"])
    from llmtune.train.stages.causal_lm import count_label_tokens

    a, _ = _compare(stage, tiny_model(), rows, {"stage": stage}, dense=True)
    free = get_collator(stage, 0, padding_free=True)(rows)
    assert count_label_tokens(free) == a[1]


def test_padding_free_keeps_packed_rows_segments():
    """A row already packed with segment ids (sft packing) keeps its segments apart in a padding-free batch."""
    from llmtune.data.encode import pack_rows

    rows = pack_rows(tiny_rows([5, 6, 4, 3], prompt=1), cutoff_len=11)
    assert any(max(r["attention_mask"]) > 1 for r in rows)
    _compare("sft", tiny_model(), rows, {"stage": "sft"}, dense=True)


def test_padding_free_rm():
    from llmtune.train.stages.rm import prepare_reward_model

    model = tiny_model()
    prepare_reward_model(model, {"stage": "rm"}, head_only=False)
    with torch.no_grad():
        model.v_head.summary.weight.normal_()
    _compare("rm", model, pair_rows(3), {"stage": "rm"}, dense=True)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "orpo", "simpo"])
def test_padding_free_dpo(loss):
    _, model = lora_pair()
    cfg = {"stage": "dpo", "pref_loss": loss, "pref_beta": 0.5, "pref_ftx": 0.3}
    _compare("dpo", model, pair_rows(3), cfg, dense=True)


def test_padding_free_dpo_knowledge_mix_and_full_reference():
    model = tiny_model()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = {"stage": "dpo", "pref_loss": "sigmoid", "kto_alpha": 0.7}
    _compare("dpo", model, pair_rows(2) + sft_rows(2), cfg, extra={"ref_model": ref})


def test_padding_free_kto():
    _, model = lora_pair()
    _compare("kto", model, kto_rows(4), {"stage": "kto", "pref_beta": 0.3}, dense=True)


def test_unpack_rows_inverts_packing():
    rows = tiny_rows([3, 6, 2])
    free = get_collator("sft", 0, padding_free=True)(rows)
    padded = get_collator("sft", 7, padding_free=False)(rows)
    back = unpack_rows(free["input_ids"], free["cu_seqlens"], fill=7)
    assert torch.equal(back, padded["input_ids"])
    assert torch.equal(free["cu_seqlens"], torch.tensor([0, 3, 9, 11]))
    assert free["attention_mask"].tolist() == [[1] * 3 + [2] * 6 + [3] * 2]
    assert free["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1]]
    with pytest.raises(ValueError):
        unpack_rows(free["input_ids"][:, :-1], free["cu_seqlens"])


def test_equal_length_rows_keep_the_batched_layout():
    batch = get_collator("sft", 0, padding_free=True)(tiny_rows([5, 5, 5]))
    assert batch["input_ids"].shape == (3, 5) and "cu_seqlens" not in batch


def test_kto_parts_share_one_layout():
    rows = kto_rows(2)
    for r in rows:   # equal-length kl completions, different-length main ones
        r["kl_input_ids"], r["kl_labels"], r["kl_attention_mask"] = [3] * 6, [-100, -100] + [3] * 4, [1] * 6
    batch = get_collator("kto", 0, padding_free=True)(rows)
    assert "cu_seqlens" in batch and "kl_cu_seqlens" in batch
    _, model = lora_pair()
    _compare("kto", model, rows, {"stage": "kto", "pref_beta": 0.3}, dense=True)


def test_ppo_prompts_stay_left_padded():
    batch = get_collator("ppo", 0, padding_free=True)(tiny_rows([3, 5]))
    assert batch["input_ids"].shape == (2, 5) and "cu_seqlens" not in batch


# -- neat packing: packed examples never attend to each other --------------------------------------------------
def test_neat_packed_examples_never_attend_across():
    from llmtune.data.encode import pack_rows

    model = tiny_model().eval()
    examples = tiny_rows([6, 4, 5], prompt=1)
    seg = torch.tensor(pack_rows(examples, cutoff_len=15, neat=True)[0]["attention_mask"])
    assert seg.tolist() == [1] * 6 + [2] * 4 + [3] * 5
    for neat in (True, False):
        row = pack_rows(examples, cutoff_len=15, neat=neat)[0]
        batch = get_collator("sft", 0, padding_free=True)([row])
        ids = batch["input_ids"].clone()
        base = model(ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        changed = ids.clone()
        changed[0, seg == 1] = (changed[0, seg == 1] % 59) + 1                 # other tokens in example 1
        out = model(changed, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        later = seg > 1
        if neat:   # no query of examples 2, 3 sees example 1
            torch.testing.assert_close(out[0, later], base[0, later], atol=0, rtol=0)
        else:      # plain packing: later examples do attend to earlier ones
            assert not torch.allclose(out[0, later], base[0, later])


# -- regional compilation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_layers_agree_with_eager(backend):
    """Compiled decoder layers (dynamic lengths, span attention eager) give the eager outputs and gradients.

    ``aot_eager`` checks the tracing (dynamo + autograd graphs, graph break around the span attention); the
    inductor case runs only with ``LLMTUNE_TEST_INDUCTOR=1``: compiling C++ kernels takes minutes on a small
    shared CPU."""
    import os

    if backend == "inductor" and os.environ.get("LLMTUNE_TEST_INDUCTOR") != "1":
        pytest.skip("inductor compiles C++ for minutes on this CPU; set LLMTUNE_TEST_INDUCTOR=1 to run it")
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    compiled.compile_layers(backend=backend)
    for lens in ([5, 8], [9, 3, 5]):
        rows = tiny_rows(lens, seed=len(lens))
        batch = get_collator("sft", 0, padding_free=True)(rows)
        outs = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            h = m(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
            (h.pow(2).sum()).backward()
            outs.append((h.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
        for n in outs[0][1]:
            torch.testing.assert_close(outs[1][1][n], outs[0][1][n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_decode_attention_equals_the_softmax_formula(dtype):
    """A decode step's attention on the CPU (one query per row, grouped key/value heads, a ragged mask) against
    ``softmax(q k^T / sqrt(d) + mask) v`` in float64 with each key/value head repeated (Vaswani et al. 2017,
    eq. 1; Ainslie et al. 2023)."""
    from llmtune.models.transformer import attend

    torch.manual_seed(0)
    b, h, hk, length, d = 3, 6, 2, 7, 8
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, hk, length, d), torch.randn(b, hk, length, d)
    lengths = torch.tensor([7, 4, 1])
    mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :]
    got = attend(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    qd, kd, vd = (t.to(dtype).double() for t in (q, k, v))
    kd, vd = kd.repeat_interleave(h // hk, dim=1), vd.repeat_interleave(h // hk, dim=1)
    s = (qd @ kd.transpose(-1, -2)) / math.sqrt(d)
    want = (s.masked_fill(~mask, float("-inf")).softmax(-1) @ vd).transpose(1, 2)
    assert got.shape == (b, 1, h, d) and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    no_mask = attend(q.to(dtype), k.to(dtype), v.to(dtype), None)   # no mask: every key
    want_all = ((s.softmax(-1) @ vd).transpose(1, 2))
    torch.testing.assert_close(no_mask.double(), want_all, rtol=0, atol=tol)
