"""RMSNorm forward and backward: PyTorch reference and dispatch to the Triton kernel (``_fused_triton``).

``y = weight * cast(x / sqrt(mean(x**2, -1) + eps))``: normalised in float32, rounded to the input dtype,
then multiplied by the weight (Hugging Face's LlamaRMSNorm order), so the result has dtype
``promote(x.dtype, weight.dtype)``. Any leading shape ``(..., D)``: the decoder's ``(B, T, hidden)`` and
Qwen3's per-head q/k norm ``(B, T, heads, head_dim)`` alike.

Source: Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization", eq. 4. Gradient (with
``xhat = x * rstd``, ``dn = dy * weight``): ``dx = rstd * (dn - xhat * mean(dn * xhat, -1))``,
``dweight = sum over rows of dy * xhat``.
"""

from __future__ import annotations

import torch

from llmtune.kernels.dispatch import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Reference RMSNorm: ``x (..., D)`` any float dtype, ``weight (D,)`` -> ``(..., D)`` in
    ``promote(x.dtype, weight.dtype)``; differentiable by autograd."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class _RMSNormFunction(torch.autograd.Function):
    """Autograd function around the Triton kernels: saves ``x`` and the float32 ``rstd (M,)`` only."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: D401
        from llmtune.kernels import _fused_triton as T

        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, rstd = T.rms_norm_fwd_triton(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from llmtune.kernels import _fused_triton as T

        x2d, weight, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        dx, dw = T.rms_norm_bwd_triton(dy.reshape(-1, x2d.shape[-1]), x2d, weight, rstd, need_dw)
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x (..., D)`` with ``weight (D,)``: the Triton kernel on CUDA (forward and backward),
    :func:`rms_norm_ref` elsewhere (see ``llmtune.kernels.dispatch``). Output dtype
    ``promote(x.dtype, weight.dtype)``, shape of ``x``. Raises ValueError when ``weight`` is not ``(D,)``."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if use_triton(x):
        return _RMSNormFunction.apply(x, weight, float(eps))
    return rms_norm_ref(x, weight, eps)
