"""SwiGLU activation ``silu(gate) * up``: PyTorch reference and dispatch to the Triton kernels.

The MLP of Llama/Qwen is ``down(silu(gate(x)) * up(x))``; this fuses the activation and the product (and
their backward) into one pass over ``gate`` and ``up``, so no ``silu(gate)`` tensor is stored.

Source: Shazeer, 2020, "GLU Variants Improve Transformer", eq. 6 (with ``silu(z) = z * sigmoid(z)``,
Elfwing et al., 2018). Gradients (``s = sigmoid(gate)``): ``d up = dy * gate * s``,
``d gate = dy * up * s * (1 + gate * (1 - s))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtune.kernels.dispatch import use_triton


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Reference ``silu(gate) * up``: two tensors of one shape ``(..., I)`` -> ``(..., I)``, autograd."""
    return F.silu(gate) * up


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # noqa: D401
        from llmtune.kernels import _fused_triton as T

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return T.swiglu_fwd_triton(gate, up)

    @staticmethod
    def backward(ctx, dy):
        from llmtune.kernels import _fused_triton as T

        gate, up = ctx.saved_tensors
        return T.swiglu_bwd_triton(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: the Triton kernel on CUDA (forward and backward), :func:`swiglu_ref` elsewhere.

    ``gate`` and ``up``: same shape ``(..., I)``; when dtypes or shapes differ (broadcasting, autocast
    mixtures) the reference runs. Output: the shape and dtype of ``gate``."""
    if use_triton(gate) and gate.shape == up.shape and gate.dtype == up.dtype and gate.device == up.device:
        return _SwiGLUFunction.apply(gate, up)
    return swiglu_ref(gate, up)
