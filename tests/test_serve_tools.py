"""``llmtune api`` tool calling: OpenAI's ``tools``/``tool_calls``/``tool`` messages through the template's tool
format, checked with the real ``openai`` client against a scripted model (it writes a fixed tool call), and the
reply parser against the text formats LLaMA-Factory's tool_utils.py defines (written out by hand here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from reliability_helpers import CHATML  # noqa: E402
from serve_helpers import live_server  # noqa: E402

openai = pytest.importorskip("openai")

from llmtune.serve.tools import parse_tool_calls  # noqa: E402


@pytest.mark.parametrize("fmt,text,content", [
    ("default", 'Let me look.\nAction: get_color\nAction Input: {"thing": "sky"}', "Let me look."),
    ("default", 'Action: get_color\nAction Input: {"thing": "sky"}\nAction: get_time\nAction Input: {}', None),
    ("qwen", '<tool_call>\n{"name": "get_color", "arguments": {"thing": "sky"}}\n</tool_call>', None),
    ("llama3", '{"name": "get_color", "parameters": {"thing": "sky"}}', None),
    ("mistral", '[TOOL_CALLS] [{"name": "get_color", "arguments": {"thing": "sky"}}]', None),
])
def test_parse_tool_calls_reads_each_format(fmt, text, content):
    got, calls = parse_tool_calls(text, fmt)
    assert got == content
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_color"
    assert json.loads(calls[0]["function"]["arguments"]) == {"thing": "sky"}
    if fmt == "default" and content is None:
        assert [c["function"]["name"] for c in calls] == ["get_color", "get_time"]


@pytest.mark.parametrize("fmt,text", [("default", "Action: get_color\nAction Input: {not json"),
                                      ("qwen", "<tool_call>\nnope\n</tool_call>"), ("llama3", "the sky is blue"),
                                      ("default", "just words")])
def test_malformed_or_absent_calls_stay_text(fmt, text):
    assert parse_tool_calls(text, fmt) == (text, [])


WORDS = ['Action:', 'get_color', 'Action', 'Input:', '{"thing":', '"sky"}', 'blue', 'the', 'sky', 'is']


class Scripted(nn.Module):
    """A 'model' whose next token depends only on the current one (a fixed chain): after the assistant header
    it writes ``Action: get_color Action Input: {"thing": "sky"}`` then <|im_end|>."""

    def __init__(self, vocab: dict, chain: dict) -> None:
        super().__init__()
        n = len(vocab)
        self.config = type("C", (), {"num_hidden_layers": 1, "sliding_window": None})()
        self.embed = nn.Embedding(n, n)
        self.lm_head = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(n))
            self.lm_head.weight.zero_()
            for a, b in chain.items():
                self.lm_head.weight[vocab[b], vocab[a]] = 10.0

    def forward(self, input_ids, past_key_values=None, use_cache=False, **kw):
        return self.embed(input_ids), past_key_values


def _scripted_state(tmp: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmtune.chat import chat_stop_ids
    from llmtune.data.templates import get_template
    from llmtune.engine import Engine
    from llmtune.serve.app import ServerState
    from llmtune.serve.scheduler import Scheduler
    from llmtune.tokenizer import load_tokenizer

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant", "system", "observation"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<pad>",
                                                           "unk_token": "<unk>", "chat_template": CHATML}))
    tokenizer = load_tokenizer(str(tmp))
    template = get_template(None, tokenizer)
    seq = ["assistant", "Action:", "get_color", "Action", "Input:", '{"thing":', '"sky"}', "<|im_end|>"]
    chain = dict(zip(seq, seq[1:]))
    model = Scripted(vocab, chain).eval()
    engine = Engine(model, max_slots=2, max_len=256)
    state = ServerState(model_id="scripted", tokenizer=tokenizer, template=template, scheduler=Scheduler(engine),
                        chat_stop_ids=chat_stop_ids(tokenizer, template), text_stop_ids=[3], max_model_len=256)
    return state, tokenizer, template


TOOLS = [{"type": "function", "function": {"name": "get_color", "description": "the color of a thing",
                                           "parameters": {"type": "object", "properties": {"thing": {"type": "string"}},
                                                          "required": ["thing"]}}}]


def test_tool_calls_through_the_openai_client(tmp_path):
    box = {}

    def load(opts):
        box["state"], box["tok"], box["template"] = _scripted_state(tmp_path / "tok")
        return box["state"]

    with live_server(["--served_model_name", "scripted"], load=load) as (base, _):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "what is the color of sky"}]
        r = c.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, max_tokens=20, temperature=0)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        (call,) = ch.message.tool_calls
        assert call.type == "function" and call.function.name == "get_color"
        assert json.loads(call.function.arguments) == {"thing": "sky"}
        # without tools the same text is plain content
        r = c.chat.completions.create(model="scripted", messages=msgs, max_tokens=20, temperature=0)
        assert r.choices[0].message.content == 'Action: get_color Action Input: {"thing": "sky"}'
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        # the call and its result go back as the template's function and observation turns
        msgs2 = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": "blue"}]
        r2 = c.chat.completions.create(model="scripted", messages=msgs2, tools=TOOLS, max_tokens=4, temperature=0)
        expected = box["template"].encode_prompt(
            [{"role": "user", "content": "what is the color of sky"},
             {"role": "function", "content": json.dumps([{"name": "get_color", "arguments": {"thing": "sky"}}])},
             {"role": "observation", "content": "blue"}], tools=TOOLS)
        assert r2.usage.prompt_tokens == len(expected)
        # (the scripted model starts the call again; cut by max_tokens it is no call, just text)
        assert r2.choices[0].message.content == "Action: get_color Action Input:"
        assert r2.choices[0].finish_reason == "length" and not r2.choices[0].message.tool_calls
        # streamed: the call arrives as delta.tool_calls, finish_reason "tool_calls", no content
        content, deltas, finish = "", [], None
        for chunk in c.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, stream=True,
                                               max_tokens=20, temperature=0):
            for d in chunk.choices:
                content += d.delta.content or ""
                deltas += d.delta.tool_calls or []
                finish = d.finish_reason or finish
        assert content == "" and finish == "tool_calls"
        (sc,) = deltas
        assert sc.index == 0 and sc.id.startswith("call_") and sc.type == "function"
        assert sc.function.name == "get_color" and json.loads(sc.function.arguments) == {"thing": "sky"}
        # tool_choice "none": the same text streams as content
        text = "".join(d.delta.content or "" for chunk in c.chat.completions.create(
            model="scripted", messages=msgs, tools=TOOLS, tool_choice="none", stream=True, max_tokens=20,
            temperature=0) for d in chunk.choices)
        assert text == 'Action: get_color Action Input: {"thing": "sky"}'
        with pytest.raises(openai.BadRequestError):     # a tool result with no call before it
            c.chat.completions.create(model="scripted", messages=msgs + [{"role": "tool", "content": "x",
                                                                          "tool_call_id": "a"}])


class ByteTokenizer:
    """Token ids are UTF-8 bytes (a multi-byte character spans several tokens); 0 is the stop id."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text,stop", [("the sky is blue, the sea is green", ("sea",)),
                                       ("héllo wörld 🌍 and more 🌍 text", ("🌍",)),
                                       ("abcabcabd", ("abd", "zz")), ("no stop here ✓", ("xyz",)),
                                       ("stop at the very end", ("end",))])
