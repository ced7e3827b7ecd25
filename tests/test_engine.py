"""The generation engine (llmtune.engine) against independent references: transformers' single-row greedy
``generate`` (test-only) for batches whose rows differ in length, join mid-decode, leave early and share a
prompt's prefill; a full forward's log-softmax for the reported log-probs; per-request seeds; cancel; adapters
handed to the model call."""

from __future__ import annotations

import pytest
import torch

from llmtune.engine import Engine, Request
from llmtune.errors import LLMTuneError
from llmtune.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

from test_generation import tiny_pair  # noqa: E402


def hf_greedy(hf, prompt, n, **kw):
    """transformers' greedy continuation of one unpadded prompt (list of int), ``n`` tokens, no stop."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    return out[0, len(prompt):].tolist()


def drive(engine, schedule):
    """Step ``engine`` until idle; ``schedule[step]`` = ``[(request, n), ...]`` queued before that step.
    Returns ``({rid: [tokens]}, {rid: finish_reason}, [[rid, ...] per group queued])``."""
    toks, reasons, groups, step = {}, {}, [], 0
    while engine.has_work() or any(s >= step for s in schedule):
        for req, n in schedule.get(step, []):
            groups.append(engine.add_group(req, n))
        for e in engine.step():
            toks.setdefault(e.request_id, []).append(e.token)
            if e.finish_reason:
                reasons[e.request_id] = e.finish_reason
        step += 1
    return toks, reasons, groups


PROMPTS = [[5, 17, 33, 2, 8, 61, 40], [9, 3], [70, 71, 12, 44], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True), ("qwen3", True)])
def test_joining_leaving_and_shared_rows_equal_transformers_single_row_greedy(family, tie):
    """3 slots for 8 rows: prompts of 1..11 tokens, two joining at steps 3 and 6, a group of 3 sharing one
    prefill, rows with 4..14 new tokens (leaving early frees their slots): every row's tokens equal
    transformers' greedy decoding of its prompt alone."""
    hf, ours = tiny_pair(family, tie)
    budget = [14, 9, 4, 12, 7]
    engine = Engine(ours, max_slots=3, max_len=32)
    schedule = {0: [(Request(PROMPTS[0], budget[0]), 1), (Request(PROMPTS[1], budget[1]), 3),
                    (Request(PROMPTS[2], budget[2]), 1)],
                3: [(Request(PROMPTS[3], budget[3]), 1)], 6: [(Request(PROMPTS[4], budget[4]), 2)]}
    toks, reasons, groups = drive(engine, schedule)
    order = [0, 1, 2, 3, 4]
    assert [len(g) for g in groups] == [1, 3, 1, 1, 2]
    for i, group in zip(order, groups):
        ref = hf_greedy(hf, PROMPTS[i], budget[i])
        for rid in group:
            assert toks[rid] == ref, (family, i, rid)
            assert reasons[rid] == "length"
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_per_row_stop_ids_and_settings_in_one_batch():
    """Row-level stop ids, max_new_tokens and repetition penalty: each row equals transformers alone."""
    hf, ours = tiny_pair("llama")
    free = hf_greedy(hf, PROMPTS[0], 12)
    stop = free[4]
    pen = SamplingParams(repetition_penalty=1.7)
    engine = Engine(ours, max_slots=4, max_len=40)
    ids = [engine.add_request(Request(PROMPTS[0], 12, stop_ids=[stop])),
           engine.add_request(Request(PROMPTS[1], 20, pen)),
           engine.add_request(Request(PROMPTS[3], 5))]
    toks, reasons, _ = drive(engine, {})
    n = free.index(stop) + 1
    assert toks[ids[0]] == free[:n] and reasons[ids[0]] == "stop"
    assert toks[ids[1]] == hf_greedy(hf, PROMPTS[1], 20, repetition_penalty=1.7)
    assert toks[ids[2]] == hf_greedy(hf, PROMPTS[3], 5) and reasons[ids[2]] == "length"


