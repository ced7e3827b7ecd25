"""LoRA, rsLoRA and DoRA layers, and the functions that put them into (and take them out of) a model.

Module layout and parameter names are PEFT's, so the state-dict keys of a wrapped model and of a saved
adapter are the ones PEFT reads and writes:

* a wrapped linear layer ``<path>`` becomes :class:`LoraLinear` with the original layer at
  ``<path>.base_layer`` and, per adapter ``name``, ``<path>.lora_A.<name>`` (``nn.Linear(in, r)``),
  ``<path>.lora_B.<name>`` (``nn.Linear(r, out)``) and, for DoRA, ``<path>.lora_magnitude_vector.<name>``
  (a ``(out,)`` parameter);
* a module trained in full (``additional_target``, PEFT's ``modules_to_save``) becomes
  :class:`ModulesToSave` holding ``<path>.original_module`` and the trained copy
  ``<path>.modules_to_save.<name>``.

Sources:
    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. (3):
    ``h = W0 x + (alpha / r) * B A x``, A random (here Kaiming-uniform with a = sqrt(5), as PEFT does),
    B zero, so the wrapped model starts equal to the base model.
    Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA):
    scale ``alpha / sqrt(r)``.
    Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. (5):
    ``W' = m * (W0 + s B A) / ||W0 + s B A||_c`` with the norm taken per output row (PEFT's layout,
    ``(out, in)`` weights) and, as in section 4.3 of the paper and in PEFT, the norm detached from the
    gradient graph.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from llmtune.errors import LLMTuneError, nearest, notice

#: PEFT's prefix of every key in an adapter file of a causal LM (``PeftModelForCausalLM.base_model.model``).
PEFT_PREFIX = "base_model.model."

_LAYER_RE = re.compile(r"(^|\.)layers\.\d+\.")


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for quantized linear layers (anything with ``in_features``,
    ``out_features`` and ``dequantize()``, such as :class:`llmtune.quant.Linear4bit`)."""
    if isinstance(module, (LoraLinear, ModulesToSave)):
        return False
    if isinstance(module, nn.Linear):
        return True
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and callable(getattr(module, "dequantize", None)))


def is_quantized(module: nn.Module) -> bool:
    """True when ``module`` is a quantized linear layer (has ``dequantize()`` and is not ``nn.Linear``)."""
    return not isinstance(module, nn.Linear) and callable(getattr(module, "dequantize", None))


