"""A LoRA checkpoint is also an adapter folder (DESIGN.md "Checkpoints are usable outputs").

``checkpoint-N`` of a LoRA (or DoRA, or LoRA with ``modules_to_save``) run holds the adapter in PEFT's layout,
``adapter_model.safetensors`` + ``adapter_config.json``, beside the resume state, so ``chat``, ``export``,
``adapter_name_or_path`` and transformers+peft take the checkpoint as they take the run's output folder.
The adapter's tensors are written once: ``trainable.safetensors`` then holds only the trainable tensors that
are not part of the adapter (a reward model's value head; nothing for plain LoRA), and
``trainer_state.json``'s ``adapter_tensors`` maps each PEFT key back to the parameter name for a resume.
The run's record (``llmtune.json``, ``training_args.yaml``, tokenizer files, ``generation_config.json``),
written into ``output_dir`` when training starts, is copied into every checkpoint (small files only).

Source: PEFT's saved key names (``base_model.model.<module path>.lora_A.weight``; see
:func:`llmtune.peft.adapters.lora_state_dict`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: files of the run's record copied from output_dir into each checkpoint
RECORD_FILES = ("llmtune.json", "training_args.yaml", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def split_adapter(model: Any, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{PEFT key: parameter name}`` of the trainable adapter ``default`` when every one of its tensors is in
    ``weights`` (a trainable LoRA adapter), else ``{}`` (full/freeze tuning, a view of gathered tensors)."""
    try:
        from llmtune.peft.adapters import adapter_targets, list_adapters

        if not isinstance(model, torch.nn.Module) or "default" not in list_adapters(model):
            return {}
        names = {id(p): n for n, p in model.named_parameters()}
        keys = {k: names.get(id(p)) for k, p in adapter_targets(model, "default").items()}
    except Exception:  # noqa: BLE001 - anything unusual keeps the plain layout (trainable.safetensors only)
        return {}
    return keys if keys and all(n in weights for n in keys.values()) else {}


def write_adapter(model: Any, folder: Path, output_dir: Path) -> None:
    """Write the PEFT adapter files of ``model`` into ``folder`` and copy the run's record from ``output_dir``."""
    from llmtune.peft import save_adapter

    chain = getattr(model, "adapter_chain", None)
    save_adapter(model, folder, base_model_name_or_path=getattr(chain, "base", None))
    for name in RECORD_FILES:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, folder / name)


def rename(state: Any, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter file's tensors under their parameter names (``state["adapter_tensors"]``); a key it does
    not map keeps its name (the resume then reports it as unexpected)."""
    names = state.get("adapter_tensors") if isinstance(state, dict) else None
    return {(names or {}).get(k, k): v for k, v in adapter.items()}


__all__ = ["split_adapter", "write_adapter", "rename", "ADAPTER_WEIGHTS", "RECORD_FILES"]
