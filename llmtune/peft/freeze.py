"""Freeze (partial-parameter) fine-tuning with LLaMA-Factory's options.

Source: LLaMA-Factory ``finetuning_type: freeze`` (``freeze_trainable_layers``,
``freeze_trainable_modules``, ``freeze_extra_modules``): a positive ``n`` trains the last ``n`` decoder
layers, a negative ``n`` the first ``|n|``; within them, ``all`` or the named sub-modules
(``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``); extra modules are the ones
outside the decoder layers (``embed_tokens``, ``norm``, ``lm_head``).
"""

from __future__ import annotations

import re
from typing import Sequence, Union

import torch
from torch import nn

from llmtune.errors import LLMTuneError, nearest
from llmtune.peft.targets import as_names

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.([^.]+)")


def apply_freeze(model: nn.Module, freeze_trainable_layers: int = 2,
                 freeze_trainable_modules: Union[str, Sequence[str]] = "all",
                 freeze_extra_modules: Union[str, Sequence[str], None] = None, upcast: bool = True) -> nn.Module:
    """Make only some decoder layers (and optional extra modules) trainable; freeze the rest.

    Args:
        model: a :class:`llmtune.models.Transformer` (parameters named ``model.layers.<i>.<module>...``).
        freeze_trainable_layers: ``n > 0``: the last ``n`` layers; ``n < 0``: the first ``|n|``
            (clipped to the number of layers); 0: none.
        freeze_trainable_modules: ``"all"`` or sub-module names of a decoder layer (comma string or list),
            e.g. ``mlp,self_attn``.
        freeze_extra_modules: modules outside the decoder layers to train too (``embed_tokens``, ``norm``,
            ``lm_head``), matched by the module owning the parameter (so ``norm`` is the final norm only,
            where LLaMA-Factory's substring match would also pick every ``*_layernorm``).
        upcast: cast trainable float16/bfloat16 parameters to float32 (LLaMA-Factory does; the forward
            then needs autocast, as the trainer uses with bf16/fp16).

    Returns:
        ``model``, modified in place.

    Raises:
        LLMTuneError: a module name that is not a sub-module of a decoder layer / not outside them
            (the message lists the valid names).
    """
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    hidden: set[str] = set()
    non_hidden: set[str] = set()
    max_idx = -1
    for name, _ in model.named_parameters():
        m = _LAYER.search(name)
        if m:
            hidden.add(m.group(2))
            max_idx = max(max_idx, int(m.group(1)))
        else:
            parts = name.split(".")
            if len(parts) >= 2:
                non_hidden.add(parts[-2])
    if num_layers is None:
        num_layers = max_idx + 1
    if not num_layers:
        raise LLMTuneError("freeze fine-tuning needs a model with decoder layers (model.layers.<i>)")
    n = int(freeze_trainable_layers)
    ids = set(range(max(0, num_layers - n), num_layers)) if n > 0 else set(range(min(-n, num_layers)))
    modules = as_names(freeze_trainable_modules) or ["all"]
    for mod in modules:
        if mod != "all" and mod not in hidden:
            raise LLMTuneError(f"freeze_trainable_modules: no module {mod!r} in a decoder layer; choose from "
                               f"all, {', '.join(sorted(hidden))}.{nearest(mod, sorted(hidden))}")
    extras = as_names(freeze_extra_modules)
    for mod in extras:
        if mod not in non_hidden:
            raise LLMTuneError(f"freeze_extra_modules: no module {mod!r} outside the decoder layers; choose from "
                               f"{', '.join(sorted(non_hidden))}.{nearest(mod, sorted(non_hidden))}")
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        if m:
            train = int(m.group(1)) in ids and ("all" in modules or m.group(2) in modules)
        else:
            parts = name.split(".")
            train = len(parts) >= 2 and parts[-2] in extras
        p.requires_grad_(train)
        if train and upcast and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(torch.float32)
    return model
