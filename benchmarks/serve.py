"""Benchmark: ``llmtune api`` against LLaMA-Factory 0.9.5's ``llamafactory-cli api`` (its Hugging Face backend)
on the CPU: generated tokens/s and p50/p95 time to first token at 1, 8 and 32 concurrent streaming clients.

Same work on both sides: the same Hugging Face model folder (SmolLM2-135M-Instruct, converted once from the
shared GGUF by ``benchmarks/e2e_vs_llamafactory.sh``, which also installs LLaMA-Factory into its own venv; this
script runs it with ``SETUP_ONLY=1``), template ``smollm2`` on both, bfloat16 on both (LLaMA-Factory's HF
backend loads the checkpoint's dtype, bfloat16, even with ``--infer_dtype float32``: its server log says
``Will use dtype=torch.bfloat16``), the same prompts, greedy (``temperature: 0``), ``max_tokens`` tokens at most, streamed. Each server
runs in its own process on 127.0.0.1; the clients are threads of this process, each sending its requests one
after another until the level's requests are done (``max(--min_requests, clients)`` per level). At each level
llmtune runs first, then LLaMA-Factory, so both see the machine in about the same state.

- ``tok_s``: generated tokens over the level's wall time; the tokens of a reply are its text re-encoded with
  the model's tokenizer (LLaMA-Factory's stream reports no usage), the same count for both sides.
- ``ttft_p50`` / ``ttft_p95``: seconds from sending a request to its first content chunk.
- ``same_text``: the share of replies equal to the other server's reply to the same prompt (greedy; bfloat16
  rounding differs between the two implementations, so near-ties may go either way).

Both servers get ``--threads`` intra-op threads (``OMP_NUM_THREADS``, default 1: on a shared, oversubscribed
machine OpenMP threads that spin at barriers cost far more than they bring). Server settings: llmtune
``--max_num_seqs`` (default 32: every client decodes in one batch); LLaMA-Factory's
``MAX_CONCURRENT`` (default 32; its own default is 1, one request at a time: every client then runs its own
``model.generate`` in a thread, none waits for a slot). The load average is recorded: on a shared machine the
figures are noisy.

Usage::

    python benchmarks/serve.py [--clients 1,8,32] [--max_tokens 32] [--min_requests 8] [--work /tmp/llmtune_e2e]
                               [--skip_lf] [--out benchmarks/results/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: both servers compute in bfloat16: LLaMA-Factory 0.9.5's HF backend loads with torch_dtype "auto" (the
#: checkpoint's bfloat16) whatever --infer_dtype says, so llmtune is given the same dtype
DTYPE = "bfloat16"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "Give me three tips for sleeping well.", "What is 12 times 7?", "Name a famous painter.",
           "Describe a cat in one sentence.", "Why is the sky blue?"]


def setup(work: Path) -> tuple[Path, Path]:
    """LLaMA-Factory's venv and the HF model folder, made by e2e_vs_llamafactory.sh (SETUP_ONLY=1)."""
    env = dict(os.environ, SETUP_ONLY="1", WORK=str(work), LLMTUNE_PY=sys.executable)
    subprocess.run(["bash", str(HERE / "e2e_vs_llamafactory.sh")], env=env, check=True)
    return work / "lf-venv", work / "model-hf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {base} did not start in {timeout} s: {log.read_text()[-3000:]}")


