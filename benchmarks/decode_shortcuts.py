"""Benchmark: the CPU decode step's work outside the matrix products, with and without the decode shortcuts.

A GRPO rollout of issue 28's job on the real model (2 prompts x 4 completions, ``--new_tokens`` 48 new tokens,
greedy, no stop token, LoRA r16 on all linear layers with random non-zero B, bf16 autocast, frozen weights cast,
merged and oneDNN-packed as GRPO runs them: :func:`llmtune.train.precision.frozen_weights_cast`). Variants,
interleaved ``--repeats`` times in one process:

* ``before``: ``llmtune.models.transformer.DECODE_SHORTCUTS[0] = False`` and
  ``llmtune.engine.SlotKVCache.decode_shortcuts = False`` (per layer: RoPE tables cast, ``rotate_half`` of q and
  k apart, each projection casting its input, a bf16 cache cast to float32 whole by the attention, an
  advanced-index cache write);
* ``after``: both on (the default).

Reported: the whole rollout and its decode steps (``Engine._decode``, wall clock), best of the repeats, and whether
the tokens and log-probs of the two variants are bitwise equal. ``--profile`` prints torch.profiler's top ops of
one rollout of each. The load average is recorded: on a shared machine timings are noisy.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/decode_shortcuts.py [--new_tokens 48] [--repeats 3] [--profile]
        [--out benchmarks/results/decode_shortcuts_s6.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 17 + 25? Reply with the number only.", "What is 8 + 41? Reply with the number only."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--new_tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_shortcuts_s6.json"))
    a = ap.parse_args()
    from llmtune import apply_lora, load_model, load_tokenizer
    from llmtune import engine
    from llmtune.models import transformer
    from llmtune.rollout import generate_rollouts
    from llmtune.train.precision import frozen_weights_cast

    tok = load_tokenizer(a.model)
    ids = [tok.encode(p) for p in PROMPTS]
    torch.manual_seed(0)
    model = apply_lora(load_model(a.model), lora_rank=16, lora_alpha=32, lora_target="all").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    decode_s = [0.0]
    real_decode = engine.Engine._decode

    def timed_decode(self):
        t0 = time.perf_counter()
        try:
            return real_decode(self)
        finally:
            decode_s[0] += time.perf_counter() - t0

    engine.Engine._decode = timed_decode

    def run(on: bool):
        transformer.DECODE_SHORTCUTS[0] = on
        engine.SlotKVCache.decode_shortcuts = on
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16), frozen_weights_cast(model, torch.bfloat16, True, True):
                return generate_rollouts(model, ids, max_new_tokens=a.new_tokens, do_sample=False,
                                         num_return_sequences=4, eos_token_ids=None, return_logps=True)
        finally:
            transformer.DECODE_SHORTCUTS[0] = True
            engine.SlotKVCache.decode_shortcuts = True

    variants = {"before": False, "after": True}
    best = {k: [float("inf"), float("inf")] for k in variants}
    outs = {}
    run(True)   # warm-up (the output head's packed copy is made once a run)
    for _ in range(a.repeats):
        for name, on in variants.items():
            decode_s[0] = 0.0
            t0 = time.perf_counter()
            outs[name] = run(on)
            total = time.perf_counter() - t0
            best[name] = [min(best[name][0], total), min(best[name][1], decode_s[0])]
    same = (torch.equal(outs["before"].completion_ids, outs["after"].completion_ids)
            and torch.equal(outs["before"].logps, outs["after"].logps))
    steps = a.new_tokens - 1
    print("| variant | rollout s | decode s | decode ms/step |\n|---|---|---|---|")
    rows = []
    for name in variants:
        tot, dec = best[name]
        rows.append({"variant": name, "rollout_s": tot, "decode_s": dec, "decode_ms_per_step": 1000 * dec / steps})
        print(f"| {name} | {tot:.2f} | {dec:.2f} | {1000 * dec / steps:.1f} |")
    print(f"bitwise equal tokens and log-probs: {same}")
    profiles = {}
    if a.profile:
        from torch.profiler import profile
        for name, on in variants.items():
            with profile() as prof:
                run(on)
            avg = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
            profiles[name] = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in avg]
            print(f"\n{name}: top ops by self CPU time\n| op | self s | calls |\n|---|---|---|")
            for r in profiles[name]:
                print(f"| {r['op']} | {r['self_s']:.3f} | {r['calls']} |")
    result = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_average_1m": os.getloadavg()[0], "new_tokens": a.new_tokens, "rows": len(ids) * 4,
              "repeats": a.repeats, "bitwise_equal": same, "results": rows, "profiles": profiles}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out} (load average {result['load_average_1m']:.1f})")


if __name__ == "__main__":
    main()
