"""LoRA SFT training throughput on the real model: llmtune vs transformers + peft, float32 and bf16 autocast.

Each measurement runs in a fresh subprocess (so peak RSS is its own): load the model, add LoRA (rank 8,
alpha 16, all linear layers of the decoder, trainable parameters in float32), then ``--warmup`` untimed and
``--steps`` timed optimizer steps of AdamW. Reported: tokens/s over the timed steps (REAL tokens only:
padding is not counted) and peak RSS (``ru_maxrss``), side by side, with the llmtune/transformers ratios.
Prints a table and writes JSON (``--out``).

Data (``--data``):
* ``synthetic``: one fixed random batch of ``--batch`` x ``--seq`` tokens, every token a label (no padding);
* ``alpaca``: ``alpaca_en_demo`` from ``$LLMTUNE_SHARED/data`` through llmtune's own data pipeline (template
  ``default``, ``cutoff_len = --seq``), encoded ONCE here and handed to every worker as the same rows: a new
  micro-batch of ``--batch`` rows each step. transformers gets them right-padded to the longest row (what
  ``DataCollatorForSeq2Seq`` does); llmtune gets its default padding-free batches (``llmtune``) or padded ones
  (``llmtune-padded``).

Implementations (``--impl``, comma list): ``llmtune``, ``llmtune-padded``, ``llmtune-compile`` (``torch_compile``:
regional compilation of the decoder layers; the compile time is reported apart), ``llmtune-gc``
(``gradient_checkpointing``), ``llmtune-before`` (the llmtune source tree given by ``--before``, e.g. an
older commit from ``git archive``, for before/after numbers in one run), ``hf``. With ``--repeats R`` the list runs R times in turn (A B A B ...), which
spreads the noise of a shared machine over every implementation; the table shows medians.

    python benchmarks/train_throughput.py --precision bf16 --impl llmtune,hf --repeats 2 --out r.json
    python benchmarks/train_throughput.py --data alpaca --precision bf16 --repeats 2
    python benchmarks/train_throughput.py --impl llmtune --precision bf16 --profile prof.txt   # one profiled step

The model is ``$LLMTUNE_SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf`` (default ``../shared``) or
``--model``. transformers loads the GGUF by dequantizing it (needs transformers, peft, gguf, accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMTUNE_SHARED", REPO.parent / "shared"))
DEFAULT_MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
IMPLS = ("llmtune", "llmtune-padded", "llmtune-compile", "llmtune-gc", "llmtune-before", "hf")


def _synthetic_rows(batch: int, seq: int, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * seq, "labels": r.tolist()} for r in ids]


def encode_alpaca(model: str, seq: int, n_rows: int, tmp: Path) -> list[dict]:
    """The first ``n_rows`` alpaca_en_demo rows through llmtune's data pipeline (template ``default``)."""
    from llmtune.data import get_dataset, get_template
    from llmtune.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    args = {"dataset": "alpaca_en_demo", "dataset_dir": str(SHARED / "data"), "cutoff_len": seq,
            "max_samples": n_rows, "data_cache_dir": str(tmp / "cache"), "packing": False}
    rows = get_dataset(args, tok, get_template("default", tok), "sft").train
    return [{k: list(r[k]) for k in ("input_ids", "attention_mask", "labels")} for r in rows][:n_rows]


def _step_batches(args, vocab: int) -> list[list[dict]]:
    """Rows of each step (``warmup + steps`` lists of ``batch`` rows)."""
    n = args.warmup + args.steps
    if args.data == "synthetic":
        rows = _synthetic_rows(args.batch, args.seq, vocab)
        return [rows] * n
    rows = json.loads(Path(args.rows).read_text())
    return [rows[i * args.batch:(i + 1) * args.batch] for i in range(n)]


