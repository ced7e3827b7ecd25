"""SFT with LoRA from Python, then a question to the trained model (keys as examples/train_sft_lora.yaml).

Run from the repository root: python examples/train_sft_lora.py
MODEL and DATA are the model examples/main_job.sh (or examples/fetch_model.sh) puts in examples/models/
and the data shipped in examples/data/; replace them with your own.
"""

import llmtune
from llmtune.data.templates import get_template
from llmtune.chat import generate_reply

MODEL = "examples/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "examples/data"
OUT = "runs/sft_lora_py"

results = llmtune.train({
    "stage": "sft", "model_name_or_path": MODEL, "template": "chatml", "dataset": "identity,alpaca_en_demo",
    "dataset_dir": DATA, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 16, "lora_alpha": 32,
    "cutoff_len": 256, "max_samples": 200, "output_dir": OUT, "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05, "num_train_epochs": 2, "logging_steps": 5, "bf16": True, "plot_loss": True,
})
print(results)

model = llmtune.load_model(MODEL, adapter_name_or_path=OUT)   # base + the trained adapter, merged
tokenizer = llmtune.load_tokenizer(OUT)                        # the output folder holds the tokenizer files
print(generate_reply(model, tokenizer, get_template("chatml", tokenizer),
                     [{"role": "user", "content": "Who are you?"}], max_new_tokens=64, do_sample=False))
