"""llmtune.generation against transformers (test-only reference): greedy and seeded sampling token by token,
logits processors on random logits, batching with left padding, eos stop and padding, chat helpers."""

from __future__ import annotations

import pytest
import torch

from llmtune.chat import chat_stop_ids, encode_chat_prompt, generate_reply, stream_reply
from llmtune.generation import generate, generate_steps
from llmtune.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, process_logits
from llmtune.models.config import ModelConfig
from llmtune.models.transformer import Transformer

transformers = pytest.importorskip("transformers")


def tiny_pair(family: str = "llama", tie: bool = False, vocab: int = 96):
    """A random tiny transformers model and our Transformer with the same weights (float32, eval)."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.15, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        hf = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        hf = transformers.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=16, **common)
        hf = transformers.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    hf.eval()
    ours = Transformer(ModelConfig.from_hf_dict(cfg.to_dict()))
    sd = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" and tie for k in missing), (missing, unexpected)
    ours.tie_weights()
    ours.eval()
    return hf, ours


def left_padded(rows: list[list[int]], pad: int = 0):
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    return ids, mask


def hf_generate(hf, ids, mask, **kw):
    kw.setdefault("pad_token_id", 0)
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    return out[:, ids.shape[1]:]


PROMPTS = [[5, 17, 33, 2, 8, 61, 40], [9, 3], [70, 71, 12, 44]]


# --- greedy vs transformers ------------------------------------------------------------------------
@pytest.mark.parametrize("family,tie", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)])
def test_greedy_matches_transformers(family, tie):
    hf, ours = tiny_pair(family, tie)
    ids, mask = left_padded(PROMPTS)
    ref = hf_generate(hf, ids, mask, max_new_tokens=20, do_sample=False)
    got = generate(ours, ids, mask, max_new_tokens=20)
    assert got.dtype == torch.long and got.shape == (3, 20)
    assert torch.equal(got, ref)


def test_greedy_repetition_penalty_matches_transformers():
    hf, ours = tiny_pair("llama")
    ids = torch.tensor([[5, 17, 33, 2, 8, 61, 40], [1, 9, 3, 3, 3, 50, 22]])
    ref = hf_generate(hf, ids, torch.ones_like(ids), max_new_tokens=24, do_sample=False, repetition_penalty=1.7)
    got = generate(ours, ids, max_new_tokens=24, repetition_penalty=1.7)
    assert torch.equal(got, ref)
    # the penalty changes the output (otherwise this test would check nothing)
    assert not torch.equal(generate(ours, ids, max_new_tokens=24), got)


def test_seeded_sampling_matches_transformers():
    """Same global RNG stream, same processed distribution -> the same sampled tokens as transformers."""
    hf, ours = tiny_pair("qwen2")
    ids = torch.tensor([[5, 17, 33, 2, 8]])
    kw = dict(max_new_tokens=30, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(123)
    ref = hf_generate(hf, ids, torch.ones_like(ids), **kw)
    torch.manual_seed(123)
    got = generate(ours, ids, **kw)
    assert torch.equal(got, ref)


def test_sampling_with_generator_is_reproducible_and_top_k_one_is_greedy():
    _, ours = tiny_pair("llama")
    ids, mask = left_padded(PROMPTS)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = generate(ours, ids, mask, max_new_tokens=12, do_sample=True, temperature=1.5, generator=g1)
    b = generate(ours, ids, mask, max_new_tokens=12, do_sample=True, temperature=1.5, generator=g2)
    assert torch.equal(a, b)
    k1 = generate(ours, ids, mask, max_new_tokens=12, do_sample=True, top_k=1, temperature=3.0)
    assert torch.equal(k1, generate(ours, ids, mask, max_new_tokens=12))


# --- logits processors vs transformers' classes ---------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 1.0, 1.3), (0.7, 0, 1.0, 1.0), (1.0, 10, 1.0, 1.0), (1.0, 0, 0.8, 1.0),
    (0.6, 25, 0.9, 1.15), (1.3, 5, 0.5, 0.8), (1.0, 0, 0.05, 1.0)])
def test_processed_distribution_matches_transformers(temperature, top_k, top_p, penalty):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    b, v = 4, 300
    logits = torch.randn(b, v, generator=g) * 3
    prev = torch.randint(0, v, (b, 40), generator=g)
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    ref = procs(prev, logits.clone())
    seen = torch.zeros(b, v, dtype=torch.bool).scatter_(1, prev, True)
    got = process_logits(logits, seen, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=penalty)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got.softmax(-1), ref.softmax(-1), rtol=0, atol=1e-7)


def test_processors_hand_computed():
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False, False]])
    assert torch.equal(apply_repetition_penalty(x, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0, -4.0]]))
    ninf = float("-inf")
    assert torch.equal(apply_top_k(x, 2), torch.tensor([[2.0, ninf, ninf, 3.0, ninf]]))
    # probabilities sorted: 3.0 -> 0.6439, 2.0 -> 0.2369, 0.5 -> 0.0529, ...; top_p 0.85 keeps {3.0, 2.0}
    p = x.softmax(-1)
    assert p[0, 3] < 0.85 < p[0, 3] + p[0, 0]
    assert torch.equal(torch.isinf(apply_top_p(x, 0.85)), torch.tensor([[False, True, True, False, True]]))
    # greedy ignores temperature/top-k/top-p, applies the penalty
    assert torch.equal(process_logits(x, seen, temperature=0.1, top_k=1, repetition_penalty=2.0),
                       apply_repetition_penalty(x, seen, 2.0))


# --- batching, padding, stopping ----------------------------------------------------------------
def test_batched_left_padded_equals_each_row_alone():
    _, ours = tiny_pair("qwen2")
    ids, mask = left_padded(PROMPTS, pad=7)
    batched = generate(ours, ids, mask, max_new_tokens=16)
    for i, row in enumerate(PROMPTS):
        alone = generate(ours, torch.tensor([row]), max_new_tokens=16)
        assert torch.equal(batched[i:i + 1], alone), i


def test_right_padding_is_moved_left():
    _, ours = tiny_pair("llama")
    ids, mask = left_padded(PROMPTS)
    t = ids.shape[1]
    r_ids = torch.zeros_like(ids)
    r_mask = torch.zeros_like(mask)
    for i, row in enumerate(PROMPTS):
        r_ids[i, :len(row)] = torch.tensor(row)
        r_mask[i, :len(row)] = 1
    assert t == len(PROMPTS[0])
    assert torch.equal(generate(ours, r_ids, r_mask, max_new_tokens=10), generate(ours, ids, mask, max_new_tokens=10))


def test_eos_stops_rows_and_pads_like_transformers():
    hf, ours = tiny_pair("llama")
    ids, mask = left_padded(PROMPTS)
    free = generate(ours, ids, mask, max_new_tokens=20)
    eos_row1 = int(free[1, 3])  # a token row 1 produces at step 3
    first = [int((free[i] == eos_row1).nonzero()[0]) if (free[i] == eos_row1).any() else None for i in range(3)]
    pad = 95
    got, lengths = generate(ours, ids, mask, max_new_tokens=20, eos_token_ids=[eos_row1], pad_token_id=pad,
                            return_lengths=True)
    ref = hf_generate(hf, ids, mask, max_new_tokens=20, eos_token_id=eos_row1, pad_token_id=pad)
    assert torch.equal(got, ref)
    for i in range(3):
        n = 20 if first[i] is None else first[i] + 1
        assert int(lengths[i]) == n
        assert torch.equal(got[i, :n], free[i, :n])
        assert bool((got[i, n:] == pad).all())
    assert first[1] is not None and first[1] <= 3


def test_all_rows_stopped_ends_early_and_streamer_sees_row0():
    _, ours = tiny_pair("llama")
    ids = torch.tensor([[5, 17, 33]])
    free = generate(ours, ids, max_new_tokens=10)
    stop = int(free[0, 4])
    n = int((free[0] == stop).nonzero()[0]) + 1
    seen: list[int] = []
    got = generate(ours, ids, max_new_tokens=10, eos_token_ids=stop, streamer=seen.extend)
    assert got.shape == (1, n)
    assert seen == free[0, :n].tolist()
    assert generate(ours, ids, max_new_tokens=0).shape == (1, 0)


def test_generate_restores_training_mode_and_returns_normal_tensors():
    _, ours = tiny_pair("llama")
    ours.train()
    out = generate(ours, torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert ours.training
    assert not out.is_inference()
    steps = list(generate_steps(ours, torch.tensor([[1, 2, 3]]), max_new_tokens=2))
    assert len(steps) == 2 and not torch.is_inference_mode_enabled()


def test_bad_sampling_settings_raise_llmtune_error():
    from llmtune.errors import LLMTuneError
    _, ours = tiny_pair("llama")
    ids = torch.tensor([[1, 2]])
    for kw in (dict(do_sample=True, temperature=0.0), dict(top_p=0.0), dict(top_k=-1),
               dict(repetition_penalty=0.0), dict(max_new_tokens=-1)):
        with pytest.raises(LLMTuneError):
            generate(ours, ids, **{"max_new_tokens": 2, **kw})


# --- chat helpers -------------------------------------------------------------------------------
class FakeTemplate:
    """A minimal template: '<u>' text '<a>' framing, end-of-turn id 90."""

    name = "fake"
    stop_token_ids = [90]

    def encode_prompt(self, messages, system=None, tools=None):
        out = [] if system is None else [80, len(system)]
        for m in messages:
            out += [81 if m["role"] == "user" else 82] + [ord(c) % 60 + 10 for c in m["content"]]
        return out + [82]


class FakeTokenizer:
    """Decodes id i as chr(ord('a') + i % 26); id 90 is special (end of turn), 91 is eos."""

    eos_token_ids = [91]
    eos_token_id = 91
    chat_template = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if (skip_special_tokens and i in (90, 91)) else chr(ord("a") + i % 26) for i in ids)


def test_generate_reply_stops_on_template_end_of_turn():
    _, ours = tiny_pair("llama")
    tok, tpl = FakeTokenizer(), FakeTemplate()
    msgs = [{"role": "user", "content": "hello there"}]
    prompt = tpl.encode_prompt(msgs, system="sys")
    assert encode_chat_prompt(tok, tpl, msgs, system="sys") == prompt
    assert chat_stop_ids(tok, tpl) == [90, 91]
    free = generate(ours, torch.tensor([prompt]), max_new_tokens=12)[0].tolist()
    stop = free[5]
    n = free.index(stop)
    tpl.stop_token_ids = [stop]
    reply = generate_reply(ours, tok, tpl, msgs, system="sys", max_new_tokens=12)
    assert reply == tok.decode(free[:n])
    assert "".join(stream_reply(ours, tok, tpl, msgs, system="sys", max_new_tokens=12)) == reply


def test_chat_prompt_from_tokenizer_chat_template_and_stop_ids():
    """Without an llmtune template: the tokenizer's own chat_template (rendered by transformers here)."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    msgs = [{"role": "user", "content": "hi"}]
    ids = encode_chat_prompt(tok, None, msgs, system="be nice")
    text = "<|im_start|>system be nice<|im_end|><|im_start|>user hi<|im_end|><|im_start|>assistant "
    assert ids == tok.encode(text, add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat_stop_ids(tok, None) == sorted({tok.eos_token_id, im_end})


# --- real model ---------------------------------------------------------------------------------
REAL_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "Give me three tips for learning to cook."]