def _profile(step, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    Path(path).write_text(table)


def worker_llmtune(args) -> dict:
    import torch

    from llmtune.data.collator import get_collator
    from llmtune.models.loader import load_model
    from llmtune.peft import apply_lora
    from llmtune.train.trainer import Trainer

    bf16 = args.precision == "bf16"
    model = load_model(args.model, dtype="bfloat16" if bf16 else "float32")
    torch.manual_seed(0)
    apply_lora(model, lora_rank=8, lora_alpha=16, lora_target="all")
    steps = _step_batches(args, model.config.vocab_size)
    cfg = {"stage": "sft", "output_dir": str(Path(args.tmp) / "llmtune"), "per_device_train_batch_size": args.batch,
           "learning_rate": 1e-4, "max_steps": len(steps), "bf16": bf16, "report_to": "none",
           "lr_scheduler_type": "constant", "gradient_checkpointing": args.worker == "llmtune-gc",
           "torch_compile": args.worker == "llmtune-compile"}
    try:
        collator = get_collator("sft", 0, padding_free=args.worker != "llmtune-padded")
    except TypeError:   # a version of llmtune before padding-free batches (for before/after numbers)
        collator = get_collator("sft", 0)
    t0 = time.perf_counter()
    trainer = Trainer(model, cfg, [r for s in steps for r in s], collator=collator)
    setup_s = time.perf_counter() - t0
    model.train()
    batches = [collator(s) for s in steps]
    times = []

    def step(batch):
        trainer.accumulate_gradients([batch])
        trainer.optimizer_step()

    cpu = []   # process CPU seconds per step (all threads): less sensitive than wall time to a shared machine
    for batch in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if args.profile:
        _profile(lambda: step(batches[-1]), args.profile)
    return {"step_s": times[args.warmup:], "step_cpu_s": cpu[args.warmup:], "first_step_s": times[0],
            "setup_s": setup_s,
            "real_tokens": [sum(len(r["input_ids"]) for r in s) for s in steps][args.warmup:]}


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
    steps = _step_batches(args, model.config.vocab_size)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def padded(rows):
        t = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad] * (t - len(r["input_ids"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (t - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (t - len(r["labels"])) for r in rows])
        return ids, mask, labels

    batches = [padded(s) for s in steps]
    model.train()
    times = []

    def step(batch):
        ids, mask, labels = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in batches:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    if args.profile:
        _profile(lambda: step(batches[-1]), args.profile)
    return {"step_s": times[args.warmup:], "first_step_s": times[0],
            "real_tokens": [sum(len(r["input_ids"]) for r in s) for s in steps][args.warmup:]}


def run_worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    res = (worker_hf if args.worker == "hf" else worker_llmtune)(args)
    steps = res["step_s"]
    res.update({"impl": args.worker, "precision": args.precision, "batch": args.batch, "seq": args.seq,
                "data": args.data, "tokens_per_s": sum(res["real_tokens"]) / sum(steps),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "threads": torch.get_num_threads()})
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", choices=["synthetic", "alpaca"], default="synthetic")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="tokens per row (synthetic) or cutoff_len (alpaca)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="run the implementations in turn this many times")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--impl", default="llmtune,hf", help=f"comma list of {', '.join(IMPLS)}")
    ap.add_argument("--profile", default=None, help="profile one extra step of each worker; write tables here "
                    "(suffixed with the implementation)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--before", default=None, help="source tree of the llmtune-before implementation")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/llmtune_bench_train", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    if not Path(args.model).is_file():
        sys.exit(f"model {args.model} not found: pass --model or set LLMTUNE_SHARED")
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        sys.exit(f"--impl: unknown {bad}; use {', '.join(IMPLS)}")
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    rows_file = tmp / "rows.json"
    if args.data == "alpaca":
        rows = encode_alpaca(args.model, args.seq, args.batch * (args.warmup + args.steps), tmp)
        rows_file.write_text(json.dumps(rows))
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    results = []
    for rep in range(args.repeats):
        for prec in precisions:
            for impl in impls:
                cmd = [sys.executable, __file__, "--worker", impl, "--precision", prec, "--model", args.model,
                       "--data", args.data, "--rows", str(rows_file), "--batch", str(args.batch),
                       "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
                       "--threads", str(args.threads), "--tmp", args.tmp]
                if args.profile:
                    cmd += ["--profile", f"{args.profile}.{impl}.{prec}.txt"]
                env = dict(os.environ)
                if impl == "llmtune-before":
                    if not args.before:
                        sys.exit("--impl llmtune-before needs --before SRC (an llmtune source tree)")
                    env["PYTHONPATH"] = str(Path(args.before).resolve())
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(f"{impl} {prec} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    results.append({"impl": impl, "precision": prec, "error": proc.stderr[-500:]})
                    continue
                results.append(json.loads(line[7:]))
                r = results[-1]
                print(f"  run {rep + 1} {impl:15s} {prec}: {r['tokens_per_s']:.1f} tokens/s, peak RSS "
                      f"{r['peak_rss_mib']:.0f} MiB, first step {r['first_step_s']:.1f} s", file=sys.stderr, flush=True)
    med = {}
    for prec in precisions:
        for impl in impls:
            rs = [r for r in results if r["impl"] == impl and r["precision"] == prec and "error" not in r]
            if rs:
                med[(impl, prec)] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                                     "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                                     "first_step_s": statistics.median(r["first_step_s"] for r in rs), "runs": len(rs)}
    shape = f"batch {args.batch} x {args.seq} tokens" if args.data == "synthetic" else \
        f"alpaca_en_demo, batch {args.batch}, cutoff_len {args.seq}, real tokens only"
    print(f"\nLoRA SFT (rank 8, all linear), {shape}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"medians of {args.repeats} interleaved run(s)")
    print(f"{'precision':9s} | {'implementation':15s} | {'tokens/s':>9s} | {'vs hf':>6s} | {'peak MiB':>8s} | "
          f"{'RSS vs hf':>9s} | {'1st step s':>10s}")
    ratios = {}
    for prec in precisions:
        base = med.get(("hf", prec))
        for impl in impls:
            m = med.get((impl, prec))
            if m is None:
                print(f"{prec:9s} | {impl:15s} | failed")
                continue
            sr = m["tokens_per_s"] / base["tokens_per_s"] if base else None
            mr = m["peak_rss_mib"] / base["peak_rss_mib"] if base else None
            if impl != "hf":
                ratios[f"{impl}/{prec}"] = {"speed_over_hf": sr, "rss_over_hf": mr}
            print(f"{prec:9s} | {impl:15s} | {m['tokens_per_s']:9.1f} | {(f'{sr:.2f}x' if sr else '-'):>6s} | "
                  f"{m['peak_rss_mib']:8.0f} | {(f'{mr:.2f}' if mr else '-'):>9s} | {m['first_step_s']:10.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "rows")},
            "medians": {f"{i}/{p}": v for (i, p), v in med.items()}, "ratios": ratios, "results": results},
            indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
