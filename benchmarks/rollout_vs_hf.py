"""Benchmark: a GRPO rollout's decode on the real model, llmtune against transformers+peft ``generate``.

The rollout of issue 28's job: 2 prompts x 4 completions (``num_generations``), ``--new_tokens`` new tokens
(48), greedy with no stop token (every row decodes to the end, so both sides decode the same number of tokens),
bf16 autocast over float32 weights, LoRA r16 on all linear layers with non-zero random B factors (the same
adapter on both sides: llmtune saves it in PEFT's format, peft loads it). Variants, interleaved in one process,
best of ``--repeats``:

* ``hf``: transformers ``generate`` of the peft model (each prompt repeated 4 times, ``use_cache``), under
  ``torch.autocast`` as TRL's GRPOTrainer runs it;
* ``llmtune before``: :func:`llmtune.rollout.generate_rollouts` with the frozen weights cast once but the LoRA
  products at every step and torch's SDPA for the decode attention (the code before session 5);
* ``llmtune merged``: session 5's rollout (:func:`llmtune.train.precision.frozen_weights_cast` with
  ``merge_adapters``, the one-query decode attention);
* ``llmtune``: today's rollout, as GRPO and PPO run it: the merged weights also oneDNN-prepacked (``pack=True``).

``tok_s``: generated tokens (all rows) per second of the whole call, prefill included. The greedy tokens of each
llmtune variant are compared with transformers' (``same_tokens``: the fraction of equal tokens; bf16 rounding
may let near-ties differ). The load average is recorded.

Usage (from the repository root)::

    python benchmarks/rollout_vs_hf.py [--model PATH.gguf] [--new_tokens 48] [--repeats 3] [--threads N]
        [--out benchmarks/results/rollout_vs_hf.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 17 + 25? Reply with the number only.", "What is 8 + 41? Reply with the number only."]


def _sdpa_one_query(q, k, v, mask):
    """The decode attention before the one-query path: torch's SDPA."""
    k, v = k.to(q.dtype), v.to(q.dtype)   # the CPU slot cache holds float32 keys/values
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--new_tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_vs_hf.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmtune import apply_lora, load_model, load_tokenizer
    from llmtune.models import transformer
    from llmtune.peft import save_adapter
    from llmtune.rollout import generate_rollouts
    from llmtune.train.precision import frozen_weights_cast

    path = Path(a.model)
    tok = load_tokenizer(str(path))
    ids = [tok.encode(p) for p in PROMPTS]
    torch.manual_seed(0)
    ours = apply_lora(load_model(str(path)), lora_rank=16, lora_alpha=32, lora_target="all").eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        save_adapter(ours, d, None)
        hf = PeftModel.from_pretrained(hf, d).eval()
    hf.generation_config.eos_token_id = None   # no stop token: every row decodes to the end, as ours
    p = max(len(r) for r in ids)
    pad = 0
    g = 4   # greedy generate refuses num_return_sequences > 1: each prompt's row is repeated instead
    hf_ids = torch.tensor([[pad] * (p - len(r)) + r for r in ids for _ in range(g)])
    hf_mask = torch.tensor([[0] * (p - len(r)) + [1] * len(r) for r in ids for _ in range(g)])
    one_query = transformer._attend_one_query

    def run_hf():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = hf.generate(input_ids=hf_ids, attention_mask=hf_mask, max_new_tokens=a.new_tokens,
                              do_sample=False, pad_token_id=pad, use_cache=True)
        return out[:, p:]

    def run_ours(before: bool, pack: bool = False):
        transformer._attend_one_query = _sdpa_one_query if before else one_query
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16), \
                    frozen_weights_cast(ours, torch.bfloat16, not before, pack=pack):
                ro = generate_rollouts(ours, ids, max_new_tokens=a.new_tokens, do_sample=False,
                                       num_return_sequences=g, eos_token_ids=None, return_logps=False)
        finally:
            transformer._attend_one_query = one_query
        return ro.completion_ids

    impls = {"hf": run_hf, "llmtune before": lambda: run_ours(True), "llmtune merged": lambda: run_ours(False),
             "llmtune": lambda: run_ours(False, pack=True)}
    best = {k: float("inf") for k in impls}
    out = {}
    for _ in range(a.repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    n_tok = len(ids) * g * a.new_tokens
    rows = []
    print("| impl | s | tok/s | x hf | same tokens as hf |\n|---|---|---|---|---|")
    for name in impls:
        same = float((out[name] == out["hf"]).float().mean()) if out[name].shape == out["hf"].shape else 0.0
        rows.append({"impl": name, "total_s": best[name], "tok_s": n_tok / best[name],
                     "speedup_vs_hf": best["hf"] / best[name], "same_tokens_as_hf": same})
        print(f"| {name} | {best[name]:.2f} | {n_tok / best[name]:.1f} | {best['hf'] / best[name]:.2f} | {same:.3f} |")
    result = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_average_1m": os.getloadavg()[0], "new_tokens": a.new_tokens, "rows_decoded": len(ids) * g,
              "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out} (load average {result['load_average_1m']:.1f})")


if __name__ == "__main__":
    main()
