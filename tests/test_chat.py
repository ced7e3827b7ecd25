"""llmtune chat: device fallback, recorded template, the piped/interactive loop, and the real command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtune.chat import ChatSession, main, recorded_template, resolve_device, run_chat
from llmtune.errors import LLMTuneError
from llmtune.generation import generate

from test_generation import FakeTemplate, FakeTokenizer, tiny_pair

REPO = Path(__file__).resolve().parents[1]


# --- setup helpers ------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_missing_device_falls_back_to_cpu_with_one_notice(capsys):
    assert resolve_device("cuda:0") == torch.device("cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmtune: notice:") and "cuda:0" in err[0] and "CPU" in err[0]
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_bad_device_name_is_a_user_error():
    with pytest.raises(LLMTuneError, match="--device"):
        resolve_device("gpu-please")


def test_recorded_template_prefers_last_adapter(tmp_path):
    base, a1, a2 = tmp_path / "base", tmp_path / "sft", tmp_path / "dpo"
    for d in (base, a1, a2):
        d.mkdir()
    (base / "training_args.yaml").write_text("stage: pt\ntemplate: llama3\n")
    (a1 / "training_args.yaml").write_text("stage: sft\ntemplate: qwen\n")
    assert recorded_template(str(a2), str(a1), str(base)) == "qwen"
    assert recorded_template(str(a2), str(base)) == "llama3"
    assert recorded_template(str(a2), "HuggingFaceTB/SmolLM2-135M", None) is None
    (a2 / "training_args.yaml").write_text("template: [unclosed\n")
    with pytest.raises(LLMTuneError, match="training_args.yaml"):
        recorded_template(str(a2))


def test_bad_generation_flag_fails_before_loading():
    with pytest.raises(LLMTuneError, match="temperature"):
        main(["--model_name_or_path", "/nonexistent/model", "--temperature", "0"])
    with pytest.raises(LLMTuneError, match="top_p"):
        main(["--model_name_or_path", "/nonexistent/model", "--do_sample", "False", "--top_p", "1.5"])


# --- the loop -----------------------------------------------------------------------------------
def _session(**gen):
    _, model = tiny_pair("llama")
    tpl = FakeTemplate()
    gen.setdefault("max_new_tokens", 6)
    gen.setdefault("do_sample", False)
    return ChatSession(model, FakeTokenizer(), tpl, **gen), model, tpl


def _expected_reply(model, tok, tpl, messages, n, marked=False):
    """The greedy reply from generate() itself; ``marked``: with " [...]" when no stop id came in n tokens."""
    stops = tpl.stop_token_ids + tok.eos_token_ids
    raw = generate(model, torch.tensor([tpl.encode_prompt(messages)]), max_new_tokens=n, eos_token_ids=stops)[0]
    ids = [i for i in raw.tolist() if i not in stops]
    text = tok.decode(ids, skip_special_tokens=True)
    cut = not any(i in stops for i in raw.tolist())
    return text + (" [...]" if marked and cut else "")


def test_piped_lines_are_independent_questions(capsys):
    session, model, tpl = _session()
    tok = session.tokenizer
    out = io.StringIO()
    stdin = io.StringIO("hello\n\nhow are you\nclear\n/clear\nagain\n/exit\nnever answered\n")
    assert run_chat(session, stdin, out, interactive=False) == 0
    lines = out.getvalue().splitlines()
    expected = [_expected_reply(model, tok, tpl, [{"role": "user", "content": q}], 6, marked=True)
                for q in ("hello", "how are you", "again")]
    assert lines == [f"Assistant: {r}" for r in expected]
    plain = _expected_reply(model, tok, tpl, [{"role": "user", "content": "again"}], 6)
    assert session.history == [{"role": "user", "content": "again"}, {"role": "assistant", "content": plain}]
    # random tiny model: its replies run to max_new_tokens, so each is marked and one notice is given
    n_cut = sum(r.endswith(" [...]") for r in expected)
    err = capsys.readouterr().err
    assert err.count("llmtune: notice: a reply reached") == (1 if n_cut else 0) and n_cut


def test_piped_lines_with_history_are_one_conversation():
    session, model, tpl = _session()
    tok = session.tokenizer
    out = io.StringIO()
    stdin = io.StringIO("hello\nhow are you\nclear\nagain\nexit\nnever answered\n")
    assert run_chat(session, stdin, out, interactive=False, history=True) == 0
    r1 = _expected_reply(model, tok, tpl, [{"role": "user", "content": "hello"}], 6)
    hist = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
            {"role": "user", "content": "how are you"}]
    r2 = _expected_reply(model, tok, tpl, hist, 6, marked=True)
    r3 = _expected_reply(model, tok, tpl, [{"role": "user", "content": "again"}], 6, marked=True)
    r1m = _expected_reply(model, tok, tpl, [{"role": "user", "content": "hello"}], 6, marked=True)
    assert out.getvalue().splitlines() == [f"Assistant: {r1m}", f"Assistant: {r2}", f"Assistant: {r3}"]


def test_a_reply_that_ends_at_a_stop_token_is_not_marked():
    session, model, tpl = _session(max_new_tokens=40)
    session.stop_ids = list(range(model.config.vocab_size))
    out = io.StringIO()
    # every token is a stop id: the reply is empty and was ended by the model, not by max_new_tokens
    assert run_chat(session, io.StringIO("hello\n"), out, interactive=False) == 0
    assert out.getvalue() == "Assistant: \n" and session.truncated is False


def test_interactive_keeps_history_until_clear_and_exits():
    session, model, tpl = _session()
    tok = session.tokenizer
    out = io.StringIO()
    assert run_chat(session, io.StringIO("hi\nmore\n/clear\nagain\n/exit\nnot read\n"), out,
                    interactive=True) == 0
    text = out.getvalue()
    assert text.startswith("Welcome") and "/clear" in text.splitlines()[0]
    assert text.count("User: ") == 5 and text.count("Assistant: ") == 3
    assert "History has been removed." in text
    r1 = _expected_reply(model, tok, tpl, [{"role": "user", "content": "hi"}], 6)
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": r1},
            {"role": "user", "content": "more"}]
    assert f"Assistant: {_expected_reply(model, tok, tpl, hist, 6, marked=True)}\n" in text
    r3 = _expected_reply(model, tok, tpl, [{"role": "user", "content": "again"}], 6)
    assert session.history == [{"role": "user", "content": "again"}, {"role": "assistant", "content": r3}]


def test_interactive_prompts_and_end_of_input():
    session, _, _ = _session()
    out = io.StringIO()
    assert run_chat(session, io.StringIO("hi\nclear\n"), out, interactive=True) == 0
    text = out.getvalue()
    assert text.startswith("Welcome") and text.count("User: ") == 3 and text.count("Assistant: ") == 1
    assert "History has been removed." in text and session.history == []


def test_non_utf8_stdin_is_one_clear_error():
    session, _, _ = _session()
    stdin = io.TextIOWrapper(io.BytesIO("caf\u00e9?\n".encode("latin-1")), encoding="utf-8", errors="strict")
    with pytest.raises(LLMTuneError, match="stdin is not UTF-8"):
        run_chat(session, stdin, io.StringIO(), interactive=False)


def test_long_history_is_trimmed_to_max_context(capsys):
    session, _, tpl = _session()
    session.max_context = 30
    for q in ("first question here", "second question here", "third question"):
        session.reply(q)
    assert "oldest turns were dropped" in capsys.readouterr().err
    assert len(tpl.encode_prompt(session.history[:-1])) <= 30
    assert session.history[-2] == {"role": "user", "content": "third question"}


# --- the real command ---------------------------------------------------------------------------
def _run_cli(args, stdin_text, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "llmtune", "chat", *args], input=stdin_text, text=True,
                          capture_output=True, timeout=timeout, cwd=str(REPO), env=env)


@pytest.mark.real
def test_real_chat_answers_paris_and_exits_zero(real_model_path):
    """The plain command with LLaMA-Factory's default (seeded) sampling; a short reply to keep it fast."""
    proc = _run_cli(["--model_name_or_path", str(real_model_path), "--max_new_tokens", "48"],
                    "What is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Assistant: ") and "Paris" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.real
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_real_chat_seed_flags_cuda_device_notice_greedy_stops(real_model_path):
    """The seed's chat command shape (--finetuning_type lora --device cuda:0, no GPU here), greedy: one
    notice, and the reply ends at <|im_end|> (greedy answer of this model: 'The capital of France is Paris.')."""
    proc = _run_cli(["--model_name_or_path", str(real_model_path), "--finetuning_type", "lora",
                     "--device", "cuda:0", "--do_sample", "False", "--max_new_tokens", "64"],
                    "What is the capital of France?\nexit\n")
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if "cuda:0" in line]
    assert len(notices) == 1 and notices[0].startswith("llmtune: notice:")
    assert proc.stdout == "Assistant: The capital of France is Paris.\n"


