"""Benchmark: one GRPO job through TRL's ``GRPOTrainer`` and through ``llmtune train --stage grpo``, in one run.

The job (the same on both sides): the real model (``--model``, SmolLM2-135M-Instruct Q4_1 GGUF; transformers
dequantizes it with ``gguf_file=`` into float32 weights, unmarked as quantized so that TRL may train it, llmtune
loads the GGUF itself), LoRA rank 16 /
alpha 32 / dropout 0 on every linear layer of the decoder (``lora_target: all`` = peft's ``all-linear``), the
prompts of ``examples/data/arith_grpo.json`` (the chatml prompt string llmtune's ``template: chatml`` builds,
given to TRL as a plain-text prompt so both tokenize the same text), the reward ``examples/rewards.py:correct_sum``
(it reads the ``solution`` column by name on both sides), ``num_generations``, ``max_completion_length``,
``max_steps``, ``seed``, ``loss_type dapo``, ``beta``, ``epsilon 0.2``, learning rate, ``temperature 1.0``
sampling (``top_k 0``, ``top_p 1``), ``num_iterations 1``, bf16 autocast with float32 weights
(``bf16: true``; TRL: ``bf16=True, use_cpu=True``), no gradient checkpointing (TRL 1.16 defaults to it: switched
off so that both do the same work), one optimizer update per step of ``prompts x num_generations`` completions
(``per_device_train_batch_size`` = that, ``gradient_accumulation_steps 1``). TRL generates with transformers'
``generate`` (no vLLM).

Each side runs in its own child process (``--child trl|llmtune``), one after the other: the whole-process
wall time (imports, model load, training; measured by the parent), per-step wall time (TRL: a
``TrainerCallback``'s ``on_step_begin`` -> ``on_step_end``, generation included; llmtune: the trainer's
``next_step`` (rollout) + ``train_step`` (forward, backward, optimizer)), peak RSS (``ru_maxrss`` of the child)
and tokens/s = (generated tokens + trained tokens) / summed step time, where generated = completion tokens of
all completions (each side's logged ``completions/mean_length`` x completions) and trained = prompt +
completion tokens of all completions (prompt tokens counted with the tokenizer on the same prompt strings).
Different sampled completions give different lengths, so tokens/s (not step time) is the comparable figure.

The machine's load average at start and end is recorded: on a shared machine timings are noisy.

Usage (from the repository root)::

    python benchmarks/grpo_vs_trl.py [--steps 3] [--prompts 2] [--generations 4] [--max-completion-length 16]
        [--model PATH.gguf] [--sides trl,llmtune] [--repeats 1] [--out benchmarks/results/grpo_vs_trl.json]

With ``--repeats N`` the sides run alternately N times in the one run (trl, llmtune, trl, llmtune, ...): the
summary gives each side's median tokens/s and peak RSS, their ratio, and the ratio of each repeat, so that one
slow moment of a shared machine does not decide the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chatml_prompt(instruction: str) -> str:
    """The prompt string of llmtune's ``chatml`` template for one user turn (no system prompt)."""
    return f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def load_rows() -> list[dict]:
    """The rows of examples/data/arith_grpo.json."""
    return json.loads((ROOT / "examples" / "data" / "arith_grpo.json").read_text())


