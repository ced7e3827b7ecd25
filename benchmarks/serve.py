"""Benchmark: ``llmtune api`` on the real model: generated tokens/s and time to first token at 1, 8 (...) clients.

The server runs in this process (uvicorn in a thread, 127.0.0.1, a free port); each client is a thread that
sends streaming chat requests (greedy, ``--max_tokens``, ``stream_options.include_usage``) one after another
until ``--requests`` per level are done. ``tok_s``: completion tokens (the servers' usage counts) over the
level's wall time; ``ttft_p50/p95``: seconds from sending a request to its first content chunk. The load
average is recorded: on the shared 2-core machine the numbers are noisy. The comparison with LLaMA-Factory's
``llamafactory-cli api`` (issue 26) is not done yet.

Usage::

    python benchmarks/serve.py [--model PATH] [--clients 1,8] [--requests 8] [--max_tokens 32]
                               [--max_num_seqs 8] [--out benchmarks/results/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "Give me three tips for sleeping well.", "What is 12 times 7?", "Name a famous painter.",
           "Describe a cat in one sentence.", "Why is the sky blue?"]


def default_model() -> Path:
    shared = Path(os.environ.get("LLMTUNE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    return shared / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def start(model: str, max_num_seqs: int, max_len: int):
    from llmtune.config import parse_config
    from llmtune.serve.app import create_app
    from llmtune.serve.server import build_state, make_server, split_api_args

    opts, rest = split_api_args(["--model_name_or_path", model, "--max_num_seqs", str(max_num_seqs),
                                 "--max_model_len", str(max_len), "--port", "0", "--served_model_name", "m"])
    cfg = parse_config(rest, command="chat")
    server = make_server(create_app(lambda: build_state(cfg, opts)), "127.0.0.1", 0, 5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not (server.started and server.servers):
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    import httpx

    while httpx.get(base + "/health").status_code != 200:
        time.sleep(0.2)
    return server, thread, base


def one(base: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            d = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in d["choices"]):
                ttft = time.perf_counter() - t0
            if d.get("usage") and not d["choices"]:
                tokens = d["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


def level(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    lock, out = threading.Lock(), []

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                p = jobs.pop()
            res = one(base, p, max_tokens)
            with lock:
                out.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in out)
    tokens = sum(n for _, n in out)
    return {"clients": clients, "requests": len(out), "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 2), "ttft_p50": round(statistics.median(ttfts), 3),
            "ttft_p95": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--max_num_seqs", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    a = ap.parse_args()
    server, thread, base = start(a.model, a.max_num_seqs, 512)
    try:
        one(base, PROMPTS[0], 4)     # warm-up
        rows = [level(base, int(c), a.requests, a.max_tokens) for c in a.clients.split(",")]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(f"{'clients':>8} {'requests':>9} {'tokens':>7} {'wall_s':>8} {'tok_s':>8} {'ttft_p50':>9} {'ttft_p95':>9}")
    for r in rows:
        print(f"{r['clients']:>8} {r['requests']:>9} {r['tokens']:>7} {r['wall_s']:>8} {r['tok_s']:>8} "
              f"{r['ttft_p50']:>9} {r['ttft_p95']:>9}")
    result = {"model": a.model, "max_tokens": a.max_tokens, "max_num_seqs": a.max_num_seqs, "rows": rows,
              "loadavg": os.getloadavg(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
