"""Parameter-efficient fine-tuning: LoRA / rsLoRA / DoRA layers, PEFT-format adapter files, freeze tuning.

Modules: ``layers`` (the LoRA layer), ``targets`` (which modules), ``adapters`` (adapter state and switching),
``merge``, ``io`` (PEFT's files), ``freeze``, ``rows`` (per-row adapters in one batch); ``lora`` re-exports the
first four.

No ``peft`` import at run time: the layers, key names and file format are PEFT's so that adapters move
both ways (see ``docs/lora.md``).
"""

from llmtune.peft.adapters import (
    active_adapter,
    adapter_parameters,
    apply_lora,
    delete_adapter,
    disable_adapters,
    get_active_adapters,
    list_adapters,
    lora_layers,
    lora_state_dict,
    set_adapter,
)
from llmtune.peft.freeze import apply_freeze
from llmtune.peft.io import load_adapter, read_adapter_config, save_adapter
from llmtune.peft.layers import LoraLinear, ModulesToSave
from llmtune.peft.merge import merge_adapters, merged_weight, unmerge_adapters
from llmtune.peft.rows import has_lora_config, row_adapters

__all__ = [
    "LoraLinear", "ModulesToSave", "active_adapter", "adapter_parameters", "apply_freeze", "apply_lora",
    "delete_adapter", "disable_adapters", "get_active_adapters", "list_adapters", "load_adapter",
    "lora_layers", "lora_state_dict", "merge_adapters", "merged_weight", "read_adapter_config",
    "has_lora_config", "row_adapters", "save_adapter", "set_adapter", "unmerge_adapters",
]
