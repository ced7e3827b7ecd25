"""Stage grpo on the real model: a learning signal with a rule reward written here (LoRA, a handful of steps),
TRL's metric names in trainer_log.jsonl, and a failing reward function through the CLI (one error line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.real

GREETINGS = ["hi", "hello", "Hi!", "Hello there", "hey", "Good morning", "Thanks!", "Who are you?"]


def write_data(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": g, "input": "", "output": "ok", "solution": str(len(g))} for g in GREETINGS]
    (folder / "greet.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"greet": {"file_name": "greet.json"}}))
    return folder


def log_entries(folder):
    return [json.loads(line) for line in (Path(folder) / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


def short_reply(prompts, completions, solution, **kwargs):
    """-(characters of the reply) / 40: shorter replies score higher; ``solution`` arrives by column name."""
    assert all(s.isdigit() for s in solution)
    return [-len(c) / 40 for c in completions]


def test_grpo_raises_a_rule_reward_with_finite_kl(tmp_path, real_model_path):
    """8 seeded GRPO steps (2 prompts x 4 completions each, 16 new tokens at most) must raise the mean reward of
    the last 3 steps above that of the first 3 by at least 0.3, with a finite KL to the reference (measured: at
    most 8.1). The rise depends on the sampled trajectory: with rollouts drawn by inverse CDF (session 6),
    seeds 0-3 rose by 0.44, 0.58, 0.87 and 0.75 (e.g. seed 0: -1.30 -> -0.86); with torch.multinomial's
    draws seeds 0 and 1 rose by 0.98 and 0.62. About 60 s on the shared 2-core machine."""
    from llmtune.train.setup import run_train

    out = tmp_path / "grpo"
    run_train(dict(
        stage="grpo", model_name_or_path=str(real_model_path), dataset="greet", dataset_dir=str(write_data(tmp_path / "d")),
        template="chatml", finetuning_type="lora", lora_rank=8, output_dir=str(out), per_device_train_batch_size=8,
        gradient_accumulation_steps=1, num_generations=4, learning_rate=2e-3, lr_scheduler_type="constant",
        max_steps=8, max_completion_length=16, temperature=1.0, top_k=0, top_p=1.0, beta=0.04, logging_steps=1,
        seed=0, cutoff_len=64, bf16=True), reward_funcs=[short_reply])
    log = log_entries(out)
    assert [e["current_steps"] for e in log] == list(range(1, 9))
    rewards = [e["reward"] for e in log]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.3, rewards
    for key in ("kl", "reward_std", "rewards/short_reply/mean", "completions/mean_length", "completions/clipped_ratio",
                "clip_ratio/region_mean", "entropy", "loss", "grad_norm"):
        assert all(np.isfinite(e[key]) for e in log), key
    assert "stage: grpo" in (out / "training_args.yaml").read_text()
    assert (out / "adapter_model.safetensors").is_file()


def test_a_failing_reward_function_through_the_cli_is_one_error_line(tmp_path, real_model_path):
    data = write_data(tmp_path / "d")
    (tmp_path / "my_rewards.py").write_text("def needs_answer(prompts, completions, answer, **kw):\n"
                                            "    return [float(a in c) for a, c in zip(answer, completions)]\n")
    env = dict(os.environ, LLMTUNE_CACHE=str(tmp_path / ".cache"), TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-m", "llmtune", "train", "--stage", "grpo", "--model_name_or_path", str(real_model_path),
            "--dataset", "greet", "--dataset_dir", str(data), "--template", "chatml", "--finetuning_type", "lora",
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--num_generations", "4",
            "--max_completion_length", "4", "--max_steps", "1", "--reward_funcs", "my_rewards.py:needs_answer"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("llmtune: error:")]
    assert "needs_answer" in line and "my_rewards.py" in line and "answer" in line
