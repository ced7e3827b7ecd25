"""Benchmark: a GRPO rollout with fused q|k|v and gate|up packed products and float32 one-query attention.

The rollout of issue 28's job on the real model (2 prompts x 4 completions, ``--new_tokens`` 48 new tokens,
greedy, no stop token, LoRA r16 on all linear layers with random non-zero B, bf16 base and autocast, inside
:func:`llmtune.train.precision.frozen_weights_cast` with ``merge_adapters`` and ``pack`` as GRPO runs it). Variants,
interleaved ``--repeats`` times in one process:

* ``before``: separate packed q, k, v, gate, up products (``precision._fuse_projections`` off) and the one-query
  attention's products under autocast (bfloat16, the float32 slot cache recast per layer and step);
* ``fused``: the fused products only; ``f32_attend``: the float32 attention only; ``after``: both (the default).

Reported per variant: the context's entry (merge, cast, pack), the rollout in wall-clock and in process CPU time
(less sensitive to other processes on a shared machine; run with ``OMP_NUM_THREADS=1`` so both agree), best and
median of the repeats; whether ``fused`` gives ``before``'s tokens and log-probs bitwise (it should: the fused
product's columns are the separate products' bitwise); and the share of tokens ``after`` has in common with
``before`` (float32 attention scores move near-ties of greedy decoding). The load average is recorded.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/rollout_fused.py [--new_tokens 48] [--repeats 8]
        [--out benchmarks/results/rollout_fused_s7.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 17 + 25? Reply with the number only.", "What is 8 + 41? Reply with the number only."]


def _policy(path: str):
    """The real model in bf16 with LoRA r16 on every linear layer (B random, so the merge changes the weights)."""
    from llmtune import apply_lora, load_model

    torch.manual_seed(0)
    model = apply_lora(load_model(path, dtype="bfloat16"), lora_rank=16, lora_alpha=32, lora_target="all")
    with torch.no_grad():
        for _, b in ((n, p) for n, p in model.named_parameters() if "lora_B" in n):
            b.normal_(0, 0.02)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--new_tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_fused_s7.json"))
    a = ap.parse_args()
    from llmtune import load_tokenizer
    from llmtune.models import transformer
    from llmtune.rollout import generate_rollouts
    from llmtune.train import precision

    tok = load_tokenizer(a.model)
    ids = [tok.encode(p) for p in PROMPTS]
    model = _policy(a.model)
    fuse, one_query = precision._fuse_projections, transformer._attend_one_query

    def bf16_one_query(q, k, v, mask):   # autocast back on inside: the products in bfloat16, as before
        torch.set_autocast_enabled("cpu", True)
        try:
            return one_query(q, k, v, mask)
        finally:
            torch.set_autocast_enabled("cpu", False)

    def run(fused: bool, f32: bool):
        precision._fuse_projections = fuse if fused else (lambda *args: None)
        transformer._attend_one_query = one_query if f32 else bf16_one_query
        try:
            c0 = time.process_time()
            t0 = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
                    precision.frozen_weights_cast(model, torch.bfloat16, merge_adapters=True, pack=True):
                t1 = time.perf_counter()
                ro = generate_rollouts(model, ids, max_new_tokens=a.new_tokens, do_sample=False,
                                       num_return_sequences=4, eos_token_ids=None, return_logps=True)
                t2, c2 = time.perf_counter(), time.process_time()
        finally:
            precision._fuse_projections, transformer._attend_one_query = fuse, one_query
        return {"enter_s": t1 - t0, "rollout_s": t2 - t1, "cpu_s": c2 - c0}, ro

    variants = {"before": (False, False), "fused": (True, False), "f32_attend": (False, True), "after": (True, True)}
    times = {k: [] for k in variants}
    outs = {}
    run(True, True)   # warm-up (the output head's packed copy is made once a run)
    load0 = os.getloadavg()[0]
    for _ in range(a.repeats):
        for name, flags in variants.items():
            t, outs[name] = run(*flags)
            times[name].append(t)
    bitwise = (torch.equal(outs["before"].completion_ids, outs["fused"].completion_ids)
               and torch.equal(outs["before"].logps, outs["fused"].logps))
    same = float((outs["after"].completion_ids == outs["before"].completion_ids).float().mean())
    print("| variant | enter ms (best/med) | rollout s (best/med) | CPU s incl. enter (best/med) |\n|---|---|---|---|")
    rows = []
    for name in variants:
        r = {k: (min(t[k] for t in times[name]), statistics.median(t[k] for t in times[name]))
             for k in ("enter_s", "rollout_s", "cpu_s")}
        rows.append({"variant": name, **{f"{k}_best": v[0] for k, v in r.items()},
                     **{f"{k}_median": v[1] for k, v in r.items()}})
        print(f"| {name} | {1e3 * r['enter_s'][0]:.0f} / {1e3 * r['enter_s'][1]:.0f} | {r['rollout_s'][0]:.3f} / "
              f"{r['rollout_s'][1]:.3f} | {r['cpu_s'][0]:.3f} / {r['cpu_s'][1]:.3f} |")
    print(f"fused = before, tokens and log-probs bitwise: {bitwise}; after's tokens equal to before's: {same:.3f}")
    result = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_average_1m_start": load0, "load_average_1m_end": os.getloadavg()[0], "new_tokens": a.new_tokens,
              "rows": len(ids) * 4, "repeats": a.repeats, "fused_bitwise_equal_before": bitwise,
              "after_same_tokens_as_before": same, "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out} (load average {load0:.1f} at start, {result['load_average_1m_end']:.1f} at end)")


if __name__ == "__main__":
    main()
