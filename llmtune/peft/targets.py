"""Which modules LoRA wraps (``lora_target``) and which are trained in full (``additional_target``).

Names follow PEFT's matching rule: a name matches a module whose path equals it or ends with ``"." + name``;
``all`` means every linear layer inside the decoder layers. Source: PEFT's ``LoraConfig.target_modules`` /
``modules_to_save`` and LLaMA-Factory's ``lora_target``/``additional_target`` keys.
"""

from __future__ import annotations

import re
from typing import Sequence, Union

from torch import nn

from llmtune.errors import LLMTuneError, nearest
from llmtune.peft.layers import LoraLinear, ModulesToSave, is_linear_like

_LAYER_RE = re.compile(r"(^|\.)layers\.\d+\.")
#: MoE routers (``mlp.gate``, Qwen2-MoE's ``mlp.shared_expert_gate``): left out of ``all``, trained only if named
_ROUTER_RE = re.compile(r"\.mlp\.(gate|shared_expert_gate)$")


def as_names(value: Union[str, Sequence[str], None]) -> list[str]:
    """A comma list as names: ``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (empty entries dropped)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if v and v.strip()]


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of the linear-like layers (a :class:`LoraLinear` counts as its base), excluding adapter internals."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for path, mod in model.named_modules():
        if any(path.startswith(p) for p in skip):
            continue
        if isinstance(mod, LoraLinear):
            found[path] = mod
            skip.append(path + ".")
        elif isinstance(mod, ModulesToSave):
            skip.append(path + ".")
        elif is_linear_like(mod):
            found[path] = mod
    return found


def _match_suffix(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def select_lora_targets(model: nn.Module, lora_target: Union[str, Sequence[str]],
                        regex: bool = False) -> tuple[list[str], list[str]]:
    """Resolve ``lora_target`` to module paths.

    Args:
        model: the model.
        lora_target: ``"all"`` / ``"all-linear"`` (every linear layer inside the decoder layers, so not
            ``lm_head`` nor a value head, nor a MoE router ``mlp.gate`` / ``mlp.shared_expert_gate``), or module names as a comma-separated string or a list; a name
            matches a module whose path equals it or ends with ``"." + name`` (PEFT's rule), e.g.
            ``q_proj`` or ``self_attn.q_proj``.
        regex: treat a string ``lora_target`` as a regular expression that must match a whole path
            (PEFT's rule for a string ``target_modules`` in ``adapter_config.json``); a model with a
            ``peft_module_name(path)`` method (:class:`llmtune.models.qwen_vl.QwenVL`) also matches on that name.

    Returns:
        ``(paths, target_modules)``: the matched paths and the names to record as PEFT's
        ``target_modules`` (leaf names for ``all``).

    Raises:
        LLMTuneError: a name matches no module, or matches a module that is not a linear layer; the
            message lists the valid names.
    """
    linears = linear_modules(model)
    valid = sorted({p.rsplit(".", 1)[-1] for p in linears})
    if regex and isinstance(lora_target, str):
        alias = getattr(model, "peft_module_name", None)   # e.g. QwenVL: transformers' layout of its names
        paths = [p for p in linears if re.fullmatch(lora_target, p)
                 or (alias is not None and re.fullmatch(lora_target, alias(p)))]
        if not paths:
            raise LLMTuneError(f"target_modules regex {lora_target!r} matches no linear layer; "
                               f"linear layers: {', '.join(valid)}")
        return paths, lora_target  # type: ignore[return-value]
    names = as_names(lora_target)
    if not names:
        raise LLMTuneError(f"lora_target is empty; use 'all' or names from: {', '.join(valid)}")
    if any(n.lower() in ("all", "all-linear") for n in names):
        paths = [p for p in linears if _LAYER_RE.search(p) and not _ROUTER_RE.search(p)]
        return paths, sorted({p.rsplit(".", 1)[-1] for p in paths})
    paths: list[str] = []
    all_paths = [p for p, _ in model.named_modules()]
    for name in names:
        hits = [p for p in linears if _match_suffix(p, name)]
        if not hits:
            other = [p for p in all_paths if _match_suffix(p, name)]
            if other:
                kind = type(model.get_submodule(other[0])).__name__
                raise LLMTuneError(
                    f"lora_target: {name!r} is a {kind}, not a linear layer; LoRA wraps linear layers "
                    f"({', '.join(valid)}); to train {name!r} in full, list it in additional_target instead")
            raise LLMTuneError(
                f"lora_target: no module named {name!r} in the model; valid names: {', '.join(valid)} "
                f"(or 'all').{nearest(name, valid)}")
        paths.extend(h for h in hits if h not in paths)
    return paths, sorted(set(names))


def select_modules_to_save(model: nn.Module, additional_target: Union[str, Sequence[str], None]) -> list[str]:
    """Resolve ``additional_target`` (PEFT's ``modules_to_save``) to module paths.

    PEFT's rule: a module whose path ends with the name (plain string suffix, so ``norm`` also selects
    every ``*_layernorm``). Raises :class:`LLMTuneError` for a name matching nothing, or a match that
    contains or lies inside a LoRA-wrapped layer.
    """
    names = as_names(additional_target)
    if not names:
        return []
    paths: list[str] = []
    modules = dict(model.named_modules())
    wrapped = [p for p, m in modules.items() if isinstance(m, (LoraLinear, ModulesToSave))]
    for name in names:
        hits = [p for p in modules if p and p.endswith(name)
                and not any(p.startswith(w + ".") for w in wrapped)]
        hits = [p for p in hits if not any(p.startswith(h + ".") for h in hits)]
        if not hits:
            valid = sorted({p.rsplit(".", 1)[-1] for p in modules if p and not p.rsplit(".", 1)[-1].isdigit()
                            and not any(p.startswith(w + ".") for w in wrapped)})
            raise LLMTuneError(f"additional_target: no module named {name!r} in the model; valid names: "
                               f"{', '.join(valid)}.{nearest(name, valid)}")
        for h in hits:
            if isinstance(modules[h], ModulesToSave):
                paths.append(h)
                continue
            if any(isinstance(m, LoraLinear) for m in modules[h].modules()):
                raise LLMTuneError(f"additional_target: {name!r} ({h}) contains LoRA-wrapped layers; "
                                   "name a module that lora_target does not cover")
            if h not in paths:
                paths.append(h)
    return paths
