"""The preference losses as plain functions, plugged into the Trainer as a custom stage.

A stage is ``(model, batch, ctx) -> (loss_sum, num_items, metrics)``: here a DPO variant written with
``llmtune.losses`` (sequence log-probs from hidden states, ``dpo_loss``), with the reference policy being the
same LoRA model with its adapters disabled. Swap ``dpo_loss`` for ``simpo_loss`` / ``orpo_loss`` /
``kto_loss`` / ``reward_loss`` to try another objective; the built-in stages (``stage: dpo | kto | rm``) are
in ``llmtune/train/stages/pref.py``, ``kto.py``, ``rm.py``.

Run from the repository root: python examples/preference_losses.py
MODEL and DATA are the model examples/main_job.sh (or examples/fetch_model.sh) puts in examples/models/
and the data shipped in examples/data/; replace them with your own.
"""

import torch

import llmtune
from llmtune.data import get_collator, get_dataset
from llmtune.data.templates import get_template
from llmtune.losses import dpo_loss, sequence_logps
from llmtune.peft import apply_lora, disable_adapters
from llmtune.train.trainer import Trainer

MODEL = "examples/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "examples/data"
CONFIG = {"stage": "dpo", "output_dir": "runs/custom_dpo", "per_device_train_batch_size": 2,
          "gradient_accumulation_steps": 2, "learning_rate": 2e-4, "max_steps": 10, "logging_steps": 1,
          "bf16": True, "seed": 0, "report_to": "none", "save_steps": 1000}
BETA = 0.1


def my_dpo_stage(model, batch, ctx):
    """Conservative DPO (label smoothing 0.1) on a (2B, T) batch: rows [:B] chosen, [B:] rejected."""
    ids, mask, pos, labels = batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["labels"]
    b = ids.shape[0] // 2
    logps = sequence_logps(model(ids, attention_mask=mask, position_ids=pos), model.lm_head.weight, labels)
    with torch.no_grad(), disable_adapters(model):     # the reference policy: the base model
        ref = sequence_logps(model(ids, attention_mask=mask, position_ids=pos), model.lm_head.weight, labels)
    losses, chosen_r, rejected_r = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], BETA, "sigmoid",
                                            label_smoothing=0.1)
    metrics = {"rewards/accuracies": (chosen_r > rejected_r).float().mean(),
               "rewards/margins": (chosen_r - rejected_r).mean()}
    return losses.sum(), b, metrics                     # summed over pairs; the trainer divides by the step's pairs


my_dpo_stage.count_items = lambda batch: batch["input_ids"].shape[0] // 2   # pairs, known before the forward

if __name__ == "__main__":
    tokenizer = llmtune.load_tokenizer(MODEL)
    template = get_template("chatml", tokenizer)
    rows = get_dataset({"dataset": "dpo_en_demo", "dataset_dir": DATA, "cutoff_len": 128, "max_samples": 40},
                       tokenizer, template, "dpo").train
    model = llmtune.load_model(MODEL, dtype=torch.bfloat16)
    apply_lora(model, lora_rank=8, lora_alpha=16, lora_target="all")
    trainer = Trainer(model, CONFIG, rows, collator=get_collator("dpo", tokenizer.pad_token_id),
                      stage=my_dpo_stage, tokenizer=tokenizer)
    print(trainer.train())
    for entry in trainer.log_history[-3:]:
        print(entry)
