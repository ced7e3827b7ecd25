"""Stage ppo on the real model: a learning signal with a rule-based reward written here, and the seed's RLHF
chain (its rm command with `--lora_target value`, then its rlhf command with `--rm_path`) run as written
(inline comments removed; model path and datasets replaced; --max_steps, a short --max_seq_length and
--max_new_tokens added), plus the reward-model mistakes through the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_cli
from seed_commands import find_seed_command

pytestmark = pytest.mark.real

GREETINGS = ["hi", "hello", "Hi!", "Hello there", "hey", "Good morning", "Thanks!", "Who are you?"]


def log_entries(folder):
    return [json.loads(line) for line in (Path(folder) / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


def test_ppo_raises_a_rule_reward_with_bounded_kl(tmp_path, real_model_path):
    """reward = -(characters of the response) / 40, computed here: shorter replies score higher. 10 seeded PPO
    iterations of 8 greeting prompts (16 new tokens at most) must raise the mean reward of the last 3 iterations
    above that of the first 3 by at least 0.3 (measured: -1.54 -> -0.72), with the sequence KL to the reference
    staying below 15 nats (measured: at most 4.7)."""
    from llmtune.train.ppo import train_ppo

    data = tmp_path / "data"
    data.mkdir()
    (data / "greet.json").write_text(json.dumps([{"instruction": g, "input": "", "output": "ok"} for g in GREETINGS]))
    (data / "dataset_info.json").write_text(json.dumps({"greet": {"file_name": "greet.json"}}))
    seen = []

    def reward_fn(prompts, responses):
        assert len(prompts) == len(responses) == 8
        assert all(p.rstrip().endswith("<|im_start|>assistant") for p in prompts)  # ChatML prompt text
        seen.append(responses)
        return [-len(r) / 40 for r in responses]

    out = tmp_path / "ppo"
    results = train_ppo(dict(
        model_name_or_path=str(real_model_path), dataset="greet", dataset_dir=str(data), template="chatml",
        finetuning_type="lora", lora_rank=8, output_dir=str(out), per_device_train_batch_size=8,
        gradient_accumulation_steps=1, ppo_epochs=2, learning_rate=5e-4, lr_scheduler_type="constant", max_steps=10,
        max_new_tokens=16, temperature=0.9, top_k=0, top_p=0.8, bf16=True, logging_steps=1, seed=0, cutoff_len=64,
        plot_loss=True), reward_fn=reward_fn)
    log = log_entries(out)
    assert [e["current_steps"] for e in log] == list(range(1, 11))
    rewards = [e["reward"] for e in log]
    # the logged reward is the mean of what the reward function returned
    assert rewards[0] == pytest.approx(np.mean([-len(r) / 40 for r in seen[0]]), abs=1e-5)
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.3, rewards
    kls = [e["kl"] for e in log]
    assert all(np.isfinite(k) and k < 15 for k in kls), kls
    for key in ("ppo/loss/policy", "ppo/loss/value", "entropy", "clipfrac", "response_length", "lr", "loss"):
        assert all(np.isfinite(e[key]) for e in log), key
    assert results["train_runtime"] > 0
    for f in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors", "training_args.yaml",
              "llmtune.json", "tokenizer.json", "train_results.json", "training_loss.png", "training_reward.png"):
        assert (out / f).is_file(), f
    # the saved adapter is the policy alone: no reward adapter, no critic keys in it
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert keys and not any("v_head" in k or ".reward." in k for k in keys)
    assert sorted(load_file(str(out / "value_head.safetensors"))) == ["v_head.summary.bias", "v_head.summary.weight"]
    assert "stage: ppo" in (out / "training_args.yaml").read_text()


# -- the seed's RLHF chain -----------------------------------------------------------------------------------
SEQ = 64
ALPACA = {"instruction": "instruction", "input": "input", "output": "output"}
SFT_ROWS = [
    {"instruction": "请解释人工智能的定义", "input": "", "output": "人工智能是让计算机模拟人类智能的技术。"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
]
RM_ROWS = [
    {"instruction": "How do I boil an egg?", "input": "",
     "output": ["Put it in boiling water for 7 to 9 minutes, then cool it.", "Boil it.", "Fry it."]},
    {"instruction": "What is 2 + 2?", "input": "", "output": ["2 + 2 = 4.", "It is 5."]},
]
INFO = {"my_sft_data": {"file_name": "sft_data.json", "columns": ALPACA, "type": "sft"},
        "my_rm_data": {"file_name": "rm_data.json", "columns": ALPACA, "type": "rm"}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, real_model_path):
    """A user's folder with data/ registered as the seed does, ./sft_output and ./rm_output from the seed's
    own sft and rm commands (short runs)."""
    root = tmp_path_factory.mktemp("seed_rlhf")
    data = root / "data"
    data.mkdir()
    (data / "sft_data.json").write_text(json.dumps(SFT_ROWS, ensure_ascii=False), encoding="utf-8")
    (data / "rm_data.json").write_text(json.dumps(RM_ROWS, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps(INFO, ensure_ascii=False), encoding="utf-8")
    sft = find_seed_command("train", stage="sft")
    run_cli(sft.argv(replace={"model_name_or_path": str(real_model_path), "max_seq_length": SEQ},
                     add={"max_steps": 1}), root)
    rm = find_seed_command("train", stage="rm")
    assert rm.get("lora_target") == "value" and rm.get("output_dir") == "./rm_output"
    run_cli(rm.argv(replace={"max_seq_length": SEQ}, add={"max_steps": 1}), root)
    assert (root / "rm_output" / "value_head.safetensors").is_file()
    return root


def test_seed_rlhf_command_runs_as_written(chain, real_model_path):
    cmd = find_seed_command("train", stage="rlhf")
    assert cmd.get("rm_path") == "./rm_output" and cmd.get("model_name_or_path") == "./sft_output"
    assert cmd.get("ppo_clip_ratio") == "0.2" and cmd.get("ppo_kl_coeff") == "0.05"
    proc = run_cli(cmd.argv(replace={"max_seq_length": SEQ}, add={"max_steps": 1, "max_new_tokens": 8}), chain)
    out = chain / "rlhf_output"
    for f in ("adapter_model.safetensors", "value_head.safetensors", "training_args.yaml", "llmtune.json",
              "tokenizer.json", "generation_config.json", "train_results.json"):
        assert (out / f).is_file(), f
    args = (out / "training_args.yaml").read_text()
    assert "stage: ppo" in args and "ppo_clip_ratio: 0.2" in args and "ppo_kl_coeff: 0.05" in args
    assert f"reward_model: ./rm_output" in args and "template:" in args
    meta = json.loads((out / "llmtune.json").read_text())
    assert meta["base_model_name_or_path"] == str(Path(real_model_path).resolve())
    assert meta["parent_adapters"] == [str((chain / "sft_output").resolve())]
    (entry,) = [e for e in log_entries(out) if "reward" in e]
    assert entry["current_steps"] == 1 and entry["total_steps"] == 1
    for key in ("reward", "kl", "ppo/loss/policy", "ppo/loss/value", "entropy", "clipfrac", "response_length", "lr"):
        assert np.isfinite(entry[key]), key
    assert 1 <= entry["response_length"] <= 8
    assert entry["kl"] == pytest.approx(0.0, abs=1e-3)  # the first rollout's policy is the reference
    assert "Traceback" not in proc.stderr


def test_seed_rlhf_with_a_wrong_reward_model_is_one_clear_error(chain, real_model_path):
    cmd = find_seed_command("train", stage="rlhf")
    short = {"max_steps": 1, "max_new_tokens": 8}
    # the reward model was trained on ./sft_output; a policy from the plain base is another model
    proc = run_cli(cmd.argv(replace={"max_seq_length": SEQ, "model_name_or_path": str(real_model_path),
                                     "output_dir": "./rlhf_base"}, add=short), chain, ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("llmtune: error:")]
    assert "rm_output" in line and "sft_output" in line and "reward_model_type" in line
    assert not (chain / "rlhf_base").exists()  # nothing written
    # a folder without value_head.safetensors
    (chain / "not_rm").mkdir()
    proc = run_cli(cmd.argv(replace={"max_seq_length": SEQ, "rm_path": "./not_rm", "output_dir": "./rlhf_x"},
                            add=short), chain, ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("llmtune: error:")]
    assert "not_rm" in line and "value_head.safetensors" in line and "--stage rm" in line
