"""LoRA SFT training throughput on the real model: llmtune vs transformers + peft, float32 and bf16 autocast.

Each configuration runs in a fresh subprocess (so peak RSS is its own): load the model, add LoRA (rank 8,
alpha 16, all linear layers of the decoder, trainable parameters in float32), then ``--warmup`` untimed and
``--steps`` timed optimizer steps of AdamW on one fixed random batch of ``--batch`` x ``--seq`` tokens
(every token a label). Reported: tokens/s over the timed steps and peak RSS (``ru_maxrss``), side by side,
with the llmtune/transformers ratios. Prints a table and writes JSON (``--out``).

    python benchmarks/train_throughput.py --out bench_train.json            # batch 4 x 512, 2 timed steps
    python benchmarks/train_throughput.py --seq 256 --steps 3 --out b.json

The model is ``$LLMTUNE_SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf`` (default ``../shared``) or
``--model``. transformers loads the GGUF by dequantizing it (needs transformers, peft, gguf, accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path(os.environ.get("LLMTUNE_SHARED", REPO.parent / "shared")) / "models" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


def _batch(batch: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def worker_llmtune(args) -> dict:
    import torch

    from llmtune.models.loader import load_model
    from llmtune.peft import apply_lora
    from llmtune.train.trainer import Trainer

    bf16 = args.precision == "bf16"
    model = load_model(args.model, dtype="bfloat16" if bf16 else "float32")
    torch.manual_seed(0)
    apply_lora(model, lora_rank=8, lora_alpha=16, lora_target="all")
    ids, mask = _batch(args.batch, args.seq, model.config.vocab_size)
    rows = [{"input_ids": r.tolist(), "attention_mask": m.tolist(), "labels": r.tolist()} for r, m in zip(ids, mask)]
    cfg = {"stage": "sft", "output_dir": str(Path(args.tmp) / "llmtune"), "per_device_train_batch_size": args.batch,
           "learning_rate": 1e-4, "max_steps": args.warmup + args.steps, "bf16": bf16, "report_to": "none",
           "lr_scheduler_type": "constant"}
    trainer = Trainer(model, cfg, rows)
    model.train()
    batch = trainer.collate(list(range(args.batch)))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.accumulate_gradients([batch])
        trainer.optimizer_step()
        times.append(time.perf_counter() - t0)
    return {"step_s": times[args.warmup:]}


def worker_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bf16 = args.precision == "bf16"
    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids, mask = _batch(args.batch, args.seq, model.config.vocab_size)
    model.train()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"step_s": times[args.warmup:]}


def run_worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    res = (worker_llmtune if args.worker == "llmtune" else worker_hf)(args)
    steps = res["step_s"]
    res.update({"impl": args.worker, "precision": args.precision, "batch": args.batch, "seq": args.seq,
                "tokens_per_s": args.batch * args.seq * len(steps) / sum(steps),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "threads": torch.get_num_threads()})
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--impl", choices=["llmtune", "hf", "both"], default="both")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", choices=["llmtune", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/llmtune_bench_train", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    if not Path(args.model).is_file():
        sys.exit(f"model {args.model} not found: pass --model or set LLMTUNE_SHARED")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    impls = ["llmtune", "hf"] if args.impl == "both" else [args.impl]
    results = []
    for prec in precisions:
        for impl in impls:
            cmd = [sys.executable, __file__, "--worker", impl, "--precision", prec, "--model", args.model,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--tmp", args.tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{impl} {prec} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                results.append({"impl": impl, "precision": prec, "error": proc.stderr[-500:]})
                continue
            results.append(json.loads(line[7:]))
            r = results[-1]
            print(f"  done {impl:8s} {prec}: {r['tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    by = {(r["impl"], r["precision"]): r for r in results if "error" not in r}
    print(f"\nLoRA SFT (rank 8, all linear), batch {args.batch} x {args.seq} tokens, {args.steps} timed steps "
          f"after {args.warmup} warm-up")
    print(f"{'precision':9s} | {'llmtune tok/s':>13s} | {'hf+peft tok/s':>13s} | {'speed ratio':>11s} | "
          f"{'llmtune MiB':>11s} | {'hf+peft MiB':>11s} | {'RSS ratio':>9s}")
    ratios = {}
    for prec in precisions:
        a, b = by.get(("llmtune", prec)), by.get(("hf", prec))
        fmt = lambda r, k: f"{r[k]:.1f}" if r else "-"  # noqa: E731
        sr = a["tokens_per_s"] / b["tokens_per_s"] if a and b else None
        mr = a["peak_rss_mib"] / b["peak_rss_mib"] if a and b else None
        ratios[prec] = {"speed_llmtune_over_hf": sr, "rss_llmtune_over_hf": mr}
        print(f"{prec:9s} | {fmt(a, 'tokens_per_s'):>13s} | {fmt(b, 'tokens_per_s'):>13s} | "
              f"{(f'{sr:.2f}x' if sr else '-'):>11s} | {fmt(a, 'peak_rss_mib'):>11s} | {fmt(b, 'peak_rss_mib'):>11s} | "
              f"{(f'{mr:.2f}' if mr else '-'):>9s}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("worker",)},
                                              "results": results, "ratios": ratios}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
