"""A whole LoRA SFT training step with two or more chunked cross entropies, swapped step by step in ONE process.

Built to find why routing ``causal_lm_loss`` through ``kernels/cross_entropy.py`` (the "unified" chunked cross
entropy) made the CPU step slower while the loss alone was at parity. One process loads the real model in
bfloat16 with LoRA rank 8 on every linear layer (as ``train_throughput.py``: one fixed synthetic ``--batch`` x
``--seq`` batch, every token a label, AdamW, bf16 autocast) and, for each variant (``--variants NAME=SRC,...``;
SRC an llmtune source tree whose ``kernels/cross_entropy.py`` and ``llmtune/losses/logps.py`` are loaded as
private modules; ``.`` = the llmtune this process imports), sets the training stage's ``causal_lm_loss`` to
that variant's. After ``--warmup`` steps of each, ``--repeats`` rounds run one step of every variant in turn
(A B C A B C ...: a shared machine's load falls on all alike), each with its wall seconds, process CPU seconds
and minor page faults (``getrusage``). Then one step of each under ``torch.profiler`` (``profile_memory=True``):
operators are split into those inside the chunked cross entropy (an ancestor event matching ``--loss-marker``,
the autograd functions' names) and the rest of the step; per operator: calls, self CPU ms, allocations and
MiB allocated (the profiler's ``[memory]`` records by parent operator).

    python benchmarks/ce_step_profile.py --variants main=/tmp/main,unified=. --repeats 3 --out r.json

Source: PyTorch profiler (``torch.profiler.profile``, ``FunctionEvent``); ``getrusage(2)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMTUNE_SHARED", REPO.parent / "shared"))
if not (SHARED / "models").is_dir():
    SHARED = Path("/work/shared")
DEFAULT_MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _in_loss(ev, pattern) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if pattern.search(p.name):
            return True
        p = p.cpu_parent
    return False


def load_variant(name: str, src: str):
    """The ``causal_lm_loss`` of the source tree ``src`` (``.``: the imported llmtune's), as private modules."""
    import importlib.util

    if src == ".":
        from llmtune.losses.logps import causal_lm_loss

        return causal_lm_loss
    root = Path(src)
    ce_path = next(p for p in (root / "kernels" / "cross_entropy.py", root / "llmtune" / "kernels" / "cross_entropy.py")
                   if p.is_file())
    mods = {}
    for mod, path in ((f"_ce_{name}", ce_path), (f"_logps_{name}", root / "llmtune" / "losses" / "logps.py")):
        code = path.read_text().replace("llmtune.kernels.cross_entropy", f"_ce_{name}")
        spec = importlib.util.spec_from_loader(mod, loader=None, origin=str(path))
        m = importlib.util.module_from_spec(spec)
        m.__file__ = str(path)
        sys.modules[mod] = m
        exec(compile(code, str(path), "exec"), m.__dict__)
        mods[mod] = m
    return mods[f"_logps_{name}"].causal_lm_loss


def _summarise(prof, pattern) -> tuple[dict, dict]:
    """Per operator (``where:name``, where = loss or rest): calls, self CPU ms, allocating calls (self CPU memory
    > 0: the profiler books an allocation to the operator that makes it) and MiB they allocated net of frees."""
    ops: dict = {}
    tot = {w: {"self_cpu_ms": 0.0, "allocs": 0, "alloc_mib": 0.0} for w in ("loss", "rest")}
    for ev in prof.events():
        if ev.name == "[memory]":
            continue
        where = "loss" if (pattern.search(ev.name) or _in_loss(ev, pattern)) else "rest"
        o = ops.setdefault(f"{where}:{ev.name}", {"count": 0, "self_cpu_ms": 0.0, "allocs": 0, "alloc_mib": 0.0})
        mem = ev.self_cpu_memory_usage
        o["count"] += 1
        o["self_cpu_ms"] += ev.self_cpu_time_total / 1e3
        o["allocs"] += int(mem > 0)
        o["alloc_mib"] += max(mem, 0) / 2**20
        tot[where]["self_cpu_ms"] += ev.self_cpu_time_total / 1e3
        tot[where]["allocs"] += int(mem > 0)
        tot[where]["alloc_mib"] += max(mem, 0) / 2**20
    return tot, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="main=.", help="comma list of NAME=SRC (SRC: an llmtune source tree)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (one step of each variant per round)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled steps")
    ap.add_argument("--loss-marker", default="Chunked|FusedLinear")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not Path(args.model).is_file():
        sys.exit(f"model {args.model} not found: pass --model or set LLMTUNE_SHARED")
    import torch
    from torch.profiler import ProfilerActivity, profile

    import llmtune.train.stages.causal_lm as stage
    from llmtune.data.collator import get_collator
    from llmtune.models.loader import load_model
    from llmtune.peft import apply_lora
    from llmtune.train.trainer import Trainer

    variants = [(n, load_variant(n, src), src) for n, src in (v.split("=", 1) for v in args.variants.split(","))]
    names = [n for n, _, _ in variants]
    model = load_model(args.model, dtype="bfloat16")
    torch.manual_seed(0)
    apply_lora(model, lora_rank=8, lora_alpha=16, lora_target="all")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * args.seq, "labels": r.tolist()} for r in ids]
    n = len(variants) * (args.warmup + args.repeats + 1)
    cfg = {"stage": "sft", "output_dir": "/tmp/llmtune_ce_profile", "per_device_train_batch_size": args.batch,
           "learning_rate": 1e-4, "max_steps": n, "bf16": True, "report_to": "none", "lr_scheduler_type": "constant"}
    collator = get_collator("sft", 0)
    trainer = Trainer(model, cfg, rows * n, collator=collator)
    model.train()
    batch = collator(rows)

    def step(loss_fn):
        stage.causal_lm_loss = loss_fn
        trainer.accumulate_gradients([batch])
        trainer.optimizer_step()

    for _ in range(args.warmup):
        for _, fn, _ in variants:
            step(fn)
    timed = {nm: [] for nm in names}
    for rep in range(args.repeats):
        for nm, fn, _ in variants:
            load = os.getloadavg()[0]
            r0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
            step(fn)
            t1, c1, r1 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            timed[nm].append({"wall_s": t1 - t0, "cpu_s": c1 - c0, "minflt": r1.ru_minflt - r0.ru_minflt,
                              "nivcsw": r1.ru_nivcsw - r0.ru_nivcsw, "load_1m": load})
            print(f"round {rep + 1} {nm:12s}: wall {t1 - t0:6.2f} s, cpu {c1 - c0:6.2f} s, minor faults "
                  f"{r1.ru_minflt - r0.ru_minflt}, load {load:.2f}", file=sys.stderr, flush=True)
    prof_tot, prof_ops = {}, {}
    if not args.no_profile:
        pattern = re.compile(args.loss_marker)
        for nm, fn, _ in variants:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
                step(fn)
            prof_tot[nm], prof_ops[nm] = _summarise(prof, pattern)
    summary = {nm: {"median_wall_s": statistics.median(t["wall_s"] for t in timed[nm]),
                    "median_cpu_s": statistics.median(t["cpu_s"] for t in timed[nm]),
                    "median_minflt": statistics.median(t["minflt"] for t in timed[nm]),
                    "tokens_per_s_median": args.batch * args.seq / statistics.median(t["wall_s"] for t in timed[nm]),
                    "profiled": prof_tot.get(nm)} for nm in names}
    print(f"\nwhole step, bf16 autocast, LoRA r8 all, {args.batch} x {args.seq}; {args.repeats} rounds, torch threads "
          f"{torch.get_num_threads()}")
    print("variant | wall s per round | median wall s | median cpu s | tokens/s (median) | minflt | profiled loss "
          "self ms / allocs / MiB | rest self ms / allocs / MiB")
    for nm in names:
        s, w = summary[nm], ", ".join(f"{t['wall_s']:.2f}" for t in timed[nm])
        p = s["profiled"] or {x: {"self_cpu_ms": 0, "allocs": 0, "alloc_mib": 0} for x in ("loss", "rest")}
        print(f"{nm} | {w} | {s['median_wall_s']:.2f} | {s['median_cpu_s']:.2f} | {s['tokens_per_s_median']:.1f} | "
              f"{s['median_minflt']:.0f} | {p['loss']['self_cpu_ms']:.0f} / {p['loss']['allocs']} / "
              f"{p['loss']['alloc_mib']:.0f} | {p['rest']['self_cpu_ms']:.0f} / {p['rest']['allocs']} / "
              f"{p['rest']['alloc_mib']:.0f}")
    if prof_ops and len(names) >= 2:
        a, b = names[0], names[1]
        keys = sorted(set(prof_ops[a]) | set(prof_ops[b]))
        z = {"count": 0, "self_cpu_ms": 0.0, "allocs": 0, "alloc_mib": 0.0}
        order = sorted(keys, key=lambda k: -abs(prof_ops[b].get(k, z)["self_cpu_ms"] - prof_ops[a].get(k, z)["self_cpu_ms"]))
        print(f"\nper operator, largest |{b} - {a}| self CPU first (calls, self ms, allocations, MiB)")
        for k in order[:args.top]:
            x, y = prof_ops[a].get(k, z), prof_ops[b].get(k, z)
            print(f"{k[:60]:60s} | {x['count']:6d} {y['count']:6d} | {x['self_cpu_ms']:8.1f} {y['self_cpu_ms']:8.1f} | "
                  f"{x['allocs']:5d} {y['allocs']:5d} | {x['alloc_mib']:7.0f} {y['alloc_mib']:7.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "threads": torch.get_num_threads(),
                                              "summary": summary, "steps": timed, "profile_ops": prof_ops}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
