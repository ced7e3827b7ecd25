"""Tokenizer: ids, decoding, special tokens and chat templates against transformers' tokenizers."""

from __future__ import annotations

import json

import pytest

from llmtune.errors import LLMTuneError
from llmtune.tokenizer import load_tokenizer

STRINGS = [
    "Hello world", "hello world", "HELLO WORLD", " Hello", "  two leading spaces", "trailing space ",
    "multiple    inner     spaces", "\tTabbed\tline", "line1\nline2", "\n\nleading newlines", "ends with\n\n\n",
    "\r\nwindows\r\nline endings", "   \n   \n", " ", "", "a", "I'm sure it's they're we've you'll I'd",
    "DON'T SHOUT", "1234567890", "3.14159 2.71828", "1,000,000 and 10e-5", "$100.00 & 50% off!",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nprint(np.arange(10).reshape(2, 5))", "<div class=\"x\">&nbsp;</div>",
    "SELECT * FROM users WHERE id = 42;", "{\"key\": [1, 2, {\"nested\": null}]}", "https://huggingface.co/HuggingFaceTB",
    "email@example.com", "你好，世界！", "日本語のテキストです。", "한국어 문장", "Привет, мир!", "Γειά σου Κόσμε",
    "مرحبا بالعالم", "नमस्ते दुनिया", "Ünïcödé àccénts ñ ç ß", "😀😃😄 emoji 🎉🚀", "👨‍👩‍👧‍👦 family ZWJ",
    "🇫🇷 flags 🇯🇵", "mixed 中文 and English 123", "<|im_start|>user\nHi there<|im_end|>\n",
    "<|im_start|>assistant\n", "text<|endoftext|>more text", "<|im_end|><|im_end|>",
    "not special <|im_start without close", "<repo_name>llmtune<file_sep>main.py", "<reponame>x", "~!@#$%^&*()_+-=",
    "....... ------- =======", "a" * 100, "the the the the the", "CamelCaseIdentifierName", "snake_case_name_here",
    "zero\u200bwidth", "non\u00a0breaking space", "tab\tand  space \t mix",
]


def test_enough_strings():
    assert len(STRINGS) >= 50


# -- the real model's GGUF tokenizer vs transformers' GGUF tokenizer -----------------------------------

@pytest.fixture(scope="module")
def real_pair(real_model_path, hf_real_tokenizer):
    ours = load_tokenizer(real_model_path)
    theirs = hf_real_tokenizer
    return ours, theirs


@pytest.mark.real
def test_real_ids_match_transformers(real_pair):
    ours, theirs = real_pair
    for s in STRINGS:
        ids = ours.encode(s)
        assert ids == theirs.encode(s, add_special_tokens=False), s
        assert ours.encode(s, add_special_tokens=True) == theirs.encode(s, add_special_tokens=True), s
        assert ours.decode(ids) == theirs.decode(ids), s
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), s


@pytest.mark.real
def test_real_special_tokens(real_pair):
    ours, theirs = real_pair
    # transformers reads tokenizer.ggml.bos/eos/padding_token_id: <|im_start|> (1), <|im_end|> (2), <|im_end|> (2)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)
    assert ours.eos_token_ids == [2]
    assert ours.convert_tokens_to_ids("<|im_end|>") == theirs.convert_tokens_to_ids("<|im_end|>") == 2
    assert ours.convert_tokens_to_ids("no-such-token-xyz") is None
    assert len(ours) == len(theirs) and ours.vocab_size == theirs.vocab_size
    assert set(theirs.all_special_ids) <= set(ours.added_special_ids)
    specials = [i for i, t in theirs.added_tokens_decoder.items() if t.special]
    assert ours.added_special_ids == sorted(specials)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a joke\nplease"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！😀"}],
]


@pytest.mark.real
@pytest.mark.parametrize("gen", [False, True])
def test_real_chat_template_matches_transformers(real_pair, gen):
    ours, theirs = real_pair
    for messages in CONVERSATIONS:
        text = ours.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        ids = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        assert ids == theirs.encode(text, add_special_tokens=False)


@pytest.mark.real
def test_real_save_pretrained_round_trip(real_pair, tmp_path):
    from transformers import AutoTokenizer

    ours, theirs = real_pair
    ours.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for s in STRINGS[:30] + STRINGS[40:48]:
        expect = theirs.encode(s, add_special_tokens=False)
        assert again.encode(s) == expect and hf.encode(s, add_special_tokens=False) == expect, s
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)
    m = CONVERSATIONS[1]
    ref = theirs.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
    assert hf.apply_chat_template(m, add_generation_prompt=True, tokenize=False) == ref
    assert again.apply_chat_template(m, add_generation_prompt=True) == ref


# -- a tiny tokenizer folder (no real model needed) ----------------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "[{{ m['role'] }}]{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}\n{% endfor %}"
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}{% if date %}{{ strftime_now('%Y') | length }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(STRINGS * 3, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(str(folder))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    return folder


def test_folder_tokenizer(tiny_folder):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tiny_folder)
    theirs = AutoTokenizer.from_pretrained(str(tiny_folder))
    for s in STRINGS:
        assert ours.encode(s) == theirs.encode(s, add_special_tokens=False), s
    assert ours.encode("Hello", add_special_tokens=True)[0] == 1  # add_bos_token
    assert ours.encode("Hello", add_special_tokens=True)[1:] == ours.encode("Hello")
    assert ours.eos_token_id == 2 and ours.eos_token_ids == [2, 1]  # tokenizer eos + generation_config eos
    assert (ours.bos_token_id, ours.pad_token_id) == (1, 0)


def test_folder_chat_template_matches_transformers(tiny_folder):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tiny_folder)
    theirs = AutoTokenizer.from_pretrained(str(tiny_folder))
    tools = [{"type": "function", "function": {"name": "f", "description": "é <b>", "parameters": {}}}]
    for kw in ({}, {"add_generation_prompt": True}, {"tools": tools}, {"date": True}):
        assert ours.apply_chat_template(CONVERSATIONS[1], **kw) == theirs.apply_chat_template(
            CONVERSATIONS[1], tokenize=False, **kw)
    with pytest.raises(LLMTuneError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_adapter_folder_uses_its_base_tokenizer(tiny_folder, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_folder)}))
    tok = load_tokenizer(tmp_path)
    assert tok.name_or_path == str(tiny_folder.resolve())
    assert tok.encode("Hello world") == load_tokenizer(tiny_folder).encode("Hello world")


def test_errors(tmp_path):
    with pytest.raises(LLMTuneError, match="no such file or folder"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(LLMTuneError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    from tokenizers import Tokenizer, models

    from llmtune.tokenizer import Tokenizer as Tok

    with pytest.raises(LLMTuneError, match="has no chat_template"):
        Tok(Tokenizer(models.BPE())).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_that_pads_to_gigabytes_is_refused_before_allocating():
    """The breaker's `{{ 'x'.ljust(4000000000) }}` reached 4.4 GB within the time limit: refused up front."""
    import time

    from llmtune.tokenizer import _compile_template, render_bounded

    for src in ("{{ 'x'.ljust(4000000000) }}", "{{ 'x'.zfill(100000000) }}",
                "{{ ('ab' * 1000).replace('a', 'y' * 100000) }}"):
        start = time.monotonic()
        with pytest.raises(LLMTuneError, match="would build a text over"):
            render_bounded(_compile_template(src), src, messages=[])
        assert time.monotonic() - start < 1.0
    assert render_bounded(_compile_template("{{ 'ok'.ljust(4) }}|"), "x", messages=[]) == "ok  |"
