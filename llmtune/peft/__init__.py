"""Parameter-efficient fine-tuning: LoRA / rsLoRA / DoRA layers, PEFT-format adapter files, freeze tuning.

No ``peft`` import at run time: the layers, key names and file format are PEFT's so that adapters move
both ways (see ``docs/lora.md``).
"""

from llmtune.peft.freeze import apply_freeze
from llmtune.peft.io import load_adapter, read_adapter_config, save_adapter
from llmtune.peft.lora import (
    LoraLinear,
    ModulesToSave,
    active_adapter,
    adapter_parameters,
    apply_lora,
    delete_adapter,
    disable_adapters,
    get_active_adapters,
    list_adapters,
    lora_layers,
    lora_state_dict,
    merge_adapters,
    merged_weight,
    set_adapter,
    unmerge_adapters,
)

__all__ = [
    "LoraLinear", "ModulesToSave", "active_adapter", "adapter_parameters", "apply_freeze", "apply_lora",
    "delete_adapter", "disable_adapters", "get_active_adapters", "list_adapters", "load_adapter",
    "lora_layers", "lora_state_dict", "merge_adapters", "merged_weight", "read_adapter_config",
    "save_adapter", "set_adapter", "unmerge_adapters",
]
