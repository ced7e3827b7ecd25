"""The longest sequence one LoRA training step fits in a memory budget: llmtune vs transformers + peft.

For each implementation, the longest ``T`` (a multiple of ``--step`` tokens) for which ONE optimizer step of
LoRA (rank 8, alpha 16, all linear layers of the decoder, trainable parameters float32) on a batch of one row of
``T`` random tokens, every token a label, bf16 (base weights bf16, bf16 autocast), gradient checkpointing on,
keeps the process's peak RSS within ``--budget-gib``. Found by doubling from ``--min-len`` until a step fails
or ``--max-len`` is reached, then bisection down to ``--step`` tokens. Each trial is a fresh subprocess:

* it loads the model and adds LoRA, returns freed memory to the OS (``malloc_trim``), resets the kernel's
  peak-RSS mark (``/proc/self/clear_refs``: ``5``; so a loader's transient peak counts for neither side) and
  runs the step; its peak RSS is ``VmHWM`` after the step (model weights, optimizer state and activations:
  everything resident);
* the parent polls its RSS and kills it as soon as it passes the budget (a failed trial costs little time);
  a step that raises out-of-memory fails too.

Settings, each side's best for memory: llmtune with ``gradient_checkpointing`` (each layer keeps only its bf16
input; tiled MLP; flash SDPA; the loss in chunks that never hold the ``(T, vocab)`` logits);
transformers with ``attn_implementation="sdpa"``, ``gradient_checkpointing_enable(use_reentrant=False)``,
``use_cache=False``. ``logits_to_keep`` does not help here: every position has a label, so transformers needs
all ``T`` rows of logits (it keeps by default, and its loss upcasts them to float32).

Both children run with the same glibc malloc setting, ``MALLOC_MMAP_THRESHOLD_=--mmap-threshold`` in their
environment (default 131072 bytes: every block of 128 KiB or more is its own ``mmap``, returned to the OS when
freed, so a freed activation never sits in a fragmented heap; ``0`` leaves glibc's default, a threshold that
rises to the largest block freed so far, up to 32 MiB). The value is recorded in the JSON.

Also written: peak RSS against length for every successful trial (a plot, ``--plot``), so the curve runs from
``--min-len`` to each side's largest. Prints a table and writes JSON (``--out``).

    python benchmarks/max_context.py                                   # 8 GiB, a quiet machine (hours on a CPU)
    python benchmarks/max_context.py --budget-gib 3 --max-len 65536    # smaller, faster
    python benchmarks/max_context.py --budget-gib 3 --resume benchmarks/results/max_context.json  # go on

The JSON is rewritten after every trial (``"partial": true`` until the search ends), so an interrupted run keeps
its trials and ``--resume`` goes on from them.

The model is ``$LLMTUNE_SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf`` (default ``../shared``) or ``--model``.
transformers loads the GGUF by dequantizing it (needs transformers, peft, gguf, accelerate).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMTUNE_SHARED", REPO.parent / "shared"))
DEFAULT_MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GIB = 1024 ** 3


# -- worker (one trial, in its own process) ------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Return free heap to the OS, then restart the kernel's peak-RSS mark (VmHWM) at the current RSS."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def _llmtune_step(model_path: str, seq: int, tmp: str):
    import torch

    from llmtune.data.collator import get_collator
    from llmtune.models.loader import load_model
    from llmtune.peft import apply_lora
    from llmtune.train.trainer import Trainer

    model = load_model(model_path, dtype="bfloat16")
    torch.manual_seed(0)
    apply_lora(model, lora_rank=8, lora_alpha=16, lora_target="all")
    ids = torch.randint(0, model.config.vocab_size, (seq,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{"input_ids": ids, "attention_mask": [1] * seq, "labels": ids}]
    cfg = {"stage": "sft", "output_dir": str(Path(tmp) / "llmtune"), "per_device_train_batch_size": 1,
           "learning_rate": 1e-4, "max_steps": 1, "bf16": True, "report_to": "none", "cutoff_len": seq,
           "lr_scheduler_type": "constant", "gradient_checkpointing": True}
    collator = get_collator("sft", 0)
    trainer = Trainer(model, cfg, rows, collator=collator)
    model.train()
    batch = collator(rows)

    def step():
        trainer.accumulate_gradients([batch])
        trainer.optimizer_step()
    return step


def _hf_step(model_path: str, seq: int, tmp: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    make = _hf_step if args.worker == "hf" else _llmtune_step
    step = make(args.model, args.seq, args.tmp)
    _reset_peak()
    base = _status_kib("VmRSS")
    print("LOADED", flush=True)
    t0 = time.perf_counter()
    step()
    res = {"impl": args.worker, "seq": args.seq, "step_s": time.perf_counter() - t0,
           "peak_rss_mib": _status_kib("VmHWM") / 1024, "base_rss_mib": base / 1024}
    print("RESULT " + json.dumps(res), flush=True)


# -- driver ----------------------------------------------------------------------------------------------------
def trial(args, impl: str, seq: int) -> dict:
    """One step of ``impl`` at ``seq`` tokens in a fresh process; ``ok`` False past the budget or on error.
    A trial of ``--resume``'s file at the same budget is taken from there instead of run again."""
    budget_kib = args.budget_gib * GIB / 1024
    done = args.cache.get((impl, seq))
    if done is not None:
        print(f"  {impl:8s} T={seq:7d}: {'ok' if done['ok'] else 'FAIL'} (from --resume)", flush=True)
        return done
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--seq", str(seq), "--model",
           args.model, "--tmp", args.tmp, "--threads", str(args.threads)]
    t0 = time.perf_counter()
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    loaded = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("LOADED"):
                loaded.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    while proc.poll() is None:
        time.sleep(0.05)
        if not loaded.is_set():
            continue
        try:
            rss = int(next(ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                           if ln.startswith("VmRSS:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if rss > budget_kib:
            killed = rss / 1024
            proc.kill()
    proc.wait()
    reader.join(timeout=5)
    err = proc.stderr.read()
    res = next((json.loads(ln[7:]) for ln in lines if ln.startswith("RESULT ")), None)
    out = {"impl": impl, "seq": seq, "wall_s": round(time.perf_counter() - t0, 1)}
    if killed is not None:
        out.update(ok=False, reason=f"RSS {killed:.0f} MiB passed the budget")
    elif res is None:
        out.update(ok=False, reason=(err.strip().splitlines() or ["no result"])[-1][:200])
    else:
        out.update(res, ok=res["peak_rss_mib"] * 1024 <= budget_kib)
        if not out["ok"]:
            out["reason"] = f"peak {res['peak_rss_mib']:.0f} MiB over the budget"
    print(f"  {impl:8s} T={seq:7d}: " + (f"ok, peak {out['peak_rss_mib']:.0f} MiB, step {out['step_s']:.1f} s"
                                          if out["ok"] else f"FAIL ({out['reason']})") + f" [{out['wall_s']} s]",
          flush=True)
    return out


def longest(args, impl: str, trials: list) -> int:
    """Doubling then bisection; returns the longest successful length (0 if even ``--min-len`` fails)."""
    def ok(seq):
        t = trial(args, impl, seq)
        trials.append(t)
        write(args, trials, {}, partial=True)   # after every trial: an interrupted run keeps what it measured
        return t["ok"]
    good, bad, seq = 0, None, args.min_len
    while seq <= args.max_len:
        if not ok(seq):
            bad = seq
            break
        good, seq = seq, seq * 2
    if bad is None:
        if good < args.max_len and ok(args.max_len):
            good = args.max_len
        return good
    while bad - good > args.step:
        mid = (good + bad) // 2 // args.step * args.step
        if mid <= good:
            break
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good


def write(args, trials: list, best: dict, partial: bool = False) -> None:
    """The JSON result (``partial``: written during the search; ``longest`` is empty until it ends)."""
    result = {"budget_gib": args.budget_gib, "max_len": args.max_len, "step": args.step, "longest": best,
              "ratio": (best["llmtune"] / best["hf"]) if best.get("hf") and best.get("llmtune") else None,
              "partial": partial, "mmap_threshold": args.mmap_threshold, "trials": trials, "threads": args.threads, "model": Path(args.model).name}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


def plot(trials: list, budget_gib: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for impl, label in (("llmtune", "llmtune"), ("hf", "transformers + peft")):
        pts = sorted((t["seq"], t["peak_rss_mib"] / 1024) for t in trials if t["impl"] == impl and t["ok"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.axhline(budget_gib, color="grey", ls="--", label=f"budget {budget_gib:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens), batch 1")
    ax.set_ylabel("peak RSS of one LoRA step (GiB)")
    ax.set_title("SmolLM2-135M, LoRA r8, bf16, gradient checkpointing, CPU")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--budget-gib", type=float, default=8.0, help="peak RSS budget of a trial (GiB)")
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=1 << 20, help="stop doubling here (tokens)")
    ap.add_argument("--step", type=int, default=1024, help="bisection resolution (tokens)")
    ap.add_argument("--impl", default="hf,llmtune", help="comma list of llmtune, hf")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per trial (0 = torch's default)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "max_context.json"))
    ap.add_argument("--plot", default=str(REPO / "docs" / "images" / "max_context.png"))
    ap.add_argument("--tmp", default="/tmp/llmtune_max_context")
    ap.add_argument("--mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ (bytes) of both children; 0 = glibc's default")
    ap.add_argument("--resume", help="a JSON result of an interrupted run at the same budget: reuse its trials")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    if not Path(args.model).is_file():
        sys.exit(f"max_context: --model {args.model} not found (set LLMTUNE_SHARED or pass --model)")
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    args.cache = {}
    if args.resume:
        old = json.loads(Path(args.resume).read_text())
        if old["budget_gib"] != args.budget_gib:
            sys.exit(f"max_context: --resume {args.resume} is for {old['budget_gib']} GiB, not {args.budget_gib}")
        if old.get("mmap_threshold", 0) != args.mmap_threshold:
            sys.exit(f"max_context: --resume {args.resume} ran with --mmap-threshold {old.get('mmap_threshold', 0)}, "
                     f"not {args.mmap_threshold}")
        args.cache = {(t["impl"], t["seq"]): t for t in old["trials"]}
    trials: list = []
    best = {}
    for impl in args.impl.split(","):
        print(f"{impl}: budget {args.budget_gib:g} GiB", flush=True)
        best[impl] = longest(args, impl, trials)
    print(f"\nlongest LoRA step in {args.budget_gib:g} GiB peak RSS (batch 1, bf16, gradient checkpointing):")
    for impl, n in best.items():
        capped = " (= --max-len: not the limit)" if n == args.max_len else ""
        print(f"  {impl:8s} {n:8d} tokens{capped}")
    if best.get("hf") and best.get("llmtune"):
        print(f"  llmtune / transformers+peft: {best['llmtune'] / best['hf']:.1f}x")
    write(args, trials, best)
    plot(trials, args.budget_gib, Path(args.plot))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
