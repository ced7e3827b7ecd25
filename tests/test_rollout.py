"""The batched rollout engine and the preallocated KV cache, against independent references: a full forward
without cache (hidden states, log-probs), transformers' greedy generate on a tiny random Llama (test-only),
one-by-one decoding, and hand-built stop-token cases."""

from __future__ import annotations

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.generation import generate
from llmtune.models.transformer import KVCache
from llmtune.rollout import generate_rollouts
from tiny_helpers import VOCAB, tiny_model


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def full_forward_logits(model, input_ids, attention_mask):
    with torch.no_grad():
        return model.lm_head(model(input_ids, attention_mask=attention_mask)).double()


# ---------------------------------------------------------------------------------------------------------------
# KVCache
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_len", [None, 12])
def test_kv_cache_incremental_equals_full_forward(max_len):
    model = tiny_model().eval()
    ids = torch.tensor(prompts_of([12])[0])[None]
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.num_hidden_layers, max_len=max_len)
        h0, cache = model(ids[:, :5], past_key_values=cache, use_cache=True)
        steps = [h0]
        for t in range(5, 12):
            h, cache = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(h)
    assert cache.seq_len == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    if max_len is not None:  # buffers allocated once, at the requested size
        assert cache.layers[0][0].shape[2] == max_len


def test_kv_cache_grows_past_initial_capacity_and_overflow_raises():
    cache = KVCache(1)
    k = torch.randn(2, 1, 300, 4)
    cache.update(0, k[:, :, :200], k[:, :, :200])
    out, _ = cache.update(0, k[:, :, 200:], k[:, :, 200:])
    torch.testing.assert_close(out, k)  # copied across the doubling exactly
    assert cache.layers[0][0].shape[2] == 512
    fixed = KVCache(1, max_len=3)
    fixed.update(0, k[:, :, :3], k[:, :, :3])
    with pytest.raises(ValueError, match="max_len 3"):
        fixed.update(0, k[:, :, :1], k[:, :, :1])


def test_kv_cache_reorder_keeps_rows():
    cache = KVCache(1, max_len=5)
    k = torch.randn(3, 2, 4, 4)
    cache.update(0, k, k + 1)
    cache.reorder(torch.tensor([2, 0]))
    new = torch.randn(2, 2, 1, 4)
    out_k, out_v = cache.update(0, new, new)
    torch.testing.assert_close(out_k[:, :, :4], k[[2, 0]])
    torch.testing.assert_close(out_v[:, :, :4], k[[2, 0]] + 1)
    torch.testing.assert_close(out_k[:, :, 4:], new)


# ---------------------------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------------------------
def test_greedy_rollout_matches_generate_and_one_by_one():
    model = tiny_model()
    prompts = prompts_of([3, 7, 5, 1])
    ro = generate_rollouts(model, prompts, max_new_tokens=9, do_sample=False, pad_token_id=0)
    assert ro.input_ids.shape == (4, 7 + 9) and ro.prompt_len == 7
    for i, p in enumerate(prompts):
        ref = generate(model, torch.tensor([p]), max_new_tokens=9)[0].tolist()
        assert ro.completions()[i] == ref
        # the prompt is left-padded in place
        assert ro.input_ids[i, 7 - len(p):7].tolist() == p
        assert ro.attention_mask[i, :7].tolist() == [0] * (7 - len(p)) + [1] * len(p)
    # batch composition does not change greedy tokens
    for bs in (1, 3):
        other = generate_rollouts(model, prompts, max_new_tokens=9, do_sample=False, batch_size=bs)
        assert torch.equal(other.input_ids, ro.input_ids)
    assert ro.truncated.all() and ro.completion_lengths.tolist() == [9] * 4


def test_greedy_rollout_matches_transformers_generate():
    pytest.importorskip("transformers")
    from test_generation import tiny_pair

    hf, ours = tiny_pair("llama")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (4, 9, 6)]
    ro = generate_rollouts(ours, prompts, max_new_tokens=12, do_sample=False)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert ro.completions()[i] == out[0, len(p):].tolist()
    # transformers' own left-padded batch gives the same tokens
    with torch.no_grad():
        out = hf.generate(input_ids=ro.prompt_ids, attention_mask=ro.attention_mask[:, :ro.prompt_len],
                          max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out[:, ro.prompt_len:], ro.completion_ids)


