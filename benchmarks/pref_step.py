"""Benchmark: a DPO and a KTO step against an SFT step of the same rows (issue 25, item 5: "bring it near 2x an
SFT step of the same rows"), on the real model, through ``llmtune train`` as a user runs it.

The rows: the first ``--pairs`` pairs of LLaMA-Factory's ``dpo_en_demo`` (``examples/data``):

* ``sft``: each pair's prompt + chosen answer (``--pairs`` rows a step);
* ``dpo``: the pairs (prompt + chosen and prompt + rejected: twice SFT's rows), policy and reference (the same
  model with its adapters disabled) log-probs, ``pref_loss sigmoid``;
* ``kto``: the same pairs as KTO rows (each pair one desirable and one undesirable example, plus KTO's
  mismatched-completion rows for its reference point), policy and reference.

Every stage: LoRA r16 on all linear layers, ``cutoff_len`` ``--cutoff_len``, bf16, one optimizer step of all the
rows (batch = rows, no accumulation), ``--steps`` steps; a fresh process each (whole ``llmtune train``), the
stages run in turn (sft, dpo, kto, sft, ...) ``--repeats`` times. ``step_s`` is ``train_runtime / steps`` from
``all_results.json`` (model loading and data preparation excluded; the first step's warm-up included, alike for
every stage). ``vs_sft`` is ``step_s`` over the SFT step's (medians).

Usage::

    python benchmarks/pref_step.py [--pairs 4] [--cutoff_len 256] [--steps 3] [--repeats 2]
        [--model PATH] [--out benchmarks/results/pref_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_model() -> Path:
    """The real model: ``examples/models`` (after ``examples/fetch_model.sh``) or ``../shared/models``."""
    local = ROOT / "examples" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shared = Path(os.environ.get("LLMTUNE_SHARED", ROOT.parent / "shared")) / "models" / local.name
    return local if local.exists() else shared


def write_data(folder: Path, pairs: int) -> None:
    """``folder/dataset_info.json`` with ``pairs`` (ranking, sharegpt) and ``chosen`` (sharegpt) of the same rows."""
    rows = json.loads((ROOT / "examples" / "data" / "dpo_en_demo.json").read_text())[:pairs]
    (folder / "pairs.json").write_text(json.dumps(rows))
    (folder / "chosen.json").write_text(json.dumps([{"conversations": r["conversations"] + [r["chosen"]]}
                                                    for r in rows]))
    info = {"pairs": {"file_name": "pairs.json", "ranking": True, "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
            "chosen": {"file_name": "chosen.json", "formatting": "sharegpt",
                       "columns": {"messages": "conversations"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))


def run_stage(stage: str, args, data: Path, out: Path) -> dict:
    """One ``llmtune train`` process for ``stage``; its ``all_results.json`` figures."""
    rows = args.pairs
    argv = [sys.executable, "-m", "llmtune", "train", "--stage", stage, "--do_train", "true",
            "--model_name_or_path", str(args.model), "--template", "chatml", "--finetuning_type", "lora",
            "--lora_target", "all", "--lora_rank", "16", "--lora_alpha", "32",
            "--dataset", "chosen" if stage == "sft" else "pairs", "--dataset_dir", str(data),
            "--cutoff_len", str(args.cutoff_len), "--per_device_train_batch_size", str(rows),
            "--gradient_accumulation_steps", "1", "--max_steps", str(args.steps), "--learning_rate", "1e-5",
            "--bf16", "true", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--output_dir", str(out), "--overwrite_output_dir", "true", "--seed", "42"]
    if stage == "dpo":
        argv += ["--pref_beta", "0.1", "--pref_loss", "sigmoid"]
    if stage == "kto":
        argv += ["--pref_beta", "0.1"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "all_results.json").read_text())
    return {"step_s": res["train_runtime"] / args.steps, "tokens_per_s": res.get("train_tokens_per_second"),
            "train_loss": res.get("train_loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(default_model()))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--cutoff_len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stages", default="sft,dpo,kto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pref_step.json"))
    args = ap.parse_args()
    stages = args.stages.split(",")
    load0 = os.getloadavg()[0]
    runs: dict = {s: [] for s in stages}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        write_data(data, args.pairs)
        for r in range(args.repeats):
            for s in stages:
                runs[s].append(run_stage(s, args, data, Path(tmp) / f"out_{s}_{r}"))
                print(f"repeat {r + 1} {s}: {runs[s][-1]['step_s']:.2f} s a step", flush=True)
    med = {s: statistics.median(x["step_s"] for x in runs[s]) for s in stages}
    base = med.get("sft")
    print(f"\n{'stage':<6}{'s/step':>9}{'vs sft':>8}   (median of {args.repeats}; {args.pairs} pairs, "
          f"cutoff_len {args.cutoff_len})")
    for s in stages:
        print(f"{s:<6}{med[s]:>9.2f}{(med[s] / base if base else float('nan')):>8.2f}")
    out = {"settings": vars(args) | {"model": str(args.model)}, "runs": runs,
           "median_step_s": med, "vs_sft": {s: med[s] / base for s in stages} if base else None,
           "loadavg_before": round(load0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
           "machine": platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
