"""Benchmark: ``llmtune.generate`` speed on the real model (prefill time, decode tokens per second).

For each dtype and batch size: random prompts of ``--prompt_len`` tokens, greedy, ``--new_tokens`` new tokens
with no stop token (every row decodes to the end). ``prefill_s`` is one forward pass over the prompts plus the
last-position logits; ``decode_tok_s`` counts generated tokens (all rows) per second of the decoding steps
after the prefill. The machine's load average is recorded: on a shared 2-core machine OpenMP's busy-waiting
threads slow down under contention by an order of magnitude (try ``OMP_WAIT_POLICY=PASSIVE`` or
``--threads 1`` there).

Usage::

    python benchmarks/generation.py [--model PATH] [--dtypes float32,bfloat16] [--batches 1,4]
                                    [--prompt_len 64] [--new_tokens 32] [--threads N]
                                    [--out benchmarks/results/generation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def default_model() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return repo.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bench(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
    from llmtune.generation import generate

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
    generate(model, ids[:, :8], max_new_tokens=2)  # warm-up
    with torch.inference_mode():
        t0 = time.perf_counter()
        hidden = model(ids)
        model.lm_head(hidden[:, -1])
        prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=new_tokens)
    total = time.perf_counter() - t0
    decode = max(total - prefill, 1e-9)
    steps = out.shape[1] - 1  # the first token comes from the prefill
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": out.shape[1], "prefill_s": prefill,
            "total_s": total, "decode_tok_s": batch * steps / decode, "ms_per_step": 1000 * decode / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from llmtune.models.loader import load_model

    rows = []
    for dtype in args.dtypes.split(","):
        model = load_model(args.model, dtype=dtype)
        for b in (int(x) for x in args.batches.split(",")):
            r = bench(model, b, args.prompt_len, args.new_tokens)
            r.update(model=Path(args.model).name, dtype=dtype)
            rows.append(r)
            print(f"{dtype:>9} batch {b:>2}: prefill {r['prefill_s']:.2f} s, decode {r['decode_tok_s']:.1f} tok/s "
                  f"({r['ms_per_step']:.0f} ms/step)", flush=True)
        del model
    result = {"machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "load_average_1m": os.getloadavg()[0], "rows": rows}
    print()
    print(f"{'dtype':>9} {'batch':>5} {'prompt':>6} {'new':>4} {'prefill s':>9} {'tok/s':>7} {'ms/step':>7}")
    for r in rows:
        print(f"{r['dtype']:>9} {r['batch']:>5} {r['prompt_len']:>6} {r['new_tokens']:>4} {r['prefill_s']:>9.2f} "
              f"{r['decode_tok_s']:>7.1f} {r['ms_per_step']:>7.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} (load average {result['load_average_1m']:.1f})")


if __name__ == "__main__":
    main()
