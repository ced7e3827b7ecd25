"""Continued pre-training with LoRA from Python (same keys as examples/train_pt_lora.yaml).

Run from the repository root: python examples/train_pt_lora.py
MODEL and DATA are the model examples/main_job.sh (or examples/fetch_model.sh) puts in examples/models/
and the data shipped in examples/data/; replace them with your own.
"""

import llmtune

MODEL = "examples/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "examples/data"

results = llmtune.train({
    "stage": "pt", "model_name_or_path": MODEL, "dataset": "c4_demo", "dataset_dir": DATA,
    "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8, "lora_alpha": 16,
    "cutoff_len": 256, "max_samples": 200, "output_dir": "runs/pt_lora_py",
    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-4,
    "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "num_train_epochs": 1, "logging_steps": 5,
    "bf16": True, "plot_loss": True,
})
print(results)
