"""LoRA fused into the frozen layer's matmul: PyTorch reference and dispatch to the Triton kernel.

``y = x W^T + bias + scaling * (x A^T) B^T`` for a frozen ``W (out, in)`` and trainable ``A (r, in)``,
``B (out, r)``. Unfused, a LoRA layer writes the base output ``x W^T`` (M x out), writes the adapter
output, then reads both back to add them. Here ``xa = x A^T`` (M x r, small) is computed by torch and ONE
tiled Triton matmul accumulates ``x W^T`` over ``in`` and then ``xa B^T`` into the same float32
accumulator (with the bias) before its single store. The input gradient is the same kernel:
``dx = g W + scaling * (g B) A``. The small products (``xa``, ``g B``, the adapter gradients) are torch
matmuls. The QLoRA variant (:func:`lora_linear_4bit`) does the same with a 4-bit (NF4/FP4) ``W``, its
tiles dequantized in registers by the 4-bit kernels of ``_nf4_triton`` (layout: ``nf4.py``).

Source: Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3
(``h = W0 x + B A x`` with the ``alpha / r`` scale of section 4.1; rsLoRA's ``alpha / sqrt(r)`` is just
another ``scaling``). Gradients (``g = dL/dy``, ``(M, out)``): ``dx = g W + s (g B) A``,
``dA = s (g B)^T x``, ``dB = s g^T (x A^T)``, ``dbias = sum_rows g``; ``W`` gets none (frozen).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmtune.kernels.dispatch import use_triton

#: Row counts (tokens) at or below which ``LoraLinear`` keeps its unfused path: decode steps, where the
#: base matmul is a matrix-vector product (cuBLAS / the NF4 decode kernel) and a tiled kernel only pads.
FUSED_MIN_ROWS = 17


def fused_bases() -> tuple[str, ...]:
    """Which base layers :func:`fused_lora_forward` fuses, from ``LLMTUNE_FUSED_LORA``: unset or ``4bit``:
    ``("4bit",)`` (QLoRA: the NF4 tiled kernel runs anyway and carries the rank-r term); ``1``/``all``:
    ``("4bit", "dense")`` (a dense ``nn.Linear`` base too, replacing cuBLAS for ``x W^T``: off by default
    until the GPU check shows the fused kernel beats cuBLAS plus the separate add, docs/performance.md);
    ``0``/``off``: none."""
    value = os.environ.get("LLMTUNE_FUSED_LORA", "4bit").strip().lower()
    if value in ("0", "off", "false", "no"):
        return ()
    if value in ("1", "all", "on", "true", "yes", "dense"):
        return ("4bit", "dense")
    return ("4bit",)


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Reference ``x W^T (+ bias) + scaling * (x A^T) B^T``, differentiable by autograd.

    Shapes: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or None, ``lora_a (r, in)``,
    ``lora_b (out, r)``; all of one float dtype (as ``F.linear`` requires). Returns ``(..., out)``."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scaling


def _adapter_grads(g: torch.Tensor, x2d: torch.Tensor, xa: torch.Tensor, gb: Optional[torch.Tensor], s: float,
                   need_bias: bool, need_a: bool, need_b: bool) -> tuple:
    """``(d bias, d A, d B)`` of ``y = x W^T + b + s (x A^T) B^T`` given ``g = dL/dy (M, out)``, ``x2d (M, in)``,
    ``xa = x A^T (M, r)`` and ``gb = g B (M, r)``; None where not needed (the dense and 4-bit paths share it)."""
    dbias = g.sum(0) if need_bias else None
    da = (gb.t() @ x2d) * s if need_a else None
    db = (g.t() @ xa) * s if need_b else None
    return dbias, da, db


class _LoraLinearFunction(torch.autograd.Function):
    """Autograd function around the fused kernel; saves ``x`` and ``xa = x A^T`` (not the output)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):  # noqa: D401
        from llmtune.kernels import _fused_triton as T

        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        xa = x2d @ lora_a.t()
        y = T.lora_mm_triton(x2d, weight.t(), xa, lora_b.t(), bias, scaling)
        ctx.save_for_backward(x2d, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from llmtune.kernels import _fused_triton as T

        x2d, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype)
        need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        gb = g @ lora_b if (need_x or need_a) else None  # (M, r)
        dx = T.lora_mm_triton(g, weight, gb, lora_a, None, s, backward=True).view(ctx.shape) if need_x else None
        dbias, da, db = _adapter_grads(g, x2d, xa, gb, s, need_bias, need_a, need_b)
        return dx, None, dbias, da, db, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``x W^T (+ bias) + scaling * (x A^T) B^T`` with the frozen ``W``'s matmul and the LoRA term fused.

    Args:
        x: ``(..., in)``; weight: ``(out, in)``, frozen (no gradient is computed for it);
        bias: ``(out,)`` or None; lora_a: ``(r, in)``; lora_b: ``(out, r)``; scaling: a float
        (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA). All tensors of one float dtype.
    Returns ``(..., out)`` in ``x.dtype``; gradients reach ``x``, ``bias``, ``lora_a``, ``lora_b``.

    Triton on CUDA (and with ``LLMTUNE_FORCE_TRITON=1``), float32 accumulation; :func:`lora_linear_ref`
    elsewhere, and also when ``weight`` requires a gradient or the dtypes/devices differ.
    Raises ValueError when the shapes do not chain (``x (..., in)``, ``A (r, in)``, ``B (out, r)``,
    ``W (out, in)``)."""
    if (weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2 or x.shape[-1] != weight.shape[1]
            or lora_a.shape[1] != weight.shape[1] or lora_b.shape != (weight.shape[0], lora_a.shape[0])
            or (bias is not None and bias.shape != (weight.shape[0],))):
        raise ValueError(f"lora_linear: shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    tensors = [t for t in (x, weight, bias, lora_a, lora_b) if t is not None]
    same = all(t.dtype == x.dtype and t.device == x.device for t in tensors)
    if same and x.is_floating_point() and not weight.requires_grad and use_triton(x):
        return _LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling))
    return lora_linear_ref(x, weight, bias, lora_a, lora_b, scaling)


def lora_linear_4bit_ref(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         out_features: int, blocksize: int, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Reference of :func:`lora_linear_4bit`: dequantize ``W`` to ``x.dtype``, then :func:`lora_linear_ref`."""
    from llmtune.kernels.nf4 import dequantize_4bit_ref

    k = x.shape[-1]
    w = dequantize_4bit_ref(packed, absmax, code, out_features * k, blocksize, x.dtype).view(out_features, k)
    return lora_linear_ref(x, w, bias, lora_a, lora_b, scaling)


