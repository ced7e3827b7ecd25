"""Benchmark: rollout tokens/s of ``llmtune.rollout.generate_rollouts`` against the previous per-token-cat path.

Workload: ``--prompts`` random prompts of ``--min_prompt``..``--max_prompt`` tokens, ``--generations`` completions
each, greedy, ``--new_tokens`` new tokens, with ``--stop_ids`` random stop ids (so rows finish at different
steps; greedy makes both paths produce the same tokens, which is checked). The stop ids are drawn from the
tokens a first greedy run without stops produced, so that rows do stop. Paths:

* ``old``: the loop PPO used before (``llmtune.train.ppo.sample_responses`` as of the issue-16 report): prompts
  one micro-batch at a time (``--old_batch``, the seed's batch 1 by default), the KV cache and the attention mask
  grown by ``torch.cat`` every token, finished rows kept in the batch until all have stopped. It is rebuilt here
  (``CatKVCache`` and :func:`old_rollout`) so that the comparison does not depend on what train/ holds now.
* ``before engine``: :func:`generate_rollouts` as it was at ``--baseline`` (default: the last commit before the
  generation engine, loaded with ``git show``, ``benchmarks/baseline_code.py``): per batch, left-padded prompts,
  a preallocated cache written in place, finished rows dropped, every completion prefilled on its own.
* ``engine``: today's :func:`generate_rollouts` on :class:`llmtune.engine.Engine` with ``batch_size`` ``--batch``
  (all rows by default): slots, continuous batching, each prompt prefilled once for its ``--generations``.

Paths run interleaved (old, new, old, new...), best of ``--repeats``.

``tok_s`` = generated tokens (all rows, stop tokens included, no padding) per second of wall time, prefill
included. The machine's load average is recorded: timings on a shared machine are noisy.

Usage::

    python benchmarks/rollout.py [--model tiny|PATH.gguf|real] [--dtype float32] [--prompts 8] [--generations 4]
                                 [--new_tokens 64] [--old_batch 1] [--batch 0] [--repeats 2] [--baseline REF]
                                 [--out benchmarks/results/rollout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


class CatKVCache:
    """The cache as it was before issue 16: one ``torch.cat`` per layer per token."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def update(self, layer, k, v):
        old = self.layers[layer]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


