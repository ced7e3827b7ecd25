"""LoRA fused into the frozen layer's matmul: PyTorch reference and dispatch to the Triton kernel.

``y = x W^T + bias + scaling * (x A^T) B^T`` for a frozen ``W (out, in)`` and trainable ``A (r, in)``,
``B (out, r)``. Unfused, a LoRA layer writes the base output ``x W^T`` (M x out), writes the adapter
output, then reads both back to add them. Here ``xa = x A^T`` (M x r, small) is computed by torch and ONE
tiled Triton matmul accumulates ``x W^T`` over ``in`` and then ``xa B^T`` into the same float32
accumulator (with the bias) before its single store. The input gradient is the same kernel:
``dx = g W + scaling * (g B) A``. The small products (``xa``, ``g B``, the adapter gradients) are torch
matmuls.

Source: Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3
(``h = W0 x + B A x`` with the ``alpha / r`` scale of section 4.1; rsLoRA's ``alpha / sqrt(r)`` is just
another ``scaling``). Gradients (``g = dL/dy``, ``(M, out)``): ``dx = g W + s (g B) A``,
``dA = s (g B)^T x``, ``dB = s g^T (x A^T)``, ``dbias = sum_rows g``; ``W`` gets none (frozen).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmtune.kernels.dispatch import use_triton


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Reference ``x W^T (+ bias) + scaling * (x A^T) B^T``, differentiable by autograd.

    Shapes: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or None, ``lora_a (r, in)``,
    ``lora_b (out, r)``; all of one float dtype (as ``F.linear`` requires). Returns ``(..., out)``."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scaling


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
        dx = dbias = da = db = None
        gb = g @ lora_b if (need_x or need_a) else None  # (M, r)
        if need_x:
            dx = T.lora_mm_triton(g, weight, gb, lora_a, None, s, backward=True).view(ctx.shape)
        if need_a:
            da = (gb.t() @ x2d) * s
        if need_b:
            db = (g.t() @ xa) * s
        if need_bias:
            dbias = g.sum(0)
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


def fused_lora_forward(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The output of ``LoraLinear`` ``layer`` on ``x`` through :func:`lora_linear`, or None when the fused
    path does not apply (the caller then runs its usual code).

    It applies when the kernel would run in Triton (``use_triton(x)``: CUDA, or forced) and: adapters are
    enabled and none is merged; exactly one active adapter exists and it is not DoRA; its dropout is
    ``nn.Identity``, has ``p == 0`` or is in eval mode; the base layer is an ``nn.Linear`` whose weight is
    frozen. Dtypes: under autocast every operand is cast to the autocast dtype (as ``F.linear`` would)
    and the result has that dtype; without autocast ``x``, the base weight and the adapter must share one
    dtype (else None: the unfused path casts between them)."""
    if not use_triton(x) or layer.adapters_disabled or layer.merged_adapters:
        return None
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(names) != 1 or layer.use_dora[names[0]]:
        return None
    name = names[0]
    dropout = layer.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or getattr(dropout, "p", 1.0) == 0 or not dropout.training):
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad or not x.is_floating_point():
        return None
    w, bias = base.weight, base.bias
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, w, a, b = x.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(dev, enabled=False):
            return lora_linear(x, w, bias, a, b, layer.scaling[name])
    if not all(t.dtype == x.dtype for t in (w, a, b) + (() if bias is None else (bias,))):
        return None
    return lora_linear(x, w, bias, a, b, layer.scaling[name])
