"""Benchmark: decode throughput of a batch of mixed LoRA adapters against one adapter (issue 26's goal: within
15%), on the real model with the generation engine ``llmtune api`` drives.

Setup: the real model with ``--adapters`` random-init adapters (rank ``--rank``, every linear layer, B nonzero)
loaded unmerged, none active. Each configuration runs ``--batch`` requests of ``--prompt_len`` random tokens,
greedy, ``--new_tokens`` new tokens with no stop token; the configurations run interleaved, best of ``--repeats``:

* ``base``: no row names an adapter (the base model);
* ``active (old path)``: adapter ``a0`` active (``set_adapter``), rows unnamed, ``LoraLinear.forward`` replaced by
  its pre-per-row body (``_forward_active``): the single-adapter path before this change, exactly;
* ``active``: the same with today's ``forward`` (one context-variable read per layer more);
* ``single``: every row names ``a0`` (today's per-request path for one adapter);
* ``mixed2`` / ``mixedN``: rows name ``a0, a1, ...`` in turn (2 / all ``--adapters`` adapters);
* ``mixed2+base``: rows name ``a0``, ``a1`` and none in turn.

``decode_tok_s`` is rows / decode-step time (the steps after the first, which prefills); ``tok_s`` counts all
generated tokens over the whole run (prefill included: mixed batches prefill one packed forward per adapter).
``vs_single`` is ``decode_tok_s`` over ``single``'s. With ``--train``, a LoRA training step (forward + backward,
batch ``4 x 128``) with today's ``forward`` against the old body, interleaved.

Usage::

    python benchmarks/serve_adapters.py [--model PATH] [--batch 8] [--prompt_len 32] [--new_tokens 32]
        [--adapters 4] [--rank 16] [--repeats 3] [--dtype float32] [--train] [--out benchmarks/results/...]
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


def add_adapters(model, n: int, rank: int) -> list:
    """``n`` LoRA adapters ``a0..`` on every linear layer, B ~ N(0, 0.02), none active; their names."""
    from llmtune.peft import set_adapter
    from llmtune.peft.lora import inject_lora
    from llmtune.peft.layers import LoraLinear

    names = [f"a{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    for name in names:
        inject_lora(model, lora_rank=rank, lora_target="all", adapter_name=name)
        for mod in model.modules():
            if isinstance(mod, LoraLinear) and name in mod.lora_B:
                with torch.no_grad():
                    mod.lora_B[name].weight.normal_(0, 0.02, generator=g)
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, [])
    return names


def run_once(model, prompts: list, names: list, new_tokens: int) -> tuple[float, float, int]:
    """``(total seconds, decode seconds per step, generated tokens)`` of one engine run."""
    from llmtune.engine import Engine, Request

    engine = Engine(model, max_slots=len(prompts), max_len=len(prompts[0]) + new_tokens + 1)
    for p, n in zip(prompts, names):
        engine.add_request(Request(p, new_tokens, adapter=n))
    t0 = time.perf_counter()
    tokens = len(engine.step())                     # prefill (+ first tokens)
    t1 = time.perf_counter()
    steps = 0
    while engine.has_work():
        tokens += len(engine.step())
        steps += 1
    t2 = time.perf_counter()
    return t2 - t0, (t2 - t1) / max(1, steps), tokens


def bench_decode(model, adapters: list, args) -> list:
    from llmtune.peft import set_adapter
    from llmtune.peft.layers import LoraLinear

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    b = args.batch
    configs = {
        "base": ([None] * b, None, False),
        "active (old path)": ([None] * b, "a0", True),
        "active": ([None] * b, "a0", False),
        "single": (["a0"] * b, None, False),
        "mixed2": ([adapters[i % 2] for i in range(b)], None, False),
        f"mixed{len(adapters)}": ([adapters[i % len(adapters)] for i in range(b)], None, False),
        "mixed2+base": ([("a0", "a1", None)[i % 3] for i in range(b)], None, False),
    }
    new_forward = LoraLinear.forward
    best: dict = {k: (float("inf"), float("inf"), 0) for k in configs}
    run_once(model, prompts[:2], ["a0", "a1"], 4)   # warm-up
    for _ in range(args.repeats):
        for key, (names, active, old) in configs.items():
            set_adapter(model, [] if active is None else [active])
            if old:
                LoraLinear.forward = LoraLinear._forward_active
            try:
                total, step, toks = run_once(model, prompts, names, args.new_tokens)
            finally:
                LoraLinear.forward = new_forward
                set_adapter(model, [])
            prev = best[key]
            best[key] = (min(prev[0], total), min(prev[1], step), toks)
    single = b / best["single"][1]
    rows = []
    for key, (total, step, toks) in best.items():
        rows.append({"config": key, "batch": b, "decode_ms_per_step": round(step * 1e3, 2),
                     "decode_tok_s": round(b / step, 1), "tok_s": round(toks / total, 1),
                     "vs_single": round((b / step) / single, 3)})
    return rows


def bench_train(model, args) -> list:
    """Forward + backward of a LoRA model (adapter ``a0`` trainable), today's forward vs the old body."""
    from llmtune.peft import adapter_parameters, set_adapter
    from llmtune.peft.layers import LoraLinear

    set_adapter(model, ["a0"])
    for p in adapter_parameters(model, "a0"):
        p.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(2))
    new_forward = LoraLinear.forward
    impls = {"train step (old forward)": LoraLinear._forward_active, "train step": new_forward}
    best = {k: float("inf") for k in impls}
    model.train()
    try:
        for r in range(args.repeats + 1):
            for key, fwd in impls.items():
                LoraLinear.forward = fwd
                t0 = time.perf_counter()
                out = model(ids)
                hidden = out[0] if isinstance(out, tuple) else out
                hidden.float().pow(2).mean().backward()
                dt = time.perf_counter() - t0
                if r:                                   # the first round warms up
                    best[key] = min(best[key], dt)
                model.zero_grad(set_to_none=True)
    finally:
        LoraLinear.forward = new_forward
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        set_adapter(model, [])
    return [{"config": k, "batch": "4x128", "step_ms": round(v * 1e3, 1)} for k, v in best.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_adapters.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from llmtune.runs import load_model

    model = load_model(args.model, dtype=args.dtype)
    adapters = add_adapters(model, args.adapters, args.rank)
    load0 = os.getloadavg()[0]
    rows = bench_decode(model, adapters, args)
    print(f"{'config':<22}{'batch':>6}{'ms/step':>10}{'decode tok/s':>14}{'tok/s':>9}{'vs single':>11}")
    for r in rows:
        print(f"{r['config']:<22}{r['batch']:>6}{r['decode_ms_per_step']:>10}{r['decode_tok_s']:>14}"
              f"{r['tok_s']:>9}{r['vs_single']:>11}", flush=True)
    train = bench_train(model, args) if args.train else []
    for r in train:
        print(f"{r['config']:<26}{r['batch']:>8}{r['step_ms']:>10} ms")
    out = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "adapters": args.adapters, "rank": args.rank, "repeats": args.repeats,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
           platform.machine(), "loadavg_before": round(load0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
           "decode": rows, "train": train}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