def test_text_stream_pieces_join_to_the_text_cut_at_the_first_stop(text, stop):
    from llmtune.serve.protocol import TextStream

    ts = TextStream(ByteTokenizer(), [0], stop)
    pieces = []
    for b in text.encode("utf-8") + b"\x00":
        piece = ts.push(b)
        assert "\ufffd" not in piece
        pieces.append(piece)
        if ts.stopped:
            break
    pieces.append(ts.flush())
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    assert "".join(pieces) == text[:cut]
    assert ts.stopped


@pytest.mark.parametrize("fmt,text,content,call", [
    ("default", 'Let me look.\nAction: get_color\nAction Input: {"thing": "sky"}', "Let me look.",
     ("get_color", {"thing": "sky"})),
    ("default", "The sky is blue. Actions speak.", "The sky is blue. Actions speak.", None),
    ("default", "Action: broken", "Action: broken", None),
    ("qwen", 'ok <tool_ <tool_call>{"name": "f", "arguments": {}}</tool_call>', "ok <tool_", ("f", {})),
    ("llama3", ' {"name": "get_color", "parameters": {"thing": "sky"}}', "", ("get_color", {"thing": "sky"})),
    ("llama3", "the sky {is} blue", "the sky {is} blue", None),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]', "", ("f", {"a": 1})),
])
@pytest.mark.parametrize("size", [1, 3, 7])
def test_tool_stream_holds_back_the_call(fmt, text, content, call, size):
    from llmtune.serve.tools import ToolStream

    ts = ToolStream(fmt)
    sent = [ts.push(text[i:i + size]) for i in range(0, len(text), size)]
    rest, calls = ts.finish()
    assert "".join(sent) + rest == content
    if call is None:
        assert calls == []
    else:
        (got,) = calls
        assert (got["function"]["name"], json.loads(got["function"]["arguments"])) == call
        assert not any("{" in s and "name" in s for s in sent)     # the call itself never went out as text
