"""``llmtune api``: a live server on 127.0.0.1 driven by the real ``openai`` client (a test-only reference).

Replies are checked against independent references: ``llmtune chat``'s greedy reply (the CLI in a subprocess),
the same request sent alone, and OpenAI's documented shapes and error statuses.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from reliability_helpers import make_model_folder  # noqa: E402
from serve_helpers import live_server  # noqa: E402
from reliability_helpers import run_subprocess  # noqa: E402

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_model_folder(tmp_path_factory.mktemp("serve") / "tiny", max_positions=4096)
    with live_server(["--model_name_or_path", str(d), "--max_model_len", "4096", "--max_num_seqs", "4",
                      "--max_queue", "16", "--api_key", KEY, "--served_model_name", "tiny"]) as (base, state):
        yield base, state, d


def client(base, **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60, **kw)


def ask(c, text="hello", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)


def test_models_and_health(tiny):
    base, _, _ = tiny
    ids = [m.id for m in client(base).models.list()]
    assert ids == ["tiny"]
    h = httpx.get(base + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0


def test_greedy_chat_equals_llmtune_chat(tiny):
    base, _, d = tiny
    proc = run_subprocess(["chat", "--model_name_or_path", str(d), "--do_sample", "false", "--max_new_tokens", "12"],
                          stdin=b"what is the color of sky\n", timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    line = proc.stdout.decode().strip().splitlines()[-1]
    assert line.startswith("Assistant: ")
    expected = line[len("Assistant: "):].removesuffix(" [...]")
    r = ask(client(base), "what is the color of sky", max_tokens=12)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.object == "chat.completion" and r.model == "tiny"


def test_streaming_equals_non_streaming_and_ends_with_done(tiny):
    base, _, _ = tiny
    whole = ask(client(base), "how are you", max_tokens=10).choices[0].message.content
    pieces, finish, usage = [], None, None
    stream = ask(client(base), "how are you", max_tokens=10, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == whole and finish == "length"
    assert usage.completion_tokens == 10
    # the raw stream: server-sent events ending in [DONE]
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                            "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 3


def test_completions_n_and_stop_strings(tiny):
    base, _, _ = tiny
    c = client(base)
    alone = c.completions.create(model="tiny", prompt="the sky is", max_tokens=8, temperature=0)
    text = alone.choices[0].text
    assert alone.object == "text_completion" and alone.choices[0].finish_reason == "length" and text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="the sky is", max_tokens=8, temperature=0, stream=True))
    assert streamed == text
    many = c.completions.create(model="tiny", prompt="the sky is", max_tokens=8, temperature=0, n=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert all(ch.text == text for ch in many.choices)           # greedy: every choice is the lone reply
    assert many.usage.completion_tokens == 24
    # a stop string: the text ends just before its first occurrence, finish_reason "stop"
    words = text.split()
    stop = " " + words[2] if len(words) > 2 else words[-1]
    cut = c.completions.create(model="tiny", prompt="the sky is", max_tokens=8, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chat_cut = ask(c, "hello", max_tokens=8, stop=stop, n=2)
    full = ask(c, "hello", max_tokens=8).choices[0].message.content
    for ch in chat_cut.choices:
        assert ch.message.content == (full[:full.find(stop)] if stop in full else full)


def test_seeded_sampling_is_reproducible(tiny):
    base, _, _ = tiny
    c = client(base)
    a = ask(c, "hello", temperature=1.0, top_p=0.9, seed=7, max_tokens=8, n=2)
    b = ask(c, "hello", temperature=1.0, top_p=0.9, seed=7, max_tokens=8, n=2)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]


def test_logprobs_match_an_independent_forward(tiny):
    import torch

    base, state, d = tiny
    r = ask(client(base), "hello", max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 for e in content)
    # reference: one full forward of prompt + reply through transformers' Llama on the same folder
    transformers = pytest.importorskip("transformers")
    from llmtune.chat import encode_chat_prompt

    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), torch_dtype=torch.float32).eval()
    prompt = encode_chat_prompt(state.tokenizer, state.template, [{"role": "user", "content": "hello"}])
    reply = [state.tokenizer.convert_tokens_to_ids(e.token) for e in content]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    for i, e in enumerate(content):
        assert e.logprob == pytest.approx(lp[i, reply[i]].item(), abs=1e-4)
        top = lp[i].topk(3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    comp = client(base).completions.create(model="tiny", prompt="the sky is", max_tokens=3, temperature=0, logprobs=2)
    lps = comp.choices[0].logprobs
    assert len(lps.tokens) == 3 and len(lps.token_logprobs) == 3 and all(len(t) == 2 for t in lps.top_logprobs)


def test_disconnected_stream_frees_its_slot(tiny):
    base, state, _ = tiny
    before = state.scheduler.stats()["cancelled"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break          # leave mid-reply: closing the response closes the connection
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = state.scheduler.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["cancelled"] > before:
            break
        time.sleep(0.05)
    s = state.scheduler.stats()
    assert s["running"] == 0 and s["waiting"] == 0 and s["cancelled"] == before + 1, s
    assert s["tokens"] < 4000 * 2


def test_eight_concurrent_streams_each_get_the_whole_reply(tiny):
    base, _, _ = tiny
    prompts = ["hello", "how are you", "what is your name", "what is the color of sea", "hi", "the sun",
               "my name is tiny", "what is the color of grass"]
    alone = {p: ask(client(base), p, max_tokens=16).choices[0].message.content for p in prompts}
    results, errors = {}, []

    def one(i, p):
        try:
            text, finish = [], None
            for chunk in ask(client(base), p, max_tokens=16, stream=True):
                for ch in chunk.choices:
                    text.append(ch.delta.content or "")
                    finish = ch.finish_reason or finish
            results[i] = ("".join(text), finish)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 8
    for i, p in enumerate(prompts):
        assert results[i] == (alone[p], "length"), p


def test_queue_full_is_429(tmp_path):
    d = make_model_folder(tmp_path / "tiny", max_positions=4096)
    with live_server(["--model_name_or_path", str(d), "--max_model_len", "4096", "--max_num_seqs", "1",
                      "--max_queue", "1"]) as (base, state):
        body = {"model": str(d), "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3000,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r1:
            lines1 = r1.iter_lines()            # (kept: a dropped iterator closes the response)
            next(lines1)                        # running: holds the one slot
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r2:
                deadline = time.monotonic() + 10
                while state.scheduler.stats()["waiting"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                r3 = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
                assert r3.status_code == 429, r3.text
                assert r3.json()["error"]["type"] == "rate_limit_error"
                assert r2.status_code == 200
                assert state.scheduler.stats()["running"] == 1
        deadline = time.monotonic() + 20
        while state.scheduler.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.scheduler.stats()["running"] == 0


def _msgs(text="hello"):
    return [{"role": "user", "content": text}]


CHAT = "/v1/chat/completions"
GOOD = {"model": "tiny", "messages": _msgs(), "max_tokens": 2}
BAD_REQUESTS = [
    # (id, method, path, body or raw bytes, headers override, status, param)
    ("no key", "POST", CHAT, GOOD, {"Authorization": ""}, 401, None),
    ("wrong key", "POST", CHAT, GOOD, {"Authorization": "Bearer nope"}, 401, None),
    ("models without key", "GET", "/v1/models", None, {"Authorization": ""}, 401, None),
    ("unknown model", "POST", CHAT, dict(GOOD, model="gpt-4"), None, 404, "model"),
    ("unknown model card", "GET", "/v1/models/gpt-4", None, None, 404, "model"),
    ("unknown path", "GET", "/v1/nothing", None, None, 404, None),
    ("wrong method", "GET", CHAT, None, None, 405, None),
    ("not json", "POST", CHAT, b"{not json", None, 400, None),
    ("body not an object", "POST", CHAT, [1, 2], None, 422, None),
    ("no model", "POST", CHAT, {"messages": _msgs()}, None, 422, "model"),
    ("no messages", "POST", CHAT, {"model": "tiny"}, None, 422, "messages"),
    ("messages not a list", "POST", CHAT, dict(GOOD, messages="hi"), None, 422, "messages"),
    ("empty messages", "POST", CHAT, dict(GOOD, messages=[]), None, 400, "messages"),
    ("bad role", "POST", CHAT, dict(GOOD, messages=[{"role": "wizard", "content": "x"}]), None, 400,
     "messages[0].role"),
    ("ends with assistant", "POST", CHAT, dict(GOOD, messages=_msgs() + [{"role": "assistant", "content": "x"}]),
     None, 400, "messages"),
    ("image part", "POST", CHAT, dict(GOOD, messages=[{"role": "user", "content": [{"type": "image_url"}]}]), None,
     400, "messages[0].content"),
    ("temperature type", "POST", CHAT, dict(GOOD, temperature="hot"), None, 422, "temperature"),
    ("temperature range", "POST", CHAT, dict(GOOD, temperature=5), None, 400, "temperature"),
    ("top_p zero", "POST", CHAT, dict(GOOD, top_p=0), None, 400, "top_p"),
    ("n zero", "POST", CHAT, dict(GOOD, n=0), None, 400, "n"),
    ("n float", "POST", CHAT, dict(GOOD, n=1.5), None, 422, "n"),
    ("max_tokens zero", "POST", CHAT, dict(GOOD, max_tokens=0), None, 400, "max_tokens"),
    ("max_tokens bool", "POST", CHAT, dict(GOOD, max_tokens=True), None, 422, "max_tokens"),
    ("max_tokens too many", "POST", CHAT, dict(GOOD, max_tokens=5000), None, 400, "max_tokens"),
    ("prompt too long", "POST", CHAT, dict(GOOD, messages=_msgs("hi " * 4200)), None, 400, "messages"),
    ("stop not strings", "POST", CHAT, dict(GOOD, stop=[1]), None, 422, "stop"),
    ("five stops", "POST", CHAT, dict(GOOD, stop=list("abcde")), None, 400, "stop"),
    ("top_logprobs alone", "POST", CHAT, dict(GOOD, top_logprobs=2), None, 400, "top_logprobs"),
    ("top_logprobs range", "POST", CHAT, dict(GOOD, logprobs=True, top_logprobs=50), None, 400, "top_logprobs"),
    ("stream not bool", "POST", CHAT, dict(GOOD, stream="yes"), None, 422, "stream"),
    ("stream_options no stream", "POST", CHAT, dict(GOOD, stream_options={"include_usage": True}), None, 400,
     "stream_options"),
    ("presence penalty", "POST", CHAT, dict(GOOD, presence_penalty=1.0), None, 400, "presence_penalty"),
    ("logit_bias", "POST", CHAT, dict(GOOD, logit_bias={"1": 5}), None, 400, "logit_bias"),
    ("json mode", "POST", CHAT, dict(GOOD, response_format={"type": "json_object"}), None, 400, "response_format"),
    ("seed type", "POST", CHAT, dict(GOOD, seed="x"), None, 422, "seed"),
    ("tools not a list", "POST", CHAT, dict(GOOD, tools="f"), None, 422, "tools"),
    ("tool without name", "POST", CHAT, dict(GOOD, tools=[{"type": "function", "function": {}}]), None, 400,
     "tools[0]"),
    ("tool_choice required", "POST", CHAT, dict(GOOD, tools=[{"type": "function", "function": {"name": "f"}}],
                                                tool_choice="required"), None, 400, "tool_choice"),
    ("tool result without call", "POST", CHAT, dict(GOOD, messages=_msgs() + [{"role": "tool", "content": "x"}]),
     None, 400, "messages[1].role"),
    ("tool call arguments not JSON", "POST", CHAT, dict(GOOD, messages=_msgs() + [
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]},
        {"role": "tool", "content": "1"}]), None, 400, "messages[1].tool_calls[0]"),
    ("completion no prompt", "POST", "/v1/completions", {"model": "tiny"}, None, 422, "prompt"),
    ("completion prompt list", "POST", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, None, 400,
     "prompt"),
    ("completion empty prompt", "POST", "/v1/completions", {"model": "tiny", "prompt": ""}, None, 400, "prompt"),
    ("completion logprobs range", "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 9},
     None, 400, "logprobs"),
    ("completion echo", "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "echo": True}, None, 400,
     "echo"),
    ("body too large", "POST", CHAT, dict(GOOD, messages=_msgs("x" * (5 << 20))), None, 413, None),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_shaped_errors(tiny, case):
    base, state, _ = tiny
    _, method, path, body, headers, status, param = case
    h = {"Authorization": f"Bearer {KEY}"}
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v}
    kw = {"content": body, "headers": dict(h, **{"Content-Type": "application/json"})} if isinstance(body, bytes) \
        else {"json": body, "headers": h} if body is not None else {"headers": h}
    r = httpx.request(method, base + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    assert err["param"] == param
    assert state.scheduler.stats()["running"] == 0


def test_openai_client_raises_the_documented_errors(tiny):
    base, _, _ = tiny
    with pytest.raises(openai.NotFoundError):
        client(base).chat.completions.create(model="nope", messages=_msgs())
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as e:
        ask(client(base), max_tokens=100000)
    assert e.value.code == "context_length_exceeded"


def test_loading_answers_503_and_cli_keys(monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from llmtune.errors import LLMTuneError
    from llmtune.serve.app import create_app
    from llmtune.serve.server import split_api_args

    gate = threading.Event()

    def slow_load():
        gate.wait(10)
        raise LLMTuneError("no such model")

    with TestClient(create_app(slow_load)) as tc:
        r = tc.post(CHAT, json=GOOD)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert tc.get("/health").json()["status"] == "loading"
        gate.set()
    monkeypatch.setenv("API_PORT", "9123")
    monkeypatch.setenv("API_KEY", "k")
    opts, rest = split_api_args(["--model_name_or_path", "m", "--max_num_seqs=3", "host=::1", "--port", "77"])
    assert rest == ["--model_name_or_path", "m"]
    assert (opts["host"], opts["port"], opts["api_key"], opts["max_num_seqs"]) == ("::1", 77, "k", 3)
    monkeypatch.delenv("API_KEY")
    opts, _ = split_api_args([])
    assert (opts["host"], opts["port"], opts["api_key"]) == ("127.0.0.1", 9123, None)
    with pytest.raises(LLMTuneError, match="--max_num_seqs"):
        split_api_args(["--max_num_seqs", "0"])
    with pytest.raises(LLMTuneError, match="--port"):
        split_api_args(["--port", "eighty"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_short_requests_cancels_long_ones_and_exits_zero(tmp_path):
    import signal
    import subprocess

    from reliability_helpers import cli_env

    d = make_model_folder(tmp_path / "tiny", max_positions=4096)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmtune", "api", "--model_name_or_path", str(d), "--port",
                             str(port), "--max_model_len", "4096", "--drain_timeout", "3"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        out: dict = {}

        def stream(name, max_tokens):
            body = {"model": str(d), "messages": _msgs(), "max_tokens": max_tokens, "temperature": 0, "stream": True}
            lines = []
            try:
                with httpx.stream("POST", base + CHAT, json=body, timeout=60) as r:
                    lines = [ln for ln in r.iter_lines() if ln]
            except httpx.TransportError as e:
                lines.append(f"transport error {e!r}")
            out[name] = lines

        threads = [threading.Thread(target=stream, args=("short", 20)),
                   threading.Thread(target=stream, args=("long", 4000))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
        for t in threads:
            t.join(timeout=30)
        short = out["short"]
        assert short[-1] == "data: [DONE]" and json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
        text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in short[:-1])
        assert len(text.split()) == 20
        long = out["long"]      # cut by the shutdown: no finish, no traceback
        assert not any('"finish_reason": "length"' in ln for ln in long)
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.real
def test_real_model_greedy_chat_equals_llmtune_chat():
    from shared_inputs import real_model

    m = str(real_model())
    q = "What is the capital of France?"
    proc = run_subprocess(["chat", "--model_name_or_path", m, "--do_sample", "false", "--max_new_tokens", "24"],
                          stdin=(q + "\n").encode(), timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    expected = proc.stdout.decode().strip().splitlines()[-1][len("Assistant: "):].removesuffix(" [...]")
    assert "Paris" in expected
    with live_server(["--model_name_or_path", m, "--max_model_len", "512", "--max_num_seqs", "2"],
                     timeout=240) as (base, state):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=m, messages=_msgs(q), max_tokens=24, temperature=0)
        assert r.choices[0].message.content == expected
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=m, messages=_msgs(q), max_tokens=24, temperature=0, stream=True) if ch.choices)
        assert streamed == expected


def test_a_client_that_leaves_a_non_streaming_request_frees_its_slot(tiny):
    base, state, _ = tiny
    before = state.scheduler.stats()["cancelled"]
    body = {"model": "tiny", "messages": _msgs(), "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + CHAT, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and state.scheduler.stats()["cancelled"] == before:
        time.sleep(0.05)
    s = state.scheduler.stats()
    assert s["cancelled"] == before + 1 and s["running"] == 0, s


def test_request_timeout_is_504_and_frees_the_slot(tmp_path):
    d = make_model_folder(tmp_path / "tiny", max_positions=4096)
    with live_server(["--model_name_or_path", str(d), "--max_model_len", "4096", "--request_timeout", "1"]) \
            as (base, state):
        body = {"model": str(d), "messages": _msgs(), "max_tokens": 4000, "temperature": 0}
        t0 = time.monotonic()
        r = httpx.post(base + CHAT, json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout" and time.monotonic() - t0 < 10
        with httpx.stream("POST", base + CHAT, json=dict(body, stream=True), timeout=60) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "timeout"
        deadline = time.monotonic() + 10
        while state.scheduler.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.scheduler.stats()["running"] == 0


def test_a_port_in_use_is_one_error_line_before_loading(tmp_path, capsys):
    import socket

    from llmtune.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = main(["api", "--model_name_or_path", str(tmp_path / "absent"), "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("llmtune: error: --host 127.0.0.1 --port")
