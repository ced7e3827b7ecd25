"""Full-parameter SFT from Python (keys as examples/train_sft_full.yaml).

Run from the repository root: python examples/train_sft_full.py
MODEL and DATA are the model examples/main_job.sh (or examples/fetch_model.sh) puts in examples/models/
and the data shipped in examples/data/; replace them with your own. The output folder
holds model.safetensors + config.json (Hugging Face names), loadable with llmtune.load_model or transformers.
"""

import llmtune

MODEL = "examples/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "examples/data"

results = llmtune.train({
    "stage": "sft", "model_name_or_path": MODEL, "template": "chatml", "dataset": "alpaca_en_demo",
    "dataset_dir": DATA, "finetuning_type": "full", "cutoff_len": 256, "max_samples": 200,
    "output_dir": "runs/sft_full_py", "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
    "learning_rate": 1e-5, "weight_decay": 0.01, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
    "num_train_epochs": 1, "logging_steps": 5, "save_strategy": "no", "bf16": True, "plot_loss": True,
})
print(results)