@pytest.mark.real
def test_real_chat_bad_model_path_is_one_line_error(tmp_path):
    proc = _run_cli(["--model_name_or_path", str(tmp_path / "missing")], "hi\n", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("llmtune: error:") and "Traceback" not in proc.stderr


# --- end to end on a tiny saved model with a PEFT adapter -----------------------------------------
def _tiny_chatml_folder(root: Path):
    """A tiny Llama folder (transformers' save_pretrained) with a char-level tokenizer knowing ChatML tokens."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers

    chars = list("abcdefghijklmnopqrstuvwxyz ?\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(chars + specials)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                               additional_special_tokens=specials[1:])
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=112,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   initializer_range=0.15, eos_token_id=vocab["<|endoftext|>"])
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(root, safe_serialization=True)
    tok.save_pretrained(root)
    return hf, tok


def test_chat_main_with_adapter_and_recorded_template_matches_peft(tmp_path, monkeypatch, capsys):
    """`llmtune chat --model_name_or_path base --adapter_name_or_path lora` (template recorded in the adapter's
    training_args.yaml) answers like transformers' greedy generate on the peft-merged model with a hand-written
    ChatML prompt."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)  # a model whose reply ends with a stop token after 10 tokens
    base, adapter = tmp_path / "base", tmp_path / "lora"
    hf, tok = _tiny_chatml_folder(base)
    hf.name_or_path = str(base)  # as after from_pretrained(base); peft records it as the adapter's base
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(hf, lcfg)
    pm.save_pretrained(adapter)
    (adapter / "training_args.yaml").write_text("stage: sft\nfinetuning_type: lora\ntemplate: chatml\n")
    merged = pm.merge_and_unload().eval()

    prompt = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id]
    with torch.no_grad():
        ref = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=stop, pad_token_id=stop[0])[0, ids.shape[1]:].tolist()
    ref = [t for t in ref if t not in stop]
    expected = tok.decode(ref, skip_special_tokens=True)
    assert 3 <= len(ref) < 12  # a reply long enough to compare, ended by a stop token

    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n"))
    rc = main(["--model_name_or_path", str(base), "--adapter_name_or_path", str(adapter),
               "--do_sample", "False", "--max_new_tokens", "12"])
    assert rc == 0
    assert capsys.readouterr().out == f"Assistant: {expected}\n"


