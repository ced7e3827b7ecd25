"""PPO with a reward written in Python: ``llmtune.train.ppo.train_ppo(config, reward_fn=...)``.

The reward function gets the decoded chat prompts (template text included) and the decoded responses (no
special tokens) of one rollout batch and returns one float per response. Here: reward short, polite replies
(``-characters / 40``, plus 1 when the reply says "hello"). The KL penalty against the starting model keeps
the policy close to it. Run from the repository root::

    python examples/ppo_custom_reward.py

It writes runs/ppo_custom_reward (LoRA adapter, value_head.safetensors, trainer_log.jsonl, training_reward.png).
Then chat with it: ``llmtune chat --model_name_or_path runs/ppo_custom_reward``.
"""

import json
from pathlib import Path

from llmtune.train.ppo import train_ppo

PROMPTS = ["hi", "hello", "Hi!", "Hello there", "hey", "Good morning", "Thanks!", "Who are you?"]


def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
    """Shorter is better; saying hello earns a bonus."""
    return [-len(r) / 40 + (1.0 if "hello" in r.lower() else 0.0) for r in responses]


def main() -> None:
    data = Path("runs/ppo_custom_reward_data")
    data.mkdir(parents=True, exist_ok=True)
    (data / "greet.json").write_text(json.dumps([{"instruction": p, "input": "", "output": "ok"} for p in PROMPTS]))
    (data / "dataset_info.json").write_text(json.dumps({"greet": {"file_name": "greet.json"}}))
    results = train_ppo({
        "model_name_or_path": "examples/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "dataset": "greet", "dataset_dir": str(data), "template": "chatml", "cutoff_len": 64,
        "finetuning_type": "lora", "lora_rank": 8, "output_dir": "runs/ppo_custom_reward",
        "overwrite_output_dir": True, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
        "ppo_epochs": 2, "learning_rate": 5e-4, "lr_scheduler_type": "constant", "max_steps": 20,
        "max_new_tokens": 16, "temperature": 0.9, "top_p": 0.8, "top_k": 0, "ppo_kl_coeff": 0.05,
        "bf16": True, "logging_steps": 1, "plot_loss": True, "seed": 0,
    }, reward_fn=reward_fn)
    print(results)


if __name__ == "__main__":
    main()
