"""``llmtune api`` under load: 32 concurrent streaming clients (bounded: 32 requests, 8 tokens each, a deadline)
each get their whole reply. The reference for each reply is the same request sent alone without streaming
(greedy, so the text must be equal), and OpenAI's stream shape (a last chunk with ``finish_reason``, a usage
chunk, ``data: [DONE]``)."""

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

httpx = pytest.importorskip("httpx")

CLIENTS = 32
MAX_TOKENS = 8
PROMPTS = ["hello", "what is the color of sky", "count to three", "tell me a story", "how are you",
           "name a fruit", "why", "good night"]


def _stream(base: str, prompt: str, out: dict, i: int) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    text, finish, usage, done, events = "", None, None, False, 0
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
            status = r.status_code
            for line in r.iter_lines():
                if not line:
                    continue
                assert line.startswith("data: "), line
                events += 1
                if line == "data: [DONE]":
                    done = True
                    continue
                assert not done, "an event after [DONE]"
                d = json.loads(line[6:])
                assert "error" not in d, d
                if d.get("usage") and not d["choices"]:
                    usage = d["usage"]
                for c in d["choices"]:
                    text += c["delta"].get("content") or ""
                    finish = c["finish_reason"] or finish
        out[i] = {"status": status, "text": text, "finish": finish, "usage": usage, "done": done, "events": events}
    except Exception as e:  # noqa: BLE001 - reported by the test
        out[i] = {"error": repr(e)}


def test_32_concurrent_streaming_clients_each_get_the_whole_reply(tmp_path):
    d = make_model_folder(tmp_path / "tiny", max_positions=512)
    with live_server(["--model_name_or_path", str(d), "--served_model_name", "tiny", "--max_model_len", "256",
                      "--max_num_seqs", "8", "--max_queue", "64"]) as (base, state):
        alone = {}
        for p in PROMPTS:            # the references: each prompt alone, not streamed
            r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
                "model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": MAX_TOKENS,
                "temperature": 0})
            assert r.status_code == 200, r.text
            alone[p] = r.json()
        out: dict = {}
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(CLIENTS)]
        threads = [threading.Thread(target=_stream, args=(base, p, out, i), daemon=True)
                   for i, p in enumerate(prompts)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, 300 - (time.monotonic() - t0)))
        assert not any(t.is_alive() for t in threads), "a client did not finish within 300 s"
        stats = httpx.get(base + "/health", timeout=30).json()
    assert len(out) == CLIENTS
    for i, p in enumerate(prompts):
        got, ref = out[i], alone[p]
        assert "error" not in got, (i, got)
        assert got["status"] == 200 and got["done"], (i, got)
        assert got["text"] == ref["choices"][0]["message"]["content"], (i, p)
        assert got["finish"] == ref["choices"][0]["finish_reason"]
        assert got["usage"] == ref["usage"]                      # same prompt and completion token counts
    assert stats["running"] == 0 and stats["waiting"] == 0       # every slot free again
