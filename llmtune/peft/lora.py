"""LoRA, rsLoRA and DoRA: the layers and the functions that put them into (and take them out of) a model.

The code lives along its seams: :mod:`llmtune.peft.layers` (:class:`LoraLinear`, :class:`ModulesToSave`),
:mod:`llmtune.peft.targets` (``lora_target``/``additional_target`` to module paths),
:mod:`llmtune.peft.adapters` (injecting, switching, disabling, deleting adapters; their tensors) and
:mod:`llmtune.peft.merge` (merging into the base weights). This module re-exports their public names.

Module layout and parameter names are PEFT's, so the state-dict keys of a wrapped model and of a saved
adapter are the ones PEFT reads and writes:

* a wrapped linear layer ``<path>`` becomes :class:`LoraLinear` with the original layer at
  ``<path>.base_layer`` and, per adapter ``name``, ``<path>.lora_A.<name>`` (``nn.Linear(in, r)``),
  ``<path>.lora_B.<name>`` (``nn.Linear(r, out)``) and, for DoRA, ``<path>.lora_magnitude_vector.<name>``
  (a ``(out,)`` parameter);
* a module trained in full (``additional_target``, PEFT's ``modules_to_save``) becomes
  :class:`ModulesToSave` holding ``<path>.original_module`` and the trained copy
  ``<path>.modules_to_save.<name>``.

Sources: the papers cited in :mod:`llmtune.peft.layers` (LoRA eq. 3, rsLoRA, DoRA eq. 5).
"""

from llmtune.peft.adapters import (
    PEFT_PREFIX,
    active_adapter,
    adapter_parameters,
    adapter_targets,
    apply_lora,
    delete_adapter,
    disable_adapters,
    get_active_adapters,
    inject_lora,
    list_adapters,
    lora_layers,
    lora_state_dict,
    saved_modules,
    set_adapter,
)
from llmtune.peft.layers import LoraLinear, ModulesToSave, base_weight, is_linear_like, is_quantized, set_module
from llmtune.peft.merge import merge_adapters, merged_weight, unmerge_adapters
from llmtune.peft.targets import as_names, linear_modules, select_lora_targets, select_modules_to_save

__all__ = [
    "PEFT_PREFIX", "LoraLinear", "ModulesToSave", "active_adapter", "adapter_parameters", "adapter_targets",
    "apply_lora", "as_names", "base_weight", "delete_adapter", "disable_adapters", "get_active_adapters",
    "inject_lora", "is_linear_like", "is_quantized", "linear_modules", "list_adapters", "lora_layers",
    "lora_state_dict", "merge_adapters", "merged_weight", "saved_modules", "select_lora_targets",
    "select_modules_to_save", "set_adapter", "set_module", "unmerge_adapters",
]
