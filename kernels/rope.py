"""Rotary position embedding on q and k: PyTorch reference and dispatch to the Triton kernel.

Rotate-half convention of Hugging Face checkpoints: ``y = x * cos + rotate_half(x) * sin`` with
``rotate_half([x1, x2]) = [-x2, x1]`` on the last dim (halves, not interleaved pairs). Layout as in
Hugging Face attention: ``q (B, Hq, T, D)``, ``k (B, Hk, T, D)`` (any strides, e.g. a transposed view of
the projection output), ``cos``/``sin`` ``(B, T, D)``, ``(1, T, D)`` or ``(T, D)`` (broadcast over heads,
and over the batch when the first dim is 1 or absent).

The Triton kernel reads cos/sin once per (batch, position) for all heads of q and k, computes in float32
and writes each output once. When no gradient is needed (generation), it rotates q and k in place; in
training it writes new tensors (autograd keeps no copy of the inputs: the backward is the transposed
rotation of the output gradient: ``dx1 = cos1 dy1 + sin2 dy2``, ``dx2 = cos2 dy2 - sin1 dy1``).

Source: Su et al., 2021, "RoFormer", eq. 34 (in the rotate-half arrangement used by Hugging Face's
``apply_rotary_pos_emb``).
"""

from __future__ import annotations

import torch

from llmtune.kernels.dispatch import use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _bt(c: torch.Tensor) -> torch.Tensor:
    return c.unsqueeze(0) if c.dim() == 2 else c


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` with cos/sin cast to
    q's dtype and broadcast over heads; shapes and dtypes of ``q`` and ``k``; autograd."""
    cos, sin = _bt(cos).unsqueeze(1).to(q.dtype), _bt(sin).unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _expand(c: torch.Tensor, b: int, t: int, d: int) -> torch.Tensor:
    return _bt(c).expand(b, t, d)


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):  # noqa: D401
        from llmtune.kernels import _fused_triton as T

        b, _, t, d = q.shape
        cos, sin = _expand(cos, b, t, d), _expand(sin, b, t, d)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        T.rope_triton(q, k, cos, sin, q_out, k_out)
        ctx.save_for_backward(cos, sin)
        ctx.meta = (q.shape, k.shape, q.dtype, q.device)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        from llmtune.kernels import _fused_triton as T

        cos, sin = ctx.saved_tensors
        q_shape, k_shape, dtype, device = ctx.meta
        if dq is None:
            dq = torch.zeros(q_shape, dtype=dtype, device=device)
        if dk is None:
            dk = torch.zeros(k_shape, dtype=dtype, device=device)
        dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
        T.rope_triton(dq, dk, cos, sin, dq_in, dk_in, backward=True)
        return dq_in, dk_in, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q (B, Hq, T, D)`` and ``k (B, Hk, T, D)`` (D even) with ``cos``/``sin``
    ``(B|1, T, D)`` or ``(T, D)``: the Triton kernel on CUDA (in place, overwriting q and k, when neither
    requires grad, e.g. in generation),
    :func:`apply_rope_ref` elsewhere. Returns ``(q_rot, k_rot)`` of the shapes and dtypes of q and k.

    Raises ValueError on mismatched shapes or an odd head_dim."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[-1] % 2:
        raise ValueError(f"apply_rope: expected q (B, Hq, T, D) and k (B, Hk, T, D) with D even, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if not (use_triton(q) and q.dtype == k.dtype and not cos.requires_grad and not sin.requires_grad):
        return apply_rope_ref(q, k, cos, sin)
    if q.requires_grad or k.requires_grad:  # autograd may need the inputs' history: new tensors
        return _RoPEFunction.apply(q, k, cos, sin)
    from llmtune.kernels import _fused_triton as T

    b, _, t, d = q.shape
    T.rope_triton(q, k, _expand(cos, b, t, d), _expand(sin, b, t, d), q, k)
    return q, k