@torch.no_grad()
def old_rollout(model, rows: list[list[int]], new_tokens: int, stop_ids: list[int], micro_batch: int):
    """Greedy rollouts the old way; returns the list of completions (stop token included)."""
    out = []
    eos = torch.tensor(stop_ids, dtype=torch.long)
    model.eval()
    for s in range(0, len(rows), micro_batch):
        chunk = rows[s:s + micro_batch]
        b, p = len(chunk), max(len(r) for r in chunk)
        ids = torch.zeros(b, p, dtype=torch.long)
        mask = torch.zeros(b, p, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, p - len(r):] = torch.tensor(r)
            mask[i, p - len(r):] = 1
        done = torch.zeros(b, dtype=torch.bool)
        toks, alive = [], []
        hidden, cache = model(ids, attention_mask=mask, past_key_values=CatKVCache(model.config.num_hidden_layers),
                              use_cache=True)
        for step in range(new_tokens):
            logits = model.lm_head(hidden[:, -1]).float()
            nxt = logits.argmax(-1)
            torch.log_softmax(logits, dim=-1).gather(1, nxt[:, None])  # the old path computed log-probs too
            live = ~done
            nxt = torch.where(live, nxt, torch.zeros_like(nxt))
            toks.append(nxt)
            alive.append(live)
            done = done | (live & torch.isin(nxt, eos))
            if bool(done.all()) or step == new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            hidden, cache = model(nxt[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
        t, a = torch.stack(toks, 1), torch.stack(alive, 1)
        out += [t[i, a[i]].tolist() for i in range(b)]
    return out


def build_model(name: str, dtype: str):
    from llmtune.models import ModelConfig, Transformer

    if name == "tiny":
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
        return Transformer(cfg).to(getattr(torch, dtype)).eval(), "random 4x256 (vocab 8192)"
    from llmtune.models.loader import load_model

    shared = Path(os.environ.get("LLMTUNE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    path = shared / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf" if name == "real" else Path(name)
    return load_model(str(path), dtype=dtype).eval(), path.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny",
                    help="tiny (random init), real (the shared SmolLM2 GGUF under $LLMTUNE_SHARED, default "
                    "../shared) or a path")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--min_prompt", type=int, default=16)
    ap.add_argument("--max_prompt", type=int, default=48)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--stop_ids", type=int, default=4, help="how many stop ids (drawn from generated tokens)")
    ap.add_argument("--old_batch", default="1", help="comma list of the old path's micro-batch sizes")
    ap.add_argument("--batch", type=int, default=0, help="new path's batch_size (0: all rows)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--baseline", default=None, help="git ref of the old code (default: benchmarks/baseline_code.py)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from baseline_code import BASELINE_REF, old_modules
    from llmtune.rollout import generate_rollouts

    ref = args.baseline or BASELINE_REF
    old_generate_rollouts = old_modules(ref)[1].generate_rollouts

    model, label = build_model(args.model, args.dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(args.min_prompt, args.max_prompt + 1, (args.prompts,), generator=g)]
    rows = [p for p in prompts for _ in range(args.generations)]
    stop_ids = []
    if args.stop_ids:  # tokens the model does produce (a random greedy model repeats itself and never hits others)
        free = generate_rollouts(model, prompts, max_new_tokens=args.new_tokens, do_sample=False).completions()
        pool = sorted({t for c in free for t in c[1:]})
        stop_ids = [pool[i] for i in torch.randperm(len(pool), generator=g)[:args.stop_ids].tolist()]
    n = len(rows)

    def run_rollouts(fn, bs):
        ro = fn(model, prompts, max_new_tokens=args.new_tokens, do_sample=False, eos_token_ids=stop_ids,
                num_return_sequences=args.generations, batch_size=bs)
        return ro.completions()

    paths = [(f"old cat, micro-batch {b}", lambda b=int(b): old_rollout(model, rows, args.new_tokens, stop_ids, b))
             for b in args.old_batch.split(",") if b]
    for bs in ([args.batch or n, 1] if args.batch == 0 else [args.batch]):
        paths.append((f"before engine, batch {bs}", lambda bs=bs: run_rollouts(old_generate_rollouts, bs)))
        paths.append((f"engine, batch {bs}", lambda bs=bs: run_rollouts(generate_rollouts, bs)))
    generate_rollouts(model, prompts[:1], max_new_tokens=2, do_sample=False)  # warm-up
    old_generate_rollouts(model, prompts[:1], max_new_tokens=2, do_sample=False)
    best = {name: float("inf") for name, _ in paths}
    comps = {}
    for _ in range(args.repeats):  # interleaved
        for name, fn in paths:
            t0 = time.perf_counter()
            comps[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    results, reference = [], comps[paths[0][0]]
    for name, _ in paths:
        same = comps[name] == reference
        tokens = sum(len(c) for c in comps[name])
        results.append({"path": name, "seconds": best[name], "tokens": tokens, "tok_s": tokens / best[name],
                        "same_tokens_as_first": same})
        print(f"{name:>26}: {tokens:5d} tokens in {best[name]:7.2f} s = {tokens / best[name]:8.1f} tok/s"
              f"{'' if same else '  (TOKENS DIFFER)'}", flush=True)
    base = results[0]["tok_s"]
    for r in results:
        r["speedup_vs_first"] = r["tok_s"] / base
    print("\n| path | tokens | s | tok/s | speed-up |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['path']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} | {r['speedup_vs_first']:.2f}x |")
    result = {"baseline": ref, "model": label, "dtype": args.dtype, "prompts": args.prompts, "generations": args.generations,
              "prompt_len": [args.min_prompt, args.max_prompt], "new_tokens": args.new_tokens,
              "stop_ids": args.stop_ids, "device": "cpu", "machine": platform.platform(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_1m": os.getloadavg()[0],
              "rows": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    runs = existing.get("runs", []) if isinstance(existing, dict) else []
    same = ("model", "dtype", "prompts", "generations", "new_tokens", "stop_ids")
    runs = [r for r in runs if any(r.get(k) != result[k] for k in same)] + [result]  # replace the same setting
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