def base_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight ``(out_features, in_features)`` of a linear-like module.

    ``nn.Linear``: its ``weight`` (the parameter itself, not a copy). Quantized layers:
    ``module.dequantize()`` (a new tensor in the layer's compute dtype).
    """
    if is_quantized(module):
        return module.dequantize()
    return module.weight


def _as_names(value: Union[str, Sequence[str], None]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (empty entries dropped)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if v and v.strip()]


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


# ---------------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------------
class LoraLinear(nn.Module):
    """A linear layer plus named low-rank adapters: ``y = base(x) + sum_active s * B(A(dropout(x)))``.

    Args:
        base_layer: ``nn.Linear`` or a quantized linear layer (``in_features``, ``out_features``,
            ``bias``, ``forward(x)``, ``dequantize() -> (out, in)``), kept as ``self.base_layer``.

    Inputs ``x`` of shape ``(..., in_features)`` in any float dtype; the adapter path runs in the
    adapters' dtype (``x`` is cast to it) and its result is cast back to the base output's dtype, so
    float32 adapters work on a bfloat16 base. Output ``(..., out_features)`` in the base output's dtype.
    The merged weight is never materialised in ``forward``.

    Attributes (per adapter name): ``r``, ``lora_alpha``, ``scaling`` (alpha/r, or alpha/sqrt(r) with
    rsLoRA), ``use_dora``; ``active_adapters`` (list of names), ``adapters_disabled`` (bool),
    ``merged_adapters`` (names merged into ``base_layer.weight`` in place).

    Attribute access that is not found here falls through to ``base_layer`` (``bias``, ...). ``weight``
    is :meth:`effective_weight` (base plus active adapters, differentiable), so code that projects with
    ``F.linear(h, module.weight)`` (chunked losses on ``lm_head``) still sees the adapters; the base
    weight itself is ``base_layer.weight``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"LoraLinear wraps a linear layer, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.adapters_disabled = False
        self.merged_adapters: list[str] = []
        self._dora_merge_norms: dict[str, torch.Tensor] = {}
        self.train(base_layer.training)  # new adapters follow the model's train/eval mode

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer applies now: ``(out, in)`` (see :meth:`effective_weight`)."""
        return self.effective_weight()

    def effective_weight(self) -> torch.Tensor:
        """Dense ``(out, in)`` weight equal to what ``forward`` applies, differentiable w.r.t. the adapters.

        The base weight (``dequantize()`` for a quantized base) when adapters are disabled, merged or
        absent; else ``W0 + sum s B A`` (DoRA: rows scaled by ``m / ||W0 + s B A||`` with the norm detached)
        in the adapters' dtype. Materialises one weight-sized tensor: meant for ``lm_head``-style use.
        """
        w0 = base_weight(self.base_layer)
        names = [n for n in self.active_adapters if n in self.lora_A]
        if self.adapters_disabled or self.merged_adapters or not names:
            return w0
        dtype = self.lora_A[names[0]].weight.dtype
        w0 = w0.to(dtype)
        w = w0
        for name in names:
            delta = self.delta_weight(name)
            if self.use_dora[name]:
                norm = self._weight_norm(w0, delta.detach()).detach()
                w = w + (self.lora_magnitude_vector[name] / norm - 1)[:, None] * w0 \
                    + (self.lora_magnitude_vector[name] / norm)[:, None] * delta
            else:
                w = w + delta
        return w

    # -- adapters ---------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, use_dora: bool = False,
                     dtype: Optional[torch.dtype] = None) -> None:
        """Add adapter ``adapter_name``: A ``(r, in)`` Kaiming-uniform(a=sqrt(5)), B ``(out, r)`` zero.

        ``dtype``: the adapter parameters' dtype (default: the base weight's float dtype, float32 for a
        quantized base). DoRA's magnitude starts as the row norms ``||W0||`` (so the layer starts equal
        to the base). Raises :class:`LLMTuneError` for ``r < 1`` or a name already present.
        """
        if int(r) < 1:
            raise LLMTuneError(f"lora_rank must be a positive integer, got {r}")
        if adapter_name in self.lora_A:
            raise LLMTuneError(f"adapter {adapter_name!r} already exists; pick another adapter_name or "
                               "delete_adapter() it first")
        w = base_weight(self.base_layer)
        if dtype is None:
            dtype = w.dtype if (w.is_floating_point() and not is_quantized(self.base_layer)) else torch.float32
        dev = w.device
        a = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[adapter_name] = a
        self.lora_B[adapter_name] = b
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        for mod in (a, b, self.lora_dropout[adapter_name]):
            mod.train(self.training)
        self.r[adapter_name] = int(r)
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_dora[adapter_name] = bool(use_dora)
        if use_dora:
            with torch.no_grad():
                norm = self._weight_norm(w.to(dtype), self.delta_weight(adapter_name, dtype=dtype))
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.to(dtype))
        if adapter_name not in self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (unmerging it first if merged)."""
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if adapter_name in d:
                del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora):
            d.pop(adapter_name, None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # -- math -------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``s * B @ A``: ``(out, in)`` in ``dtype`` (default: the adapter's dtype)."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        dtype = dtype or a.dtype
        return (b.to(dtype) @ a.to(dtype)) * self.scaling[adapter_name]

    @staticmethod
    def _weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Row-wise L2 norm ``||W + dW||`` ``(out,)`` (DoRA's column norm in the paper's ``(in, out)`` layout)."""
        return torch.linalg.norm(weight + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapters_disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x)
        result = self.base_layer(x)
        if self.merged_adapters:
            return result
        base_result = result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            # under autocast the linear layers cast x themselves: x -> float32 -> bf16 would be two copies
            # that give back x exactly, so keep x as it is
            xl = x if torch.is_autocast_enabled(x.device.type) else x.to(lora_a.weight.dtype)
            s = self.scaling[name]
            if not self.use_dora[name]:
                result = result + (lora_b(lora_a(dropout(xl))) * s).to(result.dtype)
            else:
                result = result + self._dora_extra(name, xl, base_result).to(result.dtype)
        return result

    def _dora_extra(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """DoRA output minus the base output: ``(m/||W0+sBA|| - 1) * W0 x' + m/||W0+sBA|| * s B A x'``.

        ``x'`` = dropout(x); ``||.||`` per output row, computed with B A detached and then detached
        itself (Liu et al. 2024, section 4.3). The base layer's bias is not scaled.
        """
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        s = self.scaling[name]
        w = base_weight(self.base_layer).to(x.dtype)
        lora_w = (lora_b.weight @ lora_a.weight).detach().to(x.dtype)
        norm = self._weight_norm(w, s * lora_w).detach()
        factor = (self.lora_magnitude_vector[name] / norm).to(x.dtype)
        xd = dropout(x)
        if isinstance(dropout, nn.Identity):
            base_out = base_result.to(x.dtype)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base_out = base_out - bias.to(x.dtype)
        else:
            base_out = F.linear(xd, w)
        return (factor - 1) * base_out + factor * (lora_b(lora_a(xd)) * s)

    # -- merging ----------------------------------------------------------------------------------
    def merged_weight(self, adapter_names: Optional[Iterable[str]] = None) -> torch.Tensor:
        """The dense weight with adapters merged: ``(out, in)`` in the base (compute) dtype, a new tensor.

        Computed in float32 from the unmerged base weight: LoRA ``W0 + s B A``; DoRA
        ``m / ||W0 + s B A|| * (W + s B A)`` (rows scaled; several adapters applied in turn as PEFT does).
        Works for quantized bases too (from ``dequantize()``); this is how export merges into a 4-bit base.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        w_base = base_weight(self.base_layer)
        out_dtype = w_base.dtype
        with torch.no_grad():
            w0 = w_base.float()
            for name in reversed(self.merged_adapters):  # start from the unmerged weight
                w0 = self._unmerge_one(w0, name)
            w = self._add_adapter(w0.clone(), w0, names)
        return w.to(out_dtype)

    def _add_adapter(self, w: torch.Tensor, w0: torch.Tensor, names: list[str],
                     on_merged: Optional[Callable[[str, Optional[torch.Tensor]], None]] = None) -> torch.Tensor:
        """``w`` (float32, (out, in)) with adapters ``names`` applied in order: ``w + delta`` for LoRA,
        ``m / ||w0 + delta|| * (w + delta)`` for DoRA (``w0`` the unmerged base, Liu et al. 2024 eq. 5).
        ``on_merged(name, dora_norm_or_None)`` is called after each adapter."""
        for name in names:
            if name not in self.lora_A:
                raise LLMTuneError(f"no adapter named {name!r} (have: {', '.join(self.lora_A) or 'none'})")
            delta = self.delta_weight(name, dtype=torch.float32)
            norm = None
            if self.use_dora[name]:
                norm = self._weight_norm(w0, delta)
                w = (self.lora_magnitude_vector[name].float() / norm)[:, None] * (w + delta)
            else:
                w = w + delta
            if on_merged is not None:
                on_merged(name, norm)
        return w

    def _unmerge_one(self, w: torch.Tensor, name: str) -> torch.Tensor:
        delta = self.delta_weight(name, dtype=torch.float32)
        if self.use_dora[name]:
            factor = self.lora_magnitude_vector[name].float() / self._dora_merge_norms[name]
            return w / factor[:, None] - delta
        return w - delta

    def merge(self, adapter_names: Optional[Iterable[str]] = None) -> None:
        """Merge adapters (default: the active ones) into ``base_layer.weight`` in place.

        Forward then runs the base layer alone. Undo with :meth:`unmerge` (equal within float
        rounding). Raises :class:`LLMTuneError` for a quantized base (use :meth:`merged_weight`).
        """
        if is_quantized(self.base_layer):
            raise LLMTuneError("cannot merge a LoRA adapter in place into a quantized (4-bit) layer; load the "
                               "base model without quantization_bit to merge, or use merged_weight() for a "
                               "dense merged copy")
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n not in self.merged_adapters]
        weight = self.base_layer.weight
        with torch.no_grad():
            w0 = weight.float()
            for name in reversed(self.merged_adapters):
                w0 = self._unmerge_one(w0, name)
            def record(name: str, norm: Optional[torch.Tensor]) -> None:
                if norm is not None:
                    self._dora_merge_norms[name] = norm
                self.merged_adapters.append(name)

            w = self._add_adapter(weight.float(), w0, names, record)
            weight.copy_(w.to(weight.dtype))

    def unmerge(self) -> None:
        """Undo :meth:`merge` (all merged adapters, last merged first)."""
        if not self.merged_adapters:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            w = weight.float()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                w = self._unmerge_one(w, name)
                self._dora_merge_norms.pop(name, None)
            weight.copy_(w.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.r)}"