def test_shared_prefix_rollouts_equal_independent_greedy_transformers():
    """GRPO's layout (each completion's prompt passed, equal prompts consecutive) and num_return_sequences both
    share a prompt's prefill across its completions; with 3 slots for 7 rows, rows join as others finish. Every
    completion equals transformers' greedy decoding of its prompt alone."""
    pytest.importorskip("transformers")
    from test_generation import tiny_pair

    hf, ours = tiny_pair("qwen2")
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randint(1, 96, (n,), generator=g).tolist() for n in (5, 11))
    refs = {}
    for p in (a, b):
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)
        refs[tuple(p)] = out[0, len(p):].tolist()
    rows = [a, a, a, a, b, b, b]
    ro = generate_rollouts(ours, rows, max_new_tokens=9, do_sample=False, batch_size=3)
    assert ro.completions() == [refs[tuple(p)] for p in rows]
    ro = generate_rollouts(ours, [b, a], max_new_tokens=9, do_sample=False, num_return_sequences=3, batch_size=4)
    assert ro.completions() == [refs[tuple(b)]] * 3 + [refs[tuple(a)]] * 3


def test_sampled_logps_match_transformers_forward():
    pytest.importorskip("transformers")
    from test_generation import tiny_pair

    hf, ours = tiny_pair("qwen2")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 8)]
    ro = generate_rollouts(ours, prompts, max_new_tokens=10, temperature=0.8, top_p=0.9, eos_token_ids=[7, 11],
                           num_return_sequences=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pos = (ro.attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = hf(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits.double()
    p, c = ro.prompt_len, ro.completion_mask.shape[1]
    lp = torch.log_softmax(logits[:, p - 1:p + c - 1] / 0.8, dim=-1)
    ref = lp.gather(2, ro.completion_ids[:, :, None]).squeeze(2) * ro.completion_mask
    torch.testing.assert_close(ro.logps.double(), ref, atol=1e-4, rtol=1e-4)



def test_stop_tokens_masks_and_padding():
    model = tiny_model()
    prompts = prompts_of([4, 6])
    free = generate_rollouts(model, prompts, max_new_tokens=8, do_sample=False).completions()
    stop = free[0][2]
    first = [row.index(stop) if stop in row else None for row in free]
    ro = generate_rollouts(model, prompts, max_new_tokens=8, do_sample=False, eos_token_ids=[stop], pad_token_id=60)
    for i, row in enumerate(free):
        n = 8 if first[i] is None else first[i] + 1
        assert ro.completion_lengths[i] == n
        assert ro.completions()[i] == row[:n]  # the stop token is kept
        assert ro.completion_mask[i].tolist() == [1] * n + [0] * (ro.completion_mask.shape[1] - n)
        assert ro.completion_ids[i, n:].tolist() == [60] * (ro.completion_mask.shape[1] - n)
        assert bool(ro.truncated[i]) == (first[i] is None)
        assert torch.equal(ro.attention_mask[i, ro.prompt_len:], ro.completion_mask[i])
        assert (ro.logps[i, n:] == 0).all()
    assert ro.completion_mask.shape[1] == int(ro.completion_lengths.max())


@pytest.mark.parametrize("do_sample,temperature,top_k", [(True, 0.7, 5), (True, 1.0, 0), (False, 1.0, 0)])
def test_logps_equal_full_forward_recomputation(do_sample, temperature, top_k):
    model = tiny_model()
    prompts = prompts_of([3, 6, 2])
    g = torch.Generator().manual_seed(1)
    ro = generate_rollouts(model, prompts, max_new_tokens=7, do_sample=do_sample, temperature=temperature,
                           top_k=top_k, eos_token_ids=[5, 9], num_return_sequences=2, batch_size=4, generator=g)
    logits = full_forward_logits(model, ro.input_ids, ro.attention_mask)
    p, c = ro.prompt_len, ro.completion_mask.shape[1]
    temp = temperature if do_sample else 1.0
    lp = torch.log_softmax(logits[:, p - 1:p + c - 1] / temp, dim=-1)
    ref = lp.gather(2, ro.completion_ids[:, :, None]).squeeze(2) * ro.completion_mask
    assert ro.logps.dtype == torch.float32
    torch.testing.assert_close(ro.logps.double(), ref, atol=2e-5, rtol=1e-5)


def test_groups_are_consecutive_and_sampling_is_reproducible():
    model = tiny_model()
    prompts = prompts_of([3, 5])
    greedy = generate_rollouts(model, prompts, max_new_tokens=5, do_sample=False, num_return_sequences=3)
    assert greedy.input_ids.shape[0] == 6
    assert all(torch.equal(greedy.input_ids[k], greedy.input_ids[3 * (k // 3)]) for k in range(6))
    a = generate_rollouts(model, prompts, max_new_tokens=5, num_return_sequences=3,
                          generator=torch.Generator().manual_seed(7))
    b = generate_rollouts(model, prompts, max_new_tokens=5, num_return_sequences=3,
                          generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logps, b.logps)
    assert a.prompt_ids[:3].tolist() == [[0, 0] + prompts[0]] * 3
    # top_k = 1 sampling is greedy
    k1 = generate_rollouts(model, prompts, max_new_tokens=5, top_k=1, num_return_sequences=3)
    assert torch.equal(k1.input_ids, greedy.input_ids)


def test_training_flag_restored_and_outputs_usable_in_autograd():
    model = tiny_model().train()
    ro = generate_rollouts(model, prompts_of([2, 3]), max_new_tokens=3)
    assert model.training
    hidden = model(ro.input_ids, attention_mask=ro.attention_mask)
    hidden.sum().backward()  # rollout tensors are ordinary tensors


@pytest.mark.parametrize("kw,match", [(dict(max_new_tokens=0), "max_new_tokens"),
                                      (dict(max_new_tokens=2, num_return_sequences=0), "num_generations"),
                                      (dict(max_new_tokens=2, batch_size=0), "batch_size"),
                                      (dict(max_new_tokens=2, top_p=0.0), "top_p")])
def test_bad_settings_raise(kw, match):
    with pytest.raises(LLMTuneError, match=match):
        generate_rollouts(tiny_model(), prompts_of([2]), **kw)
    with pytest.raises(LLMTuneError, match="prompt 1 is empty"):
        generate_rollouts(tiny_model(), [[1], []], max_new_tokens=2)


def test_completion_metrics_hand_case():
    from llmtune.rollout import completion_metrics

    m = completion_metrics(torch.tensor([3, 8, 5, 8]), torch.tensor([False, True, False, True]))
    assert m == {"completions/mean_length": 6.0, "completions/min_length": 3.0, "completions/max_length": 8.0,
                 "completions/clipped_ratio": 0.5, "completions/mean_terminated_length": 4.0,
                 "completions/min_terminated_length": 3.0, "completions/max_terminated_length": 5.0}
    m = completion_metrics(torch.tensor([4, 4]), torch.tensor([True, True]))
    assert m["completions/mean_terminated_length"] == 0.0 and m["completions/clipped_ratio"] == 1.0


def test_rollout_with_lora_model_matches_generate():
    from llmtune.peft import apply_lora

    model = tiny_model()
    model = apply_lora(model, lora_rank=4, lora_target="all")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero adapter, so it takes part
    prompts = prompts_of([2, 5])
    ro = generate_rollouts(model, prompts, max_new_tokens=6, do_sample=False)
    for i, p in enumerate(prompts):
        assert ro.completions()[i] == generate(model, torch.tensor([p]), max_new_tokens=6)[0].tolist()


def test_inverse_cdf_draw_frequencies_match_the_distribution_and_skip_zero_weights(monkeypatch):
    """Inverse transform sampling (Devroye 1986, II.2): over 200,000 seeded draws each index's frequency is its
    probability (hand-chosen weights, zeros included, rows of different sums) within 5 standard errors, a
    zero-weight index is never drawn, and ``U`` at the top of [0, 1) maps to the last positive index."""
    from llmtune.sampling import inverse_cdf_draw

    w = torch.tensor([[0.0, 1.0, 0.0, 3.0, 6.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    want = w / w.sum(1, keepdim=True)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([inverse_cdf_draw(w, g) for _ in range(n)])     # (n, 2)
    for r in range(2):
        freq = torch.bincount(draws[:, r], minlength=6).double() / n
        se = (want[r].double() * (1 - want[r].double()) / n).sqrt()
        assert ((freq - want[r]).abs() <= 5 * se + 1e-12).all(), (r, freq, want[r])
        assert (freq[want[r] == 0] == 0).all()
    assert torch.equal(inverse_cdf_draw(w, torch.Generator().manual_seed(3)),
                       inverse_cdf_draw(w, torch.Generator().manual_seed(3)))
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(a[0], a[1], dtype=torch.float64))
    assert inverse_cdf_draw(w).tolist() == [4, 5]
