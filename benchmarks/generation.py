"""Benchmark: ``llmtune.generate`` on the real model, the generation engine against the code it replaced.

For each dtype and batch size: random prompts (``--prompt_len`` tokens each, and with ``--ragged`` also a
batch of lengths drawn from ``prompt_len/4 .. prompt_len``), greedy, ``--new_tokens`` new tokens with no stop
token (every row decodes to the end). Two implementations run interleaved in the same process, best of
``--repeats``: ``old`` is ``llmtune/generation.py`` at ``--baseline`` (default: the last commit before the engine,
loaded with ``git show``, see ``benchmarks/baseline_code.py``), ``new`` today's :func:`llmtune.generation.generate`
on :class:`llmtune.engine.Engine`. ``tok_s`` counts generated tokens (all rows) per second of the whole call
(prefill included); ``ms_per_step`` is the call's time over its decode steps. Both must give the same tokens
(checked, ``same`` column). The machine's load average is recorded: on a shared 2-core machine OpenMP's
busy-waiting threads slow down under contention by an order of magnitude (try ``OMP_WAIT_POLICY=PASSIVE`` or
``--threads 1`` there).

Usage::

    python benchmarks/generation.py [--model PATH] [--dtypes float32,bfloat16] [--batches 1,4] [--ragged]
                                    [--prompt_len 64] [--new_tokens 32] [--repeats 3] [--threads N]
                                    [--baseline REF] [--out benchmarks/results/generation.json]
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
    shared = Path(os.environ.get("LLMTUNE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    return shared / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bench(model, old_generate, batch: int, prompt_len: int, new_tokens: int, ragged: bool, repeats: int) -> dict:
    from llmtune.generation import generate

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    if ragged:  # left padding: row i keeps its last n_i tokens
        for i, n in enumerate(torch.randint(max(1, prompt_len // 4), prompt_len + 1, (batch,), generator=g).tolist()):
            mask[i, :prompt_len - n] = 0
    impls = {"old": old_generate, "new": generate}
    for fn in impls.values():
        fn(model, ids[:, :8], max_new_tokens=2)  # warm-up
    best = {k: float("inf") for k in impls}
    out = {}
    for _ in range(repeats):  # interleaved: old, new, old, new, ...
        for name, fn in impls.items():
            t0 = time.perf_counter()
            out[name] = fn(model, ids, mask, max_new_tokens=new_tokens)
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = []
    for name in impls:
        n = out[name].shape[1]
        rows.append({"impl": name, "batch": batch, "prompt_len": prompt_len, "ragged": ragged,
                     "prompt_tokens": int(mask.sum()), "new_tokens": n, "total_s": best[name],
                     "tok_s": batch * n / best[name], "ms_per_step": 1000 * best[name] / n,
                     "same_tokens_as_old": bool(torch.equal(out[name], out["old"]))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--ragged", action="store_true", help="also a batch of prompts of different lengths")
    ap.add_argument("--repeats", type=int, default=3, help="best of N, old and new interleaved")
    ap.add_argument("--baseline", default=None, help="git ref of the old code (default: benchmarks/baseline_code.py)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from baseline_code import BASELINE_REF, old_modules
    from llmtune.models.loader import load_model

    ref = args.baseline or BASELINE_REF
    old_generate = old_modules(ref)[0].generate
    rows = []
    for dtype in args.dtypes.split(","):
        model = load_model(args.model, dtype=dtype)
        for b in (int(x) for x in args.batches.split(",")):
            for ragged in ((False, True) if args.ragged and b > 1 else (False,)):
                for r in bench(model, old_generate, b, args.prompt_len, args.new_tokens, ragged, args.repeats):
                    r.update(model=Path(args.model).name, dtype=dtype)
                    rows.append(r)
                    print(f"{dtype:>9} batch {b:>2}{' ragged' if ragged else ''} {r['impl']}: {r['total_s']:.2f} s, "
                          f"{r['tok_s']:.1f} tok/s ({r['ms_per_step']:.0f} ms/step) same={r['same_tokens_as_old']}",
                          flush=True)
        del model
    result = {"baseline": ref, "machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "load_average_1m": os.getloadavg()[0], "rows": rows}
    print("\n| dtype | batch | prompts | new | impl | s | tok/s | ms/step | same tokens |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind = f"{r['prompt_tokens']} tok" + (" ragged" if r["ragged"] else "")
        print(f"| {r['dtype']} | {r['batch']} | {kind} | {r['new_tokens']} | {r['impl']} | {r['total_s']:.2f} | "
              f"{r['tok_s']:.1f} | {r['ms_per_step']:.0f} | {r['same_tokens_as_old']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} (load average {result['load_average_1m']:.1f})")


if __name__ == "__main__":
    main()