def server_env(threads: int) -> dict:
    """The environment of a server process: ``threads`` intra-op threads (0: torch's default)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def start_llmtune(model: Path, max_num_seqs: int, work: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = work / "serve_llmtune.log"
    cmd = [sys.executable, "-m", "llmtune.cli", "api", "--model_name_or_path", str(model), "--template", "smollm2",
           "--infer_dtype", DTYPE, "--max_num_seqs", str(max_num_seqs), "--max_model_len", "512",
           "--max_queue", "256", "--served_model_name", "m", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=str(work),
                            env=server_env(threads))
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, log)
    return proc, base


def start_lf(venv: Path, model: Path, max_concurrent: int, work: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = work / "serve_lf.log"
    env = dict(server_env(threads), API_HOST="127.0.0.1", API_PORT=str(port), MAX_CONCURRENT=str(max_concurrent),
               HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf-home"), DISABLE_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    cmd = [str(venv / "bin" / "llamafactory-cli"), "api", "--model_name_or_path", str(model), "--template",
           "smollm2", "--infer_backend", "huggingface", "--infer_dtype", DTYPE, "--trust_remote_code", "false"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=str(work), env=env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, log)
    return proc, base


def one(base: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    """One streamed greedy chat request; returns (seconds to the first content chunk, the reply text)."""
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0, ttft, text = time.perf_counter(), None, ""
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: {r.status_code} {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for c in json.loads(line[6:]).get("choices", []):
                piece = (c.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text += piece
    return (ttft if ttft is not None else time.perf_counter() - t0), text


def plain(base: str, prompt: str, max_tokens: int) -> dict:
    """One non-streamed greedy request: its prompt token count (the servers' usage) and reply."""
    import httpx

    r = httpx.post(base + "/v1/chat/completions", timeout=900, json={
        "model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
    d = r.json()
    return {"prompt_tokens": d["usage"]["prompt_tokens"], "text": d["choices"][0]["message"]["content"]}


def level(base: str, clients: int, requests: int, max_tokens: int, count) -> dict:
    jobs = list(range(requests))
    lock, out = threading.Lock(), {}

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop(0)
            out[i] = one(base, PROMPTS[i % len(PROMPTS)], max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in out.values())
    tokens = sum(count(text) for _, text in out.values())
    return {"clients": clients, "requests": len(out), "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 2), "ttft_p50": round(statistics.median(ttfts), 3),
            "ttft_p95": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3),
            "texts": [out[i][1] for i in range(len(out))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--min_requests", type=int, default=8)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--max_num_seqs", type=int, default=32)
    ap.add_argument("--lf_max_concurrent", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server (0: torch's default)")
    ap.add_argument("--work", default=os.environ.get("WORK", "/tmp/llmtune_e2e"))
    ap.add_argument("--skip_lf", action="store_true", help="llmtune only (no LLaMA-Factory install)")
    ap.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    a = ap.parse_args()
    load0 = os.getloadavg()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    venv, model = setup(work)
    from llmtune.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model))

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    servers = {"llmtune": start_llmtune(model, a.max_num_seqs, work, a.threads)}
    if not a.skip_lf:
        servers["llamafactory"] = start_lf(venv, model, a.lf_max_concurrent, work, a.threads)
    rows: list = []
    try:
        check = {}
        for name, (_, base) in servers.items():
            one(base, PROMPTS[0], 4)                    # warm-up
            check[name] = plain(base, PROMPTS[0], a.max_tokens)
            print(f"{name}: {check[name]}", flush=True)
        for c in (int(x) for x in a.clients.split(",")):
            n = max(a.min_requests, c)
            for name, (_, base) in servers.items():
                r = level(base, c, n, a.max_tokens, count)
                r["server"] = name
                rows.append(r)
                print(f"{name:>12} clients {c:>3}: {r['tok_s']:>7} tok/s, TTFT p50 {r['ttft_p50']} s p95 "
                      f"{r['ttft_p95']} s ({r['requests']} requests, {r['tokens']} tokens, {r['wall_s']} s)",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    by = {(r["server"], r["clients"]): r for r in rows}
    for r in rows:
        other = by.get(("llamafactory" if r["server"] == "llmtune" else "llmtune", r["clients"]))
        if other is not None:
            r["same_text"] = round(sum(x == y for x, y in zip(r["texts"], other["texts"])) / len(r["texts"]), 3)
    print(f"\n{'server':>12} {'clients':>7} {'requests':>8} {'tokens':>6} {'wall_s':>7} {'tok_s':>7} "
          f"{'ttft_p50':>8} {'ttft_p95':>8} {'same_text':>9}")
    for r in rows:
        print(f"{r['server']:>12} {r['clients']:>7} {r['requests']:>8} {r['tokens']:>6} {r['wall_s']:>7} "
              f"{r['tok_s']:>7} {r['ttft_p50']:>8} {r['ttft_p95']:>8} {r.get('same_text', '-'):>9}")
    speedup = {c: round(by[("llmtune", c)]["tok_s"] / by[("llamafactory", c)]["tok_s"], 2)
               for (s, c) in by if s == "llamafactory"}
    if speedup:
        print("llmtune / LLaMA-Factory tokens/s:", ", ".join(f"{c} clients {x}x" for c, x in speedup.items()))
    lf_version = None
    if not a.skip_lf:
        lf_version = subprocess.run([str(venv / "bin" / "python"), "-c", "import llamafactory; "
                                     "print(llamafactory.__version__)"], capture_output=True, text=True).stdout.strip()
    result = {"model": str(model), "template": "smollm2", "dtype": DTYPE, "max_tokens": a.max_tokens,
              "llmtune_max_num_seqs": a.max_num_seqs, "lf_max_concurrent": a.lf_max_concurrent, "threads": a.threads,
              "loadavg_start": load0,
              "llamafactory_version": lf_version, "check": check, "speedup_tok_s": speedup,
              "rows": [{k: v for k, v in r.items() if k != "texts"} for r in rows],
              "replies": {r["server"]: dict(zip(PROMPTS, r["texts"])) for r in rows if r["clients"] == 1},
              "loadavg_end": os.getloadavg(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