@pytest.mark.real
def test_real_model_greedy_matches_transformers(real_model_path):
    """32 greedy tokens for three chat prompts (our batch, left-padded) equal transformers' greedy output
    (each prompt alone, GGUF loaded by transformers in float32); a step whose top-two reference logits are
    within 1e-3 ends the comparison of that row (a numerical tie may go either way)."""
    from llmtune.models.loader import load_model

    d, f = str(real_model_path.parent), real_model_path.name
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    stop = [hf_tok.convert_tokens_to_ids("<|im_end|>"), hf_tok.eos_token_id]
    rows = [hf_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in REAL_PROMPTS]
    rows = [list(r["input_ids"]) if isinstance(r, dict) else list(r) for r in rows]
    refs = []
    for r in rows:
        with torch.no_grad():
            out = hf.generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=stop, pad_token_id=stop[0],
                              output_logits=True, return_dict_in_generate=True)
        toks = out.sequences[0, len(r):].tolist()
        n = len(toks)
        for s, lg in enumerate(out.logits):
            top2 = lg[0].float().topk(2).values
            if float(top2[0] - top2[1]) < 1e-3:
                n = s
                break
        refs.append((toks, n))
    del hf
    ours = load_model(str(real_model_path), dtype="float32")
    ids, mask = left_padded(rows, pad=stop[0])
    got, lengths = generate(ours, ids, mask, max_new_tokens=32, eos_token_ids=stop, pad_token_id=stop[0],
                            return_lengths=True)
    compared = 0
    for i, (toks, n) in enumerate(refs):
        assert got[i, :n].tolist() == toks[:n], (REAL_PROMPTS[i], hf_tok.decode(got[i]), hf_tok.decode(toks))
        if n == len(toks):
            assert int(lengths[i]) == len(toks)
        compared += n
    assert compared >= 48
    assert "Paris" in hf_tok.decode(got[0])
