"""A LoRA checkpoint is also an adapter folder (DESIGN.md "Checkpoints are usable outputs").

``checkpoint-N`` of a LoRA (or DoRA, or LoRA with ``modules_to_save``) run holds the adapter in PEFT's layout,
``adapter_model.safetensors`` + ``adapter_config.json``, beside the resume state, so ``chat``, ``export``,
``adapter_name_or_path`` and transformers+peft take the checkpoint as they take the run's output folder.
The adapter's tensors are written once: ``trainable.safetensors`` then holds only the trainable tensors that
are not part of the adapter (a reward model's value head; nothing for plain LoRA), and
``trainer_state.json``'s ``adapter_tensors`` maps each PEFT key back to the parameter name for a resume.
A full fine-tuning checkpoint is a model folder the same way: ``model.safetensors`` (every parameter, by its
Hugging Face name, in the training dtype) + ``config.json``, with ``trainable.safetensors`` holding only a
value head (``trainer_state.json``: ``"weights_file": "model.safetensors"``).
The run's record (``llmtune.json``, ``training_args.yaml``, tokenizer files, ``generation_config.json``),
written into ``output_dir`` when training starts, is copied into every checkpoint (small files only,
:func:`copy_record`). A freeze-tuning checkpoint stays ``trainable.safetensors`` (the trained layers only):
with the record it is used as a model by laying those tensors over the recorded base
(:mod:`llmtune.ckpt_weights`), which costs no second copy of the weights (DESIGN.md takes a model folder as
the checkpoint's form; for freeze tuning the base + tensors form is chosen to keep the disk cost at zero).

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
    """Write the PEFT adapter files of ``model`` into ``folder`` and copy the run's record from ``output_dir``.
    (An FSDP2 model is passed inside :func:`llmtune.train.wrap.full_parameters`: its parameters are then the
    gathered full tensors.)"""
    from llmtune.peft import save_adapter

    chain = getattr(model, "adapter_chain", None)
    save_adapter(model, folder, base_model_name_or_path=getattr(chain, "base", None))
    copy_record(folder, output_dir)


def copy_record(folder: Path, output_dir: Path) -> None:
    """Copy the run's record (:data:`RECORD_FILES` that exist in ``output_dir``) into the checkpoint ``folder``:
    every checkpoint carries it (a freeze or sharded FSDP checkpoint finds its base there,
    :mod:`llmtune.ckpt_weights`). Small files only (about 3.5 MB with a tokenizer.json)."""
    for name in RECORD_FILES:
        if (Path(output_dir) / name).is_file():
            shutil.copy2(Path(output_dir) / name, Path(folder) / name)


def full_model_names(model: Any, weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of ``weights`` that make up the whole model (every parameter but a value head) when all of
    them are trainable (full fine-tuning), else ``[]``: those go to ``model.safetensors`` beside a
    ``config.json``, so the checkpoint is a model folder as the run's output folder is."""
    if not isinstance(model, torch.nn.Module) or not hasattr(getattr(model, "config", None), "to_hf_dict"):
        return []
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith("v_head.")]
    if not params or not all(p.requires_grad for _, p in params):
        return []
    names = [n for n in weights if not n.startswith("v_head.")]
    return names if len(names) == len({id(p) for _, p in params}) else []


def write_model_config(model: Any, folder: Path, output_dir: Path, weights: dict[str, torch.Tensor],
                       names: list[str]) -> None:
    """``config.json`` (Hugging Face names, the weights' dtype) and the run's record for a full checkpoint."""
    import json

    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = str(weights[names[0]].dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    copy_record(folder, output_dir)


def rename(state: Any, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter file's tensors under their parameter names (``state["adapter_tensors"]``); a key it does
    not map keeps its name (the resume then reports it as unexpected)."""
    names = state.get("adapter_tensors") if isinstance(state, dict) else None
    return {(names or {}).get(k, k): v for k, v in adapter.items()}


__all__ = ["split_adapter", "write_adapter", "copy_record", "full_model_names", "write_model_config", "rename", "ADAPTER_WEIGHTS", "RECORD_FILES"]