def child_trl(a: argparse.Namespace) -> dict:
    """The job through TRL's GRPOTrainer; returns per-step times and the logged completion lengths."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT / "examples"))
    from rewards import correct_sum

    torch.manual_seed(a.seed)
    gguf = Path(a.model)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are dequantized float32 tensors, but transformers marks a GGUF-loaded model quantized and
    # refuses to train it: drop the mark (what saving it as a plain HF folder and reloading would give)
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ds = Dataset.from_list([{"prompt": chatml_prompt(r["instruction"]), "solution": r["solution"]}
                            for r in load_rows()])
    n = a.prompts * a.generations
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=n, gradient_accumulation_steps=1,
                         num_generations=a.generations, max_completion_length=a.max_completion_length,
                         max_steps=a.steps, learning_rate=5e-4, lr_scheduler_type="constant", beta=a.beta,
                         epsilon=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1,
                         temperature=1.0, top_k=0, top_p=1.0, seed=a.seed, bf16=True, use_cpu=True,
                         gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
                         disable_tqdm=True, max_grad_norm=1.0, dataloader_num_workers=0)
        peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                              task_type="CAUSAL_LM")
        tr = GRPOTrainer(model=model, reward_funcs=[correct_sum], args=cfg, train_dataset=ds,
                         processing_class=tok, peft_config=peft_cfg, callbacks=[Timer()])
        tr.train()
        logs = [h for h in tr.state.log_history if "completions/mean_length" in h]
    return {"step_s": times, "mean_length": [h["completions/mean_length"] for h in logs],
            "reward": [h.get("reward") for h in logs]}


def child_llmtune(a: argparse.Namespace) -> dict:
    """The job through llmtune's trainer (``run_train``, what ``llmtune train --stage grpo`` calls)."""
    from llmtune.train import trainer as trainer_mod
    from llmtune.train.setup import run_train

    times: list[float] = []
    T = trainer_mod.Trainer
    orig_next, orig_train = T.next_step, T.train_step

    def next_step(self, steps):
        self._bench_t0 = time.perf_counter()
        return orig_next(self, steps)

    def train_step(self, step):
        out = orig_train(self, step)
        times.append(time.perf_counter() - self._bench_t0)
        return out

    T.next_step, T.train_step = next_step, train_step
    n = a.prompts * a.generations
    with tempfile.TemporaryDirectory() as out:
        cfg = {"stage": "grpo", "do_train": True, "model_name_or_path": str(a.model), "template": "chatml",
               "finetuning_type": "lora", "lora_target": "all", "lora_rank": 16, "lora_alpha": 32,
               "lora_dropout": 0.0, "dataset": "arith_grpo", "dataset_dir": str(ROOT / "examples" / "data"),
               "cutoff_len": 128, "output_dir": out, "overwrite_output_dir": True,
               "reward_funcs": f"{ROOT / 'examples' / 'rewards.py'}:correct_sum",
               "num_generations": a.generations, "per_device_train_batch_size": n,
               "gradient_accumulation_steps": 1, "max_completion_length": a.max_completion_length,
               "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "beta": a.beta, "epsilon": 0.2,
               "loss_type": "dapo", "scale_rewards": "group", "num_iterations": 1, "learning_rate": 5e-4,
               "lr_scheduler_type": "constant", "max_steps": a.steps, "max_grad_norm": 1.0, "logging_steps": 1,
               "bf16": True, "seed": a.seed, "disable_tqdm": True, "plot_loss": False}
        cfg.update(json.loads(a.llmtune_extra or "{}"))
        run_train(cfg)
        logs = [json.loads(x) for x in (Path(out) / "trainer_log.jsonl").read_text().splitlines() if x.strip()]
    logs = [h for h in logs if "completions/mean_length" in h]
    return {"step_s": times, "mean_length": [h["completions/mean_length"] for h in logs],
            "reward": [h.get("reward") for h in logs]}


def prompt_tokens(model: str) -> float:
    """Mean token count of the job's prompt strings (transformers' tokenizer of the GGUF; llmtune's tokenizer
    reads the same vocabulary)."""
    from transformers import AutoTokenizer

    gguf = Path(model)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lens = [len(tok(chatml_prompt(r["instruction"]), add_special_tokens=False)["input_ids"]) for r in load_rows()]
    return sum(lens) / len(lens)


