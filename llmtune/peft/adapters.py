"""Adapter state: putting LoRA adapters into a model, switching, disabling and deleting them, and their
tensors under PEFT's key names (``base_model.model.<path>.lora_A.weight``...).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from llmtune.errors import LLMTuneError, notice
from llmtune.peft.layers import LoraLinear, ModulesToSave, set_module
from llmtune.peft.targets import as_names, select_lora_targets, select_modules_to_save

#: PEFT's prefix of every key in an adapter file of a causal LM (``PeftModelForCausalLM.base_model.model``).
PEFT_PREFIX = "base_model.model."


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(path, layer)`` for every :class:`LoraLinear` in ``model``."""
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            yield path, mod


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """``(path, module)`` of every :class:`ModulesToSave` wrapper in ``model`` (``additional_target``)."""
    for path, mod in model.named_modules():
        if isinstance(mod, ModulesToSave):
            yield path, mod


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters present in ``model`` (in the order they were added)."""
    names: list[str] = list(getattr(model, "lora_config", {}) or {})
    for _, layer in lora_layers(model):
        names.extend(n for n in layer.lora_A if n not in names)
    for _, mod in saved_modules(model):
        names.extend(n for n in mod.modules_to_save if n not in names)
    return names


def _tied_with_other(model: nn.Module, param: torch.Tensor, path: str) -> list[str]:
    """Other module paths holding the same parameter as ``path`` (weight tying)."""
    out = []
    for p, mod in model.named_modules():
        if p == path or p.startswith(path + "."):
            continue
        for t in mod.parameters(recurse=False):
            if t is param:
                out.append(p)
    return out


def inject_lora(model: nn.Module, lora_rank: int = 8, lora_alpha: Optional[float] = None,
                lora_dropout: float = 0.0, lora_target: Union[str, Sequence[str]] = "all",
                use_rslora: bool = False, use_dora: bool = False, adapter_name: str = "default",
                additional_target: Union[str, Sequence[str], None] = None, dtype: Optional[torch.dtype] = None,
                regex: bool = False) -> dict:
    """Add adapter ``adapter_name`` to ``model`` without changing any ``requires_grad`` flag.

    The building block of :func:`apply_lora` (training) and :func:`llmtune.peft.load_adapter`; arguments
    as in :func:`apply_lora`; ``dtype`` is the adapter parameters' dtype (None: the base's). Returns the
    adapter's config dict (PEFT ``adapter_config.json`` fields), also stored in ``model.lora_config``.
    """
    if adapter_name in list_adapters(model):
        raise LLMTuneError(f"the model already has an adapter named {adapter_name!r}; pick another adapter_name")
    if lora_alpha is None:
        lora_alpha = 2 * lora_rank
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise LLMTuneError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    paths, target_modules = select_lora_targets(model, lora_target, regex=regex)
    for path in paths:
        mod = model.get_submodule(path)
        if not isinstance(mod, LoraLinear):
            mod = LoraLinear(mod)
            set_module(model, path, mod)
        mod.update_layer(adapter_name, lora_rank, lora_alpha, lora_dropout, use_rslora, use_dora, dtype=dtype)
    save_paths = select_modules_to_save(model, additional_target)
    for path in save_paths:
        mod = model.get_submodule(path)
        if isinstance(mod, ModulesToSave):
            mod.add(adapter_name, dtype)
            continue
        for p in mod.parameters():
            tied = _tied_with_other(model, p, path)
            if tied:
                notice(f"additional_target {path} shares its weight with {tied[0]} (tied embeddings): "
                       f"as in PEFT, only {path} gets a trainable copy and {tied[0]} keeps the original")
                break
        set_module(model, path, ModulesToSave(mod, adapter_name, dtype))
    cfg = dict(r=int(lora_rank), lora_alpha=lora_alpha, lora_dropout=float(lora_dropout),
               target_modules=target_modules, use_rslora=bool(use_rslora), use_dora=bool(use_dora),
               modules_to_save=as_names(additional_target) or None)
    if not isinstance(getattr(model, "lora_config", None), dict):
        model.lora_config = {}
    model.lora_config[adapter_name] = cfg
    set_adapter(model, adapter_name)
    return cfg


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> Iterator[nn.Parameter]:
    """The parameters of adapter ``adapter_name``: LoRA A, B, DoRA magnitudes and modules_to_save copies."""
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            yield layer.lora_A[adapter_name].weight
            yield layer.lora_B[adapter_name].weight
            if adapter_name in layer.lora_magnitude_vector:
                yield layer.lora_magnitude_vector[adapter_name]
    for _, mod in saved_modules(model):
        if adapter_name in mod.modules_to_save:
            yield from mod.modules_to_save[adapter_name].parameters()


def apply_lora(model: nn.Module, lora_rank: int = 8, lora_alpha: Optional[float] = None,
               lora_dropout: float = 0.0, lora_target: Union[str, Sequence[str]] = "all",
               use_rslora: bool = False, use_dora: bool = False, adapter_name: str = "default",
               additional_target: Union[str, Sequence[str], None] = None, upcast: bool = True,
               regex: bool = False) -> nn.Module:
    """Wrap ``model``'s linear layers with a new trainable LoRA adapter and freeze everything else.

    Args:
        model: an :class:`llmtune.models.Transformer` (or any module with Hugging Face module names).
        lora_rank: r, the adapters' rank.
        lora_alpha: alpha; None means ``2 * lora_rank`` (LLaMA-Factory's default).
        lora_dropout: dropout probability on the adapter input (0 = none).
        lora_target: ``"all"``/``"all-linear"`` (every linear layer in the decoder layers, not
            ``lm_head``) or module names (comma string or list: ``q_proj,v_proj``).
        use_rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r`` (Kalajdzievski 2023).
        use_dora: weight-decomposed LoRA (Liu et al. 2024): adds the magnitude vector per layer.
        adapter_name: the adapter's name (several adapters can coexist; the new one becomes active).
        additional_target: modules trained in full and saved with the adapter (PEFT ``modules_to_save``),
            e.g. ``embed_tokens,lm_head``.
        upcast: keep the trainable parameters in float32 when the base is float16/bfloat16 (as
            LLaMA-Factory does); the adapters cast their input and output, so the model runs as before.
        regex: ``lora_target`` is a regular expression over whole module paths (PEFT's string
            ``target_modules``), e.g. from :func:`llmtune.models.qwen_vl.vl_lora_target`.

    Returns:
        ``model`` (modified in place): only the new adapter's parameters have ``requires_grad=True``.

    Raises:
        LLMTuneError: unknown or non-linear ``lora_target`` names (the message lists valid ones), unknown
            ``additional_target``, a duplicate adapter name, ``lora_rank < 1``, bad ``lora_dropout``.
    """
    dtype = None
    if upcast:
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        if ref is not None and ref.dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
    inject_lora(model, lora_rank, lora_alpha, lora_dropout, lora_target, use_rslora, use_dora, adapter_name,
                additional_target, dtype=dtype, regex=regex)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, adapter_name):
        p.requires_grad_(True)
    return model


def set_adapter(model: nn.Module, name: Union[str, Sequence[str]]) -> None:
    """Make adapter ``name`` (or a list of names, summed) the active one in every layer.

    Does not change ``requires_grad``. Raises :class:`LLMTuneError` for an unknown name.
    """
    names = [name] if isinstance(name, str) else list(name)
    have = list_adapters(model)
    for n in names:
        if n not in have:
            raise LLMTuneError(f"no adapter named {n!r}; the model has: {', '.join(have) or 'none'}")
    for _, layer in lora_layers(model):
        if layer.merged_adapters and layer.merged_adapters != [n for n in names if n in layer.lora_A]:
            layer.unmerge()
        layer.active_adapters = list(names)
    for _, mod in saved_modules(model):
        mod.active_adapter = next((n for n in names if n in mod.modules_to_save), None)


def get_active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (from the first LoRA layer, or modules_to_save wrapper)."""
    for _, layer in lora_layers(model):
        return list(layer.active_adapters)
    for _, mod in saved_modules(model):
        return [mod.active_adapter] if mod.active_adapter else []
    return []


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: Union[str, Sequence[str]]):
    """Context manager: run with adapter ``name`` active, then restore the previous active adapters."""
    before_layers = {id(l): list(l.active_adapters) for _, l in lora_layers(model)}
    before_saved = {id(m): m.active_adapter for _, m in saved_modules(model)}
    set_adapter(model, name)
    try:
        yield model
    finally:
        for _, layer in lora_layers(model):
            if id(layer) in before_layers:
                layer.active_adapters = before_layers[id(layer)]
        for _, mod in saved_modules(model):
            if id(mod) in before_saved:
                mod.active_adapter = before_saved[id(mod)]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: run the base model (every adapter and modules_to_save copy bypassed).

    With LoRA this is the reference policy of DPO/KTO/PPO without a second model copy. Merged layers are
    unmerged. Restores the previous state on exit.
    """
    mods = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    before = [m.adapters_disabled for m in mods]
    for m in mods:
        m.adapters_disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapters_disabled = b


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; layers left without adapters go back to their plain module.

    Raises :class:`LLMTuneError` for an unknown name.
    """
    if name not in list_adapters(model):
        raise LLMTuneError(f"no adapter named {name!r}; the model has: {', '.join(list_adapters(model)) or 'none'}")
    for path, layer in list(lora_layers(model)):
        layer.delete_adapter(name)
        if not layer.lora_A:
            set_module(model, path, layer.base_layer)
    for path, mod in list(saved_modules(model)):
        if name in mod.modules_to_save:
            del mod.modules_to_save[name]
        if not len(mod.modules_to_save):
            set_module(model, path, mod.original_module)
        elif mod.active_adapter == name:
            mod.active_adapter = next(iter(mod.modules_to_save))
    cfg = getattr(model, "lora_config", None)
    if isinstance(cfg, dict):
        cfg.pop(name, None)


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under PEFT's saved key names.

    Keys: ``base_model.model.<path>.lora_A.weight`` ``(r, in)``, ``...lora_B.weight`` ``(out, r)``,
    ``...lora_magnitude_vector`` ``(out,)`` (DoRA), and ``base_model.model.<path>.<param>`` for
    modules_to_save copies (e.g. ``base_model.model.lm_head.weight``); no adapter name in the keys.
    Values are the live parameters, detached (not copies). Raises :class:`LLMTuneError` for an unknown name.
    """
    if adapter_name not in list_adapters(model):
        raise LLMTuneError(f"no adapter named {adapter_name!r}; the model has: "
                           f"{', '.join(list_adapters(model)) or 'none'}")
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
        if adapter_name in layer.lora_magnitude_vector:
            out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].detach()
    for path, mod in saved_modules(model):
        if adapter_name in mod.modules_to_save:
            for pname, p in mod.modules_to_save[adapter_name].named_parameters():
                out[f"{PEFT_PREFIX}{path}.{pname}"] = p.detach()
    return out


def adapter_targets(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Same keys as :func:`lora_state_dict` (PEFT's names), mapping to the parameters themselves: what
    :func:`llmtune.peft.load_adapter` copies an adapter file into."""
    out: dict[str, nn.Parameter] = {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if adapter_name in layer.lora_magnitude_vector:
                out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
    for path, mod in saved_modules(model):
        if adapter_name in mod.modules_to_save:
            for pname, p in mod.modules_to_save[adapter_name].named_parameters():
                out[f"{PEFT_PREFIX}{path}.{pname}"] = p
    return out