class _LoraLinear4bitFunction(torch.autograd.Function):
    """QLoRA twin of :class:`_LoraLinearFunction`: ``W`` is 4-bit (packed, absmax, code); saves ``x``, ``xa``."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, out_features, blocksize, bias, lora_a, lora_b, scaling):  # noqa: D401
        from llmtune.kernels import _nf4_triton as Q

        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        xa = x2d @ lora_a.t()
        y = Q.lora_matmul_4bit_triton(x2d, packed, absmax, code, out_features, blocksize, xa, lora_b, bias, scaling)
        ctx.save_for_backward(x2d, xa, packed, absmax, code, lora_a, lora_b)
        ctx.scaling, ctx.shape, ctx.blocksize = scaling, shape, blocksize
        return y.view(*shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        from llmtune.kernels import _nf4_triton as Q

        x2d, xa, packed, absmax, code, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype)
        need_x = ctx.needs_input_grad[0]
        need_bias, need_a, need_b = ctx.needs_input_grad[6:9]
        gb = g @ lora_b if (need_x or need_a) else None
        dx = None
        if need_x:
            dx = Q.lora_grad_input_4bit_triton(g, packed, absmax, code, x2d.shape[1], ctx.blocksize, gb, lora_a,
                                               s).view(ctx.shape)
        dbias, da, db = _adapter_grads(g, x2d, xa, gb, s, need_bias, need_a, need_b)
        return dx, None, None, None, None, None, dbias, da, db, None


def lora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     out_features: int, blocksize: int, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """QLoRA: ``x W^T (+ bias) + scaling * (x A^T) B^T`` with ``W (out_features, in)`` stored in 4 bits.

    Args:
        x: ``(..., in)``; packed: uint8 ``(ceil(out*in/2),)``; absmax: float32 ``(nblocks,)`` (de-nested);
        code: float32 ``(16,)``; out_features, blocksize: ints (layout of ``llmtune.kernels.nf4``);
        bias ``(out,)`` or None; lora_a ``(r, in)``; lora_b ``(out, r)``: ``x``, bias and adapters of one
        float dtype (the 4-bit weight is dequantized to it); scaling: float.
    Returns ``(..., out_features)`` in ``x.dtype``; gradients reach ``x``, ``bias``, ``lora_a``, ``lora_b``.

    Triton on CUDA (the 4-bit tiled matmul and input-gradient kernels with the rank-r term fused, W
    dequantized tile by tile in registers, float32 accumulation); :func:`lora_linear_4bit_ref` elsewhere or
    when dtypes/devices differ. Raises ValueError when the shapes do not chain."""
    k = x.shape[-1]
    if (lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != k
            or lora_b.shape != (out_features, lora_a.shape[0]) or packed.numel() * 2 < out_features * k
            or (bias is not None and bias.shape != (out_features,))):
        raise ValueError(f"lora_linear_4bit: shapes do not chain: x {tuple(x.shape)}, out_features {out_features}, "
                         f"packed {tuple(packed.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    tensors = [t for t in (x, bias, lora_a, lora_b) if t is not None]
    same = all(t.dtype == x.dtype and t.device == x.device for t in tensors) and packed.device == x.device
    if same and x.is_floating_point() and use_triton(x):
        return _LoraLinear4bitFunction.apply(x, packed, absmax, code, int(out_features), int(blocksize), bias,
                                             lora_a, lora_b, float(scaling))
    return lora_linear_4bit_ref(x, packed, absmax, code, out_features, blocksize, bias, lora_a, lora_b, scaling)


def _tiled_measured_faster(x: torch.Tensor, base: nn.Module) -> bool:
    """False only when the NF4 path table is measured (``llmtune.kernels.nf4.training_path``) and says
    dequantize-then-cuBLAS beats the tiled kernel for this layer's forward: the fused QLoRA kernel is the
    tiled kernel, so the unfused path (``Linear4bit``: dequantize + cuBLAS, then the adapter) runs instead.
    With the shipped, unmeasured table the fused kernel keeps running."""
    from llmtune.kernels import nf4

    if not nf4.load_path_table().get("measured"):
        return True
    m = x.numel() // x.shape[-1]
    return nf4.training_path(m, base.out_features, base.in_features, "forward") == "tiled"


def fused_lora_forward(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The output of ``LoraLinear`` ``layer`` on ``x`` through :func:`lora_linear`, or None when the fused
    path does not apply (the caller then runs its usual code).

    It applies when the kernel would run in Triton (``use_triton(x)``: CUDA, or forced) and: ``x`` has
    more than 16 rows (tokens; decode steps keep the unfused path); adapters are enabled and none is
    merged; exactly one active adapter exists and it is not DoRA; its dropout is ``nn.Identity``, has
    ``p == 0`` or is in eval mode; the base layer is an ``nn.Linear`` with a frozen weight, or a
    ``llmtune.quant.Linear4bit`` (QLoRA, :func:`lora_linear_4bit`). Dtypes: under autocast every operand
    is cast to the autocast dtype (as ``F.linear`` would; a 4-bit base needs its ``compute_dtype`` to be
    that dtype) and the result has that dtype (4-bit base: ``x``'s dtype, as ``Linear4bit`` returns);
    without autocast ``x``, the base's dtype and the adapter must share one dtype (else None: the unfused
    path casts between them). Never inside ``torch.compile`` (the compiled layer keeps the unfused code,
    whose add inductor fuses). Which bases: :func:`fused_bases` (default: 4-bit only). A 4-bit base is not
    fused where the measured NF4 path table prefers dequantize-then-cuBLAS (:func:`_tiled_measured_faster`)."""
    if not use_triton(x) or layer.adapters_disabled or layer.merged_adapters or not x.is_floating_point():
        return None
    if torch.compiler.is_compiling():  # inside torch.compile (torch_compile: true) inductor fuses the add itself
        return None
    if x.numel() < FUSED_MIN_ROWS * x.shape[-1]:
        return None
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(names) != 1 or layer.use_dora[names[0]]:
        return None
    name = names[0]
    dropout = layer.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or getattr(dropout, "p", 1.0) == 0 or not dropout.training):
        return None
    base = layer.base_layer
    q4 = sys.modules.get("llmtune.quant.linear4bit")  # loaded whenever a Linear4bit exists
    quant = q4 is not None and type(base) is q4.Linear4bit
    if not quant and (type(base) is not nn.Linear or base.weight.requires_grad):
        return None
    if ("4bit" if quant else "dense") not in fused_bases():
        return None
    bias = base.bias
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
    if quant:
        if base.compute_dtype != dtype or not _tiled_measured_faster(x, base):
            return None
        w = None
    else:
        w = base.weight
    ops = [t for t in (w, a, b, bias) if t is not None]
    if not autocast and not all(t.dtype == dtype for t in ops):
        return None
    cast = [None if t is None else t.to(dtype) for t in (x, w, a, b, bias)]
    xc, w, a, b, bias = cast
    s = layer.scaling[name]
    with torch.autocast(dev, enabled=False):
        if quant:
            y = lora_linear_4bit(xc, base.weight, base.absmax_float(), base.quant_map, base.out_features,
                                 base.blocksize, bias, a, b, s)
            return y.to(x.dtype)
        return lora_linear(xc, w, bias, a, b, s)