def test_run_sets_eval_mode_once_and_restores_training():
    """A model in training mode decodes in eval mode (every step) and is back in training mode afterwards, with
    ``Module.train`` called twice for the whole run, not twice per step (a walk over every submodule)."""
    hf, ours = tiny_pair("llama")
    ours.train()
    calls, seen = [], []
    real_train, real_step = ours.train, Engine._step

    def counting_train(mode=True):
        calls.append(mode)
        return real_train(mode)

    def watching_step(self):
        seen.append(self.model.training)
        return real_step(self)

    ours.train = counting_train
    Engine._step = watching_step
    try:
        done = Engine(ours, max_slots=2, max_len=32).run([Request(PROMPTS[0], 9), Request(PROMPTS[1], 6)])
    finally:
        Engine._step = real_step
        del ours.train
    assert [c.tokens for c in done] == [hf_greedy(hf, PROMPTS[0], 9), hf_greedy(hf, PROMPTS[1], 6)]
    assert len(seen) >= 9 and not any(seen)
    assert calls == [False, True] and ours.training


def full_logits(model, prompt, tokens):
    with torch.no_grad():
        ids = torch.tensor([list(prompt) + list(tokens)])
        return model.lm_head(model(ids))[0, len(prompt) - 1:-1].float()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_full_forward_log_softmax(temperature):
    _, ours = tiny_pair("qwen2")
    engine = Engine(ours, max_slots=4, max_len=40)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=20, top_p=0.9)
    reqs = [Request(p, 10, params, seed=i, logprobs=True, top_logprobs=3) for i, p in enumerate(PROMPTS[:3])]
    reqs.append(Request(PROMPTS[3], 8, logprobs=True))  # a greedy row: log-probs at temperature 1
    done = engine.run(reqs)
    for req, c in zip(reqs, done):
        t = req.sampling.temperature if req.sampling.do_sample else 1.0
        ref = torch.log_softmax(full_logits(ours, req.prompt, c.tokens) / t, dim=-1)
        got = torch.tensor(c.logprobs)
        torch.testing.assert_close(got, ref.gather(1, torch.tensor(c.tokens)[:, None])[:, 0], atol=1e-5, rtol=0)
        if req.top_logprobs:
            vals, idx = ref.topk(3, dim=-1)
            for s, top in enumerate(c.top_logprobs):
                assert [i for i, _ in top] == idx[s].tolist()
                torch.testing.assert_close(torch.tensor([v for _, v in top]), vals[s], atol=1e-5, rtol=0)
        else:
            assert c.top_logprobs is None


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    """A request with a seed samples the same tokens alone or beside other rows (its own generator)."""
    _, ours = tiny_pair("llama")
    params = SamplingParams(do_sample=True, temperature=1.3, top_p=0.95)

    def run(prompts_seeds, slots):
        engine = Engine(ours, max_slots=slots, max_len=40)
        return [c.tokens for c in engine.run([Request(p, 12, params, seed=s) for p, s in prompts_seeds])]

    alone = run([(PROMPTS[0], 11)], 1)[0]
    assert run([(PROMPTS[0], 11)], 1)[0] == alone
    mixed = run([(PROMPTS[1], 3), (PROMPTS[0], 11), (PROMPTS[2], 5)], 2)
    assert mixed[1] == alone
    assert run([(PROMPTS[0], 12)], 1)[0] != alone  # the seed matters (else this test checks nothing)


def test_cancel_frees_the_slot_for_a_waiting_request():
    hf, ours = tiny_pair("llama")
    engine = Engine(ours, max_slots=1, max_len=40)
    a = engine.add_request(Request(PROMPTS[0], 20))
    b = engine.add_request(Request(PROMPTS[2], 6))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    assert engine.cancel(a) and not engine.cancel(a)
    assert engine.num_running == 0
    toks, _, _ = drive(engine, {})
    assert a not in toks and toks[b] == hf_greedy(hf, PROMPTS[2], 6)


def test_prefill_token_budget_admits_prompts_over_several_steps():
    """max_prefill_tokens 5: the 7-token prompt is admitted alone (a prompt over the budget still goes), then
    the 2-token one (the 4-token one would exceed 5), then the 4-token one; tokens unchanged."""
    hf, ours = tiny_pair("llama")
    engine = Engine(ours, max_slots=3, max_len=40, max_prefill_tokens=5)
    ids = [engine.add_request(Request(PROMPTS[i], 5)) for i in (0, 1, 2)]
    running = []
    toks: dict = {}
    while engine.has_work():
        for e in engine.step():
            toks.setdefault(e.request_id, []).append(e.token)
        running.append(engine.num_running)
    assert running[:3] == [1, 2, 3]
    for rid, i in zip(ids, (0, 1, 2)):
        assert toks[rid] == hf_greedy(hf, PROMPTS[i], 5)


