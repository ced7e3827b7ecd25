"""Merging adapters into the base weights (and back): ``W = W0 + s B A`` (DoRA: the magnitude-scaled
direction), PEFT's ``merge_and_unload`` / ``unmerge``; :func:`merged_weight` gives the dense merged weight
(also for a 4-bit base, as export needs).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from llmtune.errors import LLMTuneError, notice
from llmtune.peft.adapters import lora_layers, saved_modules
from llmtune.peft.layers import LoraLinear, is_quantized, set_module


def merged_weight(module: LoraLinear, adapter_names: Optional[Iterable[str]] = None) -> torch.Tensor:
    """Dense merged weight ``(out, in)`` of a :class:`LoraLinear` (see :meth:`LoraLinear.merged_weight`).

    For a 4-bit base this is ``dequantize() + s B A`` (DoRA: row-rescaled) in the compute dtype: the way
    export merges an adapter trained with QLoRA.
    """
    return module.merged_weight(adapter_names)


def merge_adapters(model: nn.Module, adapter_names: Optional[Sequence[str]] = None,
                   unload: bool = True) -> nn.Module:
    """Merge adapters (default: the active ones) into the base weights.

    Args:
        model: a model with LoRA layers.
        adapter_names: adapters to merge; None = the active ones.
        unload: True (default): remove every wrapper, giving back plain modules (``nn.Linear`` with the
            merged weight; a modules_to_save wrapper becomes its active trained copy, cast to the original
            dtype); all other adapters are dropped. False: merge in place, keep the wrappers
            (:func:`unmerge_adapters` undoes it).

    Returns ``model``. A merged ``lm_head`` that was tied to the embeddings is untied (the embeddings keep
    the base weight) and ``model.config.tie_word_embeddings`` is set to False.

    Raises:
        LLMTuneError: a quantized (4-bit) base layer (load the base without quantization to merge), or an
            unknown adapter name.
    """
    for _, layer in lora_layers(model):
        if is_quantized(layer.base_layer):
            raise LLMTuneError("cannot merge LoRA adapters into a 4-bit quantized model: load the base model "
                               "without quantization_bit to merge (export merges into a dequantized copy)")
    names = None if adapter_names is None else list(adapter_names)
    params: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        params[id(p)] = params.get(id(p), 0) + 1
    if not unload:
        for path, layer in lora_layers(model):
            if params.get(id(layer.base_layer.weight), 1) > 1:
                raise LLMTuneError(f"cannot merge in place into {path}: its weight is tied to another module; "
                                   "use merge_adapters(model) (unload=True), which unties it")
            layer.merge(None if names is None else [n for n in names if n in layer.lora_A])
        return model
    for path, layer in list(lora_layers(model)):
        todo = layer.active_adapters if names is None else [n for n in names if n in layer.lora_A]
        todo = [n for n in todo if n in layer.lora_A]
        base = layer.base_layer
        if todo or layer.merged_adapters:
            w = layer.merged_weight(todo)
            tied = params.get(id(base.weight), 1) > 1
            if tied:
                base.weight = nn.Parameter(w, requires_grad=base.weight.requires_grad)
                cfg = getattr(model, "config", None)
                if path.endswith("lm_head") and getattr(cfg, "tie_word_embeddings", False):
                    cfg.tie_word_embeddings = False
                notice(f"merging LoRA into {path} unties it from the weight it shared")
            else:
                with torch.no_grad():
                    base.weight.copy_(w)
        set_module(model, path, base)
    for path, mod in list(saved_modules(model)):
        keep = mod.active_module
        if names is not None:
            hit = [n for n in names if n in mod.modules_to_save]
            keep = mod.modules_to_save[hit[0]] if hit else mod.original_module
        if keep is not mod.original_module:
            dt = next(mod.original_module.parameters()).dtype
            keep.to(dt)
        set_module(model, path, keep)
    if isinstance(getattr(model, "lora_config", None), dict):
        model.lora_config = {}
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` with ``unload=False`` in every LoRA layer; returns ``model``."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model
