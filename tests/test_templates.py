"""Chat templates against their definitions (LLaMA-Factory's ``data/template.py`` slots, written out here as
strings) on a character-level fake tokenizer, and the model's own Jinja template against transformers."""

from __future__ import annotations

import json

import pytest

from llmtune.data.templates import TEMPLATES, get_template
from llmtune.errors import LLMTuneError
from test_data import SPECIALS, E, FakeTokenizer

S = "SYS"
CONV = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]


def text_turns(tpl, tok, messages=CONV, system=None, tools=None):
    return [(tok.decode(p), tok.decode(r)) for p, r in tpl.encode_turns(messages, system, tools)]


@pytest.fixture
def tok():
    return FakeTokenizer()


def test_required_names_exist():
    for name in ["default", "empty", "alpaca", "chatml", "llama2", "llama3", "mistral", "qwen", "qwen3", "qwen3_nothink"]:
        assert name in TEMPLATES


def test_chatml_ids(tok):
    tpl = get_template("chatml", tok)
    pairs = tpl.encode_turns(CONV, system=S)
    assert pairs[0][0] == E(f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert pairs[0][1] == E("yo<|im_end|>\n")
    assert pairs[1] == (E("<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"), E("a2<|im_end|>\n"))
    assert tpl.stop_token_ids == [SPECIALS.index("<|im_end|>"), SPECIALS.index("<|im_start|>")]
    assert tpl.encode_prompt(CONV[:1]) == E("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tpl.encode_prompt(CONV[:3]) == E("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
                                            "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n")


def test_default_alpaca_llama2_mistral_empty(tok):
    eos = "<|im_end|>"  # the fake tokenizer's eos
    assert text_turns(get_template("default", tok), tok, CONV[:2], system=S) == [
        (f"System: {S}{eos}\nHuman: hi{eos}\nAssistant:", f"yo{eos}\n")]
    alpaca_sys = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    assert text_turns(get_template("alpaca", tok), tok, CONV[:2]) == [
        (alpaca_sys + "### Instruction:\nhi\n\n### Response:\n", f"yo{eos}\n\n")]
    assert text_turns(get_template("llama2", tok), tok, system=S) == [
        (f"<s>[INST] <<SYS>>\n{S}\n<</SYS>>\n\nhi [/INST]", f"yo{eos}"), ("<s>[INST] q2 [/INST]", f"a2{eos}")]
    assert text_turns(get_template("mistral", tok), tok, CONV[:2], system=S) == [(f"<s>[INST] {S}\n\nhi[/INST]", f" yo{eos}")]
    assert text_turns(get_template("empty", tok), tok, CONV[:2]) == [("hi", "yo")]


def test_llama3(tok):
    tok = FakeTokenizer(bos="<|begin_of_text|>", eos="<|endoftext|>")
    tpl = get_template("llama3", tok)
    assert text_turns(tpl, tok, CONV[:2], system=S) == [(
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "yo<|eot_id|>")]
    assert tpl.stop_token_ids == [SPECIALS.index(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|endoftext|>")]


def test_qwen_family_and_thinking(tok):
    qsys = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert text_turns(get_template("qwen", tok), tok, CONV[:2])[0][0].startswith(f"<|im_start|>system\n{qsys}<|im_end|>\n")
    think = text_turns(get_template("qwen3", tok), tok, CONV[:2])
    assert think == [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\nyo<|im_end|>\n")]
    own = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nyo"}]
    assert text_turns(get_template("qwen3", tok), tok, own)[0][1] == "<think>\nhmm\n</think>\n\nyo<|im_end|>\n"
    assert text_turns(get_template("qwen3_nothink", tok), tok, CONV[:2])[0][1] == "yo<|im_end|>\n"


TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                         "required": ["city"]}}]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_CONV = [{"role": "user", "content": "weather?"}, {"role": "function", "content": json.dumps(CALL)},
             {"role": "observation", "content": '{"t": 20}'}, {"role": "assistant", "content": "20 C"}]


def test_tool_calls_qwen_format(tok):
    # LLaMA-Factory tool_utils QWEN_TOOL_PROMPT and QwenToolUtils.function_formatter, written out by hand.
    tool_json = json.dumps({"type": "function", "function": TOOLS[0]})
    tools_text = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + tool_json +
                  "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                  "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                  "<args-json-object>}\n</tool_call>")
    turns = text_turns(get_template("qwen", tok), tok, TOOL_CONV, system="S", tools=json.dumps(TOOLS))
    assert turns[0] == (f"<|im_start|>system\nS{tools_text}<|im_end|>\n<|im_start|>user\nweather?<|im_end|>\n"
                        "<|im_start|>assistant\n",
                        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n')
    assert turns[1] == ('<|im_start|>user\n<tool_response>\n{"t": 20}\n</tool_response><|im_end|>\n'
                        "<|im_start|>assistant\n", "20 C<|im_end|>\n")


def test_tool_calls_default_format_chatml(tok):
    # LLaMA-Factory DEFAULT_TOOL_PROMPT / DefaultToolUtils, written out by hand.
    tools_text = ("You have access to the following tools:\n> Tool Name: get_weather\nTool Description: Weather of a "
                  "city\nTool Args:\n  - city (string, required): City name\n\nUse the following format if using a "
                  "tool:\n```\nAction: tool name (one of [get_weather])\nAction Input: the input to the tool, in a "
                  "JSON format representing the kwargs (e.g. ```{\"input\": \"hello world\", \"num_beams\": 5}```)\n```\n")
    turns = text_turns(get_template("chatml", tok), tok, TOOL_CONV, tools=TOOLS)
    assert turns[0] == (f"<|im_start|>system\n{tools_text}<|im_end|>\n<|im_start|>user\nweather?<|im_end|>\n"
                        "<|im_start|>assistant\n", 'Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>\n')
    assert turns[1][0] == '<|im_start|>tool\n{"t": 20}<|im_end|>\n<|im_start|>assistant\n'


def test_overrides_and_errors(tok):
    assert text_turns(get_template("qwen", tok, default_system="X"), tok, CONV[:2])[0][0].startswith(
        "<|im_start|>system\nX<|im_end|>")
    call = text_turns(get_template("chatml", tok, tool_format="qwen"), tok, TOOL_CONV[:2])[0][1]
    assert call.startswith("<tool_call>\n")
    with pytest.raises(LLMTuneError, match="Did you mean: qwen3"):
        get_template("qwen33", tok)
    with pytest.raises(LLMTuneError, match="tool_format"):
        get_template("chatml", tok, tool_format="glm9")
    with pytest.raises(LLMTuneError, match="not a token of the tokenizer"):
        get_template("llama3", _without(FakeTokenizer(), "<|eot_id|>", "<|eom_id|>"))


def _without(tok, *tokens):
    for t in tokens:
        tok.special.pop(t)
    return tok


def test_jinja_template_spans(tok):
    tpl = get_template(None, tok)
    assert tpl.name is None
    turns = text_turns(tpl, tok)
    assert turns == [("<|im_start|>system\nDEFAULT SYS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                      "yo<|im_end|>\n"),
                     ("<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", "a2<|im_end|>\n")]
    assert text_turns(tpl, tok, CONV[:2], system="S")[0][0].startswith("<|im_start|>system\nS<|im_end|>")
    assert tpl.stop_token_ids == [SPECIALS.index("<|im_end|>")]
    full = "".join(p + r for p, r in turns)
    assert full == tok.apply_chat_template([{"role": "system", "content": "DEFAULT SYS"}] + CONV) or \
        full == tok.apply_chat_template(CONV)


def test_jinja_template_that_rewrites_history_is_refused():
    tok = FakeTokenizer(chat_template="{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(LLMTuneError, match="built-in name"):
        get_template(None, tok).encode_turns(CONV)


def test_no_chat_template_falls_back_to_empty(tok, capsys):
    tok.chat_template = None
    assert get_template(None, tok).name == "empty"
    assert "empty" in capsys.readouterr().err