def summarize(side: str, res: dict, wall: float, n: int, p_tokens: float) -> dict:
    """Figures of one side: steps, wall times, tokens/s, peak RSS."""
    steps = res["step_s"]
    gen = sum(m * n for m in res["mean_length"])
    trained = gen + p_tokens * n * len(res["mean_length"])
    step_total = sum(steps)
    return {"side": side, "process_s": round(wall, 2), "steps": len(steps), "step_s": [round(s, 3) for s in steps],
            "mean_step_s": round(step_total / max(1, len(steps)), 3),
            "generated_tokens": round(gen, 1), "trained_tokens": round(trained, 1),
            "tok_s": round((gen + trained) / step_total, 2) if step_total else 0.0,
            "peak_rss_mb": round(res["peak_rss_kb"] / 1024, 1), "reward": res["reward"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="num_generations")
    ap.add_argument("--max-completion-length", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--sides", default="trl,llmtune")
    ap.add_argument("--llmtune-extra", default="", help="JSON dict of extra llmtune config keys")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the sides alternately this many times (trl, llmtune, trl, ...); the summary is the "
                         "median tokens/s of each side and their ratio")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_vs_trl.json"))
    ap.add_argument("--child", choices=["trl", "llmtune"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        res = child_trl(a) if a.child == "trl" else child_llmtune(a)
        res["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Path(a.child_out).write_text(json.dumps(res))
        return 0
    n = a.prompts * a.generations
    load0 = os.getloadavg()
    p_tokens = prompt_tokens(a.model)
    rows = []
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    for repeat, side in ((r, s) for r in range(max(1, a.repeats)) for s in sides):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--child-out", f.name,
                   "--steps", str(a.steps), "--prompts", str(a.prompts), "--generations", str(a.generations),
                   "--max-completion-length", str(a.max_completion_length), "--beta", str(a.beta),
                   "--seed", str(a.seed), "--model", a.model, "--llmtune-extra", a.llmtune_extra]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=str(ROOT / "benchmarks"))  # not the root: kernels/ shadows PyPI's
            wall = time.perf_counter() - t0
            rows.append(dict(summarize(side, json.loads(Path(f.name).read_text()), wall, n, p_tokens), repeat=repeat))
    print(f"\nGRPO job: {a.steps} steps x {a.prompts} prompts x {a.generations} generations x "
          f"<= {a.max_completion_length} new tokens, LoRA r16, bf16 autocast, beta {a.beta}; "
          f"load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"{'side':8} {'process s':>9} {'mean step s':>11} {'gen tok':>8} {'trained tok':>11} {'tok/s':>7} "
          f"{'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['side']:8} {r['process_s']:9.1f} {r['mean_step_s']:11.2f} {r['generated_tokens']:8.0f} "
              f"{r['trained_tokens']:11.0f} {r['tok_s']:7.1f} {r['peak_rss_mb']:11.0f}")
    medians = {}
    for side in sides:
        v = sorted(r["tok_s"] for r in rows if r["side"] == side)
        m = sorted(r["peak_rss_mb"] for r in rows if r["side"] == side)
        medians[side] = {"tok_s": v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2,
                         "peak_rss_mb": m[len(m) // 2], "runs": len(v)}
    ratios = {}
    if {"trl", "llmtune"} <= set(sides) and medians["trl"]["tok_s"]:
        by = {(r["repeat"], r["side"]): r for r in rows}
        ratios = {"median_tok_s": round(medians["llmtune"]["tok_s"] / medians["trl"]["tok_s"], 3),
                  "peak_rss": round(medians["llmtune"]["peak_rss_mb"] / medians["trl"]["peak_rss_mb"], 3),
                  "per_repeat_tok_s": [round(by[(i, "llmtune")]["tok_s"] / by[(i, "trl")]["tok_s"], 3)
                                       for i in range(max(1, a.repeats))]}
        print(f"llmtune / trl tokens/s: {ratios['median_tok_s']:.2f}x (medians of {max(1, a.repeats)} run(s) each; "
              f"per repeat {ratios['per_repeat_tok_s']}), peak RSS {ratios['peak_rss']:.2f}x")
    result = {"benchmark": "grpo_vs_trl", "args": {k: v for k, v in vars(a).items() if not k.startswith("child")},
              "prompt_tokens_mean": p_tokens, "load_avg_start": load0, "load_avg_end": os.getloadavg(),
              "cpus": os.cpu_count(), "platform": platform.platform(), "rows": rows, "medians": medians,
              "ratios": ratios, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
