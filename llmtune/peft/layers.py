"""LoRA, rsLoRA and DoRA layers: :class:`LoraLinear` (a linear layer plus named low-rank adapters) and
:class:`ModulesToSave` (a module trained in full beside the original, PEFT's ``modules_to_save``).

Module layout and parameter names are PEFT's (see :mod:`llmtune.peft.lora` for the whole picture):
``<path>.base_layer``, ``<path>.lora_A.<name>`` (``nn.Linear(in, r)``), ``<path>.lora_B.<name>``
(``nn.Linear(r, out)``), ``<path>.lora_magnitude_vector.<name>`` (DoRA, ``(out,)``);
``<path>.original_module`` and ``<path>.modules_to_save.<name>``.

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

import copy
import math
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.kernels.lora import fused_lora_forward
from llmtune.peft.rows import _ROWS, RowAdapters


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


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``model`` by ``new``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _add_lora(result: torch.Tensor, xa: torch.Tensor, lora_b: Union[nn.Linear, torch.Tensor],
              s: Union[float, torch.Tensor]) -> torch.Tensor:
    """``result + (s * xa) @ B^T`` for ``result`` ``(..., out)``, ``xa = A x`` ``(..., r)``, ``B`` ``(out, r)``
    (``lora_b`` an ``nn.Linear`` or its weight); ``s`` a float, or a tensor broadcast against ``xa`` (per-row
    adapters pass their rank mask).

    When the product runs in ``result``'s dtype (autocast on, or adapters in the base dtype) this is one
    ``addmm`` (GEMM with accumulate into a copy of ``result``) with the scale applied to the small ``(..., r)``
    factor: no ``(..., out)`` temporaries for the scaled product and the sum (measured on the CPU, bf16:
    about half the time of ``result + (B(xa) * s)`` forward and backward, docs/performance.md). Otherwise the
    product runs in the adapters' dtype and is cast to ``result``'s dtype, as before.
    """
    dev = result.device.type
    b = lora_b if isinstance(lora_b, torch.Tensor) else lora_b.weight
    if (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == result.dtype) \
            or (b.dtype == result.dtype == xa.dtype):
        out = torch.addmm(result.reshape(-1, result.shape[-1]), (xa * s).reshape(-1, xa.shape[-1]), b.t())
        return out.view(result.shape)
    if isinstance(s, torch.Tensor):
        return result + F.linear(xa * s, b).to(result.dtype)
    return result + (F.linear(xa, b) * s).to(result.dtype)


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

    Inside :func:`llmtune.peft.row_adapters` each batch row runs with its own adapter (the base product once,
    each row's delta from its adapter: :mod:`llmtune.peft.rows`); outside it nothing changes.
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
        self._row_stacks: dict = {}   # per-row adapters: concatenated (A, s*B) per adapter set (llmtune.peft.rows)
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
        self._row_stacks.clear()

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
        self._row_stacks.clear()

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
        """``y = base(x) + sum_active (alpha/r) * dropout(x) A^T B^T`` (LoRA, Hu et al. 2021, eq. 3; DoRA rescales
        by the magnitude vector), x ``[..., in_features]`` -> ``[..., out_features]`` in x's dtype; inside
        :func:`llmtune.peft.row_adapters` each row of the batch takes its own adapter (or none)."""
        rows = _ROWS.get()
        if rows is not None and not self.adapters_disabled:   # inside llmtune.peft.row_adapters: per-row adapters
            return self._forward_rows(x, rows)
        return self._forward_active(x)

    def _forward_active(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with its active adapters (summed) on every row."""
        if self.adapters_disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x)
        fused = fused_lora_forward(self, x)  # one Triton matmul for base + adapter (CUDA), else None
        if fused is not None:
            return fused
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
                result = _add_lora(result, lora_a(dropout(xl)), lora_b, s)
            else:
                result = result + self._dora_extra(name, xl, base_result).to(result.dtype)
        return result

    # -- per-row adapters (llmtune.peft.rows) ------------------------------------------------------
    def _forward_only(self, x: torch.Tensor, name: Optional[str]) -> torch.Tensor:
        """The layer with adapter ``name`` alone (None: the base) on every row: the usual single-adapter code."""
        saved = self.active_adapters
        self.active_adapters = [] if name is None else [name]
        try:
            return self._forward_active(x)
        finally:
            self.active_adapters = saved

    def _forward_rows(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """``x`` ``(rows, ..., in)`` with row ``i``'s own adapter: ``W0 x + B_cat ((A_cat x) * M)`` (see
        :mod:`llmtune.peft.rows`); a batch of one adapter takes :meth:`_forward_only`. Output as ``forward``.

        Raises:
            LLMTuneError: ``x.shape[0]`` differs from the number of row names in a mixed batch.
        """
        if self.merged_adapters:
            self.unmerge()
        if rows.uniform:
            name = rows.names[0]
            if name is None:
                return self._forward_active(x)
            return self._forward_only(x, name if name in self.lora_A else None)
        names, present, single = rows.plan(self.lora_A, self.active_adapters)
        if single:
            return self._forward_only(x, names[0])
        if x.dim() < 2 or x.shape[0] != len(names):
            raise LLMTuneError(f"per-row adapters: {len(names)} row names for an input of shape {tuple(x.shape)} "
                               "(dim 0 must be the rows)")
        if any(self.use_dora[n] for n in present):   # not a low-rank delta: one call per group of rows
            return _per_group(x, names, self._forward_only)
        a_cat, b_cat, spans, total = self._stacked(present)
        result = self.base_layer(x)
        xl = x if torch.is_autocast_enabled(x.device.type) else x.to(a_cat.dtype)
        h = F.linear(xl, a_cat)                                                   # (rows, ..., sum r)
        m = rows.mask(names, spans, total, h.device, h.dtype, h.dim())
        return _add_lora(result, h, b_cat, m)   # the mask in the place of the scale (built into b_cat)

    def _stacked(self, present: list) -> tuple:
        """``(A_cat (sum r, in), B_cat (out, sum r) with each block scaled, {name: (start, stop)}, sum r)`` of
        adapters ``present`` (detached; cached until their tensors change)."""
        key = tuple((n, id(self.lora_A[n].weight), self.lora_A[n].weight._version, self.lora_B[n].weight._version)
                    for n in present)
        hit = self._row_stacks.get(key)
        if hit is None:
            with torch.no_grad():
                a_cat = torch.cat([self.lora_A[n].weight.detach() for n in present])
                b_cat = torch.cat([self.lora_B[n].weight.detach() * self.scaling[n] for n in present], dim=1)
            spans, off = {}, 0
            for n in present:
                spans[n] = (off, off + self.r[n])
                off += self.r[n]
            if len(self._row_stacks) >= 8:
                self._row_stacks.pop(next(iter(self._row_stacks)))
            hit = self._row_stacks[key] = (a_cat, b_cat, spans, off)
        return hit

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
        rows = _ROWS.get()
        if rows is not None and not self.adapters_disabled:   # per-row adapters (llmtune.peft.rows)
            default = self.active_adapter if self.active_adapter in self.modules_to_save else None
            names = [default if n is None else (n if n in self.modules_to_save else None) for n in rows.names]
            if len(set(names)) > 1:
                return _per_group(args[0], names, lambda x, n: self._run(self._module(n), (x,) + args[1:], kwargs))
            return self._run(self._module(names[0]), args, kwargs)
        return self._run(self.active_module, args, kwargs)

    def _module(self, name: Optional[str]) -> nn.Module:
        return self.original_module if name is None else self.modules_to_save[name]

    def _run(self, mod: nn.Module, args: tuple, kwargs: dict):
        """``mod(*args, **kwargs)`` with floating inputs cast to ``mod``'s dtype and outputs to the original's."""
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


def _per_group(x: torch.Tensor, names: list,
               run: Callable[[torch.Tensor, Optional[str]], torch.Tensor]) -> torch.Tensor:
    """``run(x[rows of name], name)`` for each distinct name of ``names`` (one per row of ``x``'s dim 0), the
    outputs put back in row order: per-row adapters for modules that are not a low-rank delta (DoRA,
    modules_to_save)."""
    if x.shape[0] != len(names):
        raise LLMTuneError(f"per-row adapters: {len(names)} row names for an input of shape {tuple(x.shape)} "
                           "(dim 0 must be the rows)")
    out = None
    for name in dict.fromkeys(names):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        y = run(x.index_select(0, idx), name)
        if out is None:
            out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
        out.index_copy_(0, idx, y)
    return out