def test_adapters_reach_the_model_call_only_when_named():
    _, ours = tiny_pair("llama")
    calls = []

    class Recording(type(ours)):
        def forward(self, *args, adapters=None, **kw):
            calls.append(adapters)
            return super().forward(*args, **kw)

    ours.__class__ = Recording
    engine = Engine(ours, max_slots=3, max_len=20)
    engine.run([Request(PROMPTS[1], 2), Request(PROMPTS[2], 2)])
    assert calls and all(c is None for c in calls)
    calls.clear()
    engine.run([Request(PROMPTS[1], 2, adapter="a"), Request(PROMPTS[2], 2), Request(PROMPTS[0], 2, adapter="a")])
    # prefill: one packed call per adapter; decode: one entry per row
    assert calls[0] == ["a"] and calls[1] is None and calls[2] == ["a", "a", None]
    ours.__class__ = Recording.__bases__[0]
    with pytest.raises(LLMTuneError, match="adapter"):
        Engine(ours, max_slots=1, max_len=20).run([Request(PROMPTS[1], 2, adapter="a")])


def test_bad_requests_raise_one_clear_error():
    _, ours = tiny_pair("llama")
    engine = Engine(ours, max_slots=1, max_len=10)
    for req, match in ((Request([], 2), "empty"), (Request([1] * 8, 3), "max_len 10"),
                       (Request([1], 0), "max_new_tokens"),
                       (Request([1], 2, SamplingParams(do_sample=True, temperature=0)), "temperature")):
        with pytest.raises(LLMTuneError, match=match):
            engine.add_request(req)
    assert not engine.has_work()


# --- real model ---------------------------------------------------------------------------------
@pytest.mark.real
def test_real_model_engine_greedy_equals_transformers_alone(_hf_real_model, _llmtune_real_model, hf_real_tokenizer):
    """The real model: chat prompts of different lengths, 3 slots, one joining at step 4, a group of 3 sharing a
    prefill; every row's greedy tokens equal transformers' greedy decoding of its prompt alone (a step whose
    top-two reference logits are within 1e-3 ends that row's comparison: a numerical tie may go either way)."""
    tok, hf, ours = hf_real_tokenizer, _hf_real_model, _llmtune_real_model
    questions = ["What is the capital of France?", "Name a color.",
                 "Explain in one sentence why the sky is blue, for a child of five years.", "Hi"]
    prompts = []
    for q in questions:
        r = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
        prompts.append(list(r["input_ids"]) if isinstance(r, dict) else list(r))
    n_new = 20
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        toks = out.sequences[0, len(p):].tolist()
        n = next((s for s, lg in enumerate(out.logits) if float(lg[0].topk(2).values.diff().abs()) < 1e-3),
                 len(toks))
        refs.append((toks, n))
    engine = Engine(ours, max_slots=3, max_len=200)
    schedule = {0: [(Request(prompts[0], n_new), 1), (Request(prompts[1], n_new - 8), 1)],
                2: [(Request(prompts[2], n_new), 3)], 4: [(Request(prompts[3], n_new), 1)]}
    toks, _, groups = drive(engine, schedule)
    compared = 0
    for i, group in enumerate(groups):
        ref, n = refs[i]
        for rid in group:
            m = min(n, len(toks[rid]))
            assert toks[rid][:m] == ref[:m], (questions[i], tok.decode(toks[rid]), tok.decode(ref))
            compared += m
    assert compared >= 80


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen3", True)])
def test_cpu_decode_shortcuts_bitwise_equal_the_general_path(family, tie, monkeypatch):
    """Under bf16 autocast, the CPU decode shortcuts (RoPE of q and k in one roll with tables cast once per
    forward, normed inputs cast once, a float32 slot cache written by ``index_copy_``) give the tokens and
    log-probs of the general per-layer path bitwise: rows of different lengths, a shared prefill, rows leaving."""
    from llmtune import engine as engine_mod
    from llmtune.models import transformer

    _, ours = tiny_pair(family, tie)
    out = {}
    for on in (False, True):
        monkeypatch.setattr(transformer, "DECODE_SHORTCUTS", [on])
        monkeypatch.setattr(engine_mod.SlotKVCache, "decode_shortcuts", on)
        engine = Engine(ours, max_slots=4, max_len=40)
        reqs = [Request(p, n, logprobs=True) for p, n in zip(PROMPTS[:3], (9, 5, 12))]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = engine.run(reqs, [2, 1, 1])
        out[on] = [(c.tokens, c.logprobs) for c in res]
        if on:
            assert engine.cache.layers[0][0].dtype == torch.float32
    assert out[True] == out[False]