def test_adapter_with_full_finetuning_type_is_an_error(tmp_path):
    with pytest.raises(LLMTuneError, match="finetuning_type"):
        main(["--model_name_or_path", str(tmp_path), "--adapter_name_or_path", str(tmp_path),
              "--finetuning_type", "full"])


@pytest.mark.real
def test_real_chat_non_utf8_stdin_is_one_error_line(real_model_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", LC_ALL="C")
    proc = subprocess.run([sys.executable, "-m", "llmtune", "chat", "--model_name_or_path", str(real_model_path),
                           "--do_sample", "False", "--max_new_tokens", "4"], input="caf\u00e9?\n".encode("latin-1"),
                          capture_output=True, timeout=300, cwd=str(REPO), env=env)
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    assert proc.returncode == 2 and err[-1].startswith("llmtune: error: stdin is not UTF-8")
    assert "Traceback" not in proc.stderr.decode("utf-8", "replace")


class _CharTokenizer:
    """One token per character (id = code point), so a cut is counted exactly."""

    eos_token_ids = [91]
    eos_token_id = 91
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (90, 91)))


def test_one_message_longer_than_max_context_keeps_its_end(capsys):
    """The breaker's `print('word ' * 200000) | llmtune chat` hang: one message is never dropped whole, so it
    is cut to its last tokens (the template here spends 1 token per message and 1 for the reply header)."""
    _, model = tiny_pair("llama")
    session = ChatSession(model, _CharTokenizer(), FakeTemplate(), max_new_tokens=2, do_sample=False,
                          max_context=30)
    query = "a" * 5000 + "THE END"
    session.reply(query)
    assert "only its last part is answered" in capsys.readouterr().err
    kept = session.history[-2]["content"]
    assert query.endswith(kept) and kept.endswith("THE END")
    assert len(FakeTemplate().encode_prompt(session.history[:-1])) <= 30


def test_max_context_below_the_template_tokens_is_one_error():
    _, model = tiny_pair("llama")
    session = ChatSession(model, _CharTokenizer(), FakeTemplate(), max_new_tokens=2, max_context=1)
    with pytest.raises(LLMTuneError, match="smaller than the chat template's own tokens"):
        session.reply("hello")


def test_ctrl_c_during_a_reply_stops_that_reply_only():
    session, _, _ = _session()
    calls = []

    def stream(query):
        calls.append(query)
        yield "par"
        if len(calls) == 1:
            raise KeyboardInterrupt
        yield "tial"

    session.stream = stream
    out = io.StringIO()
    assert run_chat(session, io.StringIO("first\nsecond\n/exit\n"), out, interactive=True) == 0
    text = out.getvalue()
    assert "Assistant: par [stopped]\n" in text and "Assistant: partial\n" in text and calls == ["first", "second"]
    calls.clear()
    with pytest.raises(KeyboardInterrupt):   # piped input: Ctrl-C still ends the command
        run_chat(session, io.StringIO("third\n"), io.StringIO(), interactive=False)