class ModulesToSave(nn.Module):
    """A module trained in full as part of an adapter (PEFT's ``modules_to_save``, LLaMA-Factory's
    ``additional_target``): the frozen ``original_module`` plus one trainable copy per adapter in
    ``modules_to_save[name]``.

    ``forward(*args)`` runs the active adapter's copy, or the original when adapters are disabled (so a
    LoRA model's reference policy is exact even with ``additional_target``). Floating inputs are cast to
    the copy's dtype and floating outputs back to the original's dtype, so a float32 copy works in a
    bfloat16 model. Attribute access not found here falls through to the active module (``weight``).
    """

    def __init__(self, module: nn.Module, adapter_name: str, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.adapters_disabled = False
        self.add(adapter_name, dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)

    def add(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> None:
        """Add a trainable copy of the original module for ``adapter_name`` (optionally cast to ``dtype``)."""
        new = copy.deepcopy(self.original_module)
        if dtype is not None:
            new.to(dtype)
        self.modules_to_save[adapter_name] = new
        self.active_adapter = adapter_name

    @property
    def active_module(self) -> nn.Module:
        """The module ``forward`` runs now."""
        if self.adapters_disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        mod = self.active_module
        if mod is self.original_module:
            return mod(*args, **kwargs)
        p = next(mod.parameters(), None)
        if p is None:
            return mod(*args, **kwargs)
        out_dtype = next(self.original_module.parameters()).dtype

        def cast_in(t):
            return t.to(p.dtype) if torch.is_tensor(t) and t.is_floating_point() else t

        out = mod(*[cast_in(a) for a in args], **{k: cast_in(v) for k, v in kwargs.items()})
        return out.to(out_dtype) if torch.is_tensor(out) and out.is_floating_point() else out


# ---------------------------------------------------------------------------------------------------------
# finding targets
# ---------------------------------------------------------------------------------------------------------
def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Paths of linear-like layers (a :class:`LoraLinear` counts as its base), excluding adapter internals."""
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
            ``lm_head`` nor a value head), or module names as a comma-separated string or a list; a name
            matches a module whose path equals it or ends with ``"." + name`` (PEFT's rule), e.g.
            ``q_proj`` or ``self_attn.q_proj``.
        regex: treat a string ``lora_target`` as a regular expression that must match a whole path
            (PEFT's rule for a string ``target_modules`` in ``adapter_config.json``).

    Returns:
        ``(paths, target_modules)``: the matched paths and the names to record as PEFT's
        ``target_modules`` (leaf names for ``all``).

    Raises:
        LLMTuneError: a name matches no module, or matches a module that is not a linear layer; the
            message lists the valid names.
    """
    linears = _linear_modules(model)
    valid = sorted({p.rsplit(".", 1)[-1] for p in linears})
    if regex and isinstance(lora_target, str):
        paths = [p for p in linears if re.fullmatch(lora_target, p)]
        if not paths:
            raise LLMTuneError(f"target_modules regex {lora_target!r} matches no linear layer; "
                               f"linear layers: {', '.join(valid)}")
        return paths, lora_target  # type: ignore[return-value]
    names = _as_names(lora_target)
    if not names:
        raise LLMTuneError(f"lora_target is empty; use 'all' or names from: {', '.join(valid)}")
    if any(n.lower() in ("all", "all-linear") for n in names):
        paths = [p for p in linears if _LAYER_RE.search(p)]
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
    names = _as_names(additional_target)
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


# ---------------------------------------------------------------------------------------------------------
# applying, switching, freezing
# ---------------------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(path, layer)`` for every :class:`LoraLinear` in ``model``."""
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            yield path, mod


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for path, mod in model.named_modules():
        if isinstance(mod, ModulesToSave):
            yield path, mod


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters present in ``model`` (in the order they were added)."""
    names: list[str] = list(getattr(model, "lora_config", {}) or {})
    for _, layer in lora_layers(model):
        names.extend(n for n in layer.lora_A if n not in names)
    for _, mod in _saved_modules(model):
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
            _set_module(model, path, mod)
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
        _set_module(model, path, ModulesToSave(mod, adapter_name, dtype))
    cfg = dict(r=int(lora_rank), lora_alpha=lora_alpha, lora_dropout=float(lora_dropout),
               target_modules=target_modules, use_rslora=bool(use_rslora), use_dora=bool(use_dora),
               modules_to_save=_as_names(additional_target) or None)
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
    for _, mod in _saved_modules(model):
        if adapter_name in mod.modules_to_save:
            yield from mod.modules_to_save[adapter_name].parameters()


def apply_lora(model: nn.Module, lora_rank: int = 8, lora_alpha: Optional[float] = None,
               lora_dropout: float = 0.0, lora_target: Union[str, Sequence[str]] = "all",
               use_rslora: bool = False, use_dora: bool = False, adapter_name: str = "default",
               additional_target: Union[str, Sequence[str], None] = None, upcast: bool = True) -> nn.Module:
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
                additional_target, dtype=dtype)
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
    for _, mod in _saved_modules(model):
        mod.active_adapter = next((n for n in names if n in mod.modules_to_save), None)


def get_active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (from the first LoRA layer, or modules_to_save wrapper)."""
    for _, layer in lora_layers(model):
        return list(layer.active_adapters)
    for _, mod in _saved_modules(model):
        return [mod.active_adapter] if mod.active_adapter else []
    return []


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: Union[str, Sequence[str]]):
    """Context manager: run with adapter ``name`` active, then restore the previous active adapters."""
    before_layers = {id(l): list(l.active_adapters) for _, l in lora_layers(model)}
    before_saved = {id(m): m.active_adapter for _, m in _saved_modules(model)}
    set_adapter(model, name)
    try:
        yield model
    finally:
        for _, layer in lora_layers(model):
            if id(layer) in before_layers:
                layer.active_adapters = before_layers[id(layer)]
        for _, mod in _saved_modules(model):
            if id(mod) in before_saved:
                mod.active_adapter = before_saved[id(mod)]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: run the base model (every adapter and modules_to_save copy bypassed).

    With LoRA this is the reference policy of DPO/KTO/PPO without a second model copy. Merged layers are
    unmerged. Restores the previous state on exit.
    """
    mods = [m for _, m in lora_layers(model)] + [m for _, m in _saved_modules(model)]
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
            _set_module(model, path, layer.base_layer)
    for path, mod in list(_saved_modules(model)):
        if name in mod.modules_to_save:
            del mod.modules_to_save[name]
        if not len(mod.modules_to_save):
            _set_module(model, path, mod.original_module)
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
    for path, mod in _saved_modules(model):
        if adapter_name in mod.modules_to_save:
            for pname, p in mod.modules_to_save[adapter_name].named_parameters():
                out[f"{PEFT_PREFIX}{path}.{pname}"] = p.detach()
    return out


def _adapter_targets(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Same keys as :func:`lora_state_dict`, mapping to the parameters themselves (for loading)."""
    out: dict[str, nn.Parameter] = {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if adapter_name in layer.lora_magnitude_vector:
                out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
    for path, mod in _saved_modules(model):
        if adapter_name in mod.modules_to_save:
            for pname, p in mod.modules_to_save[adapter_name].named_parameters():
                out[f"{PEFT_PREFIX}{path}.{pname}"] = p
    return out


# ---------------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------------
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
        _set_module(model, path, base)
    for path, mod in list(_saved_modules(model)):
        keep = mod.active_module
        if names is not None:
            hit = [n for n in names if n in mod.modules_to_save]
            keep = mod.modules_to_save[hit[0]] if hit else mod.original_module
        if keep is not mod.original_module:
            dt = next(mod.original_module.parameters()).dtype
            keep.to(dt)
        _set_module(model, path, keep)
    if isinstance(getattr(model, "lora_config", None), dict):
        model.lora_config = {}
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` with ``unload=False`` in every LoRA layer; returns ``model``."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model
