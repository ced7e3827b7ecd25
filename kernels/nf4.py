"""4-bit (NF4/FP4) kernels: PyTorch references and dispatch to the Triton kernels in ``_nf4_triton``.

Layout (bitsandbytes' 4-bit format, see ``llmtune.quant.nf4``): a weight ``W`` of shape ``(N, K)``
(out_features, in_features) is flattened row-major; value ``i`` has its 4-bit code in byte ``i // 2`` of
``packed`` (high nibble when ``i`` is even, low nibble when odd) and its scale in ``absmax[i // blocksize]``;
``W.flat[i] = code[q_i] * absmax[i // blocksize]``. Blocks may straddle rows (``K % blocksize != 0``),
so every kernel indexes by the flat position and works for any ``K``.

Every kernel here has a PyTorch reference with the same signature (``*_ref``) and a dispatcher of the
plain name: CUDA tensors go to Triton (when it is installed), CPU tensors to the reference. Set
``LLMTUNE_FORCE_TRITON=1`` to send CPU tensors to Triton too (with ``TRITON_INTERPRET=1`` set before the
first kernel call: that is how the tests run the kernels without a GPU). Triton is optional and imported
only when a kernel is first launched.

Absmax here is always the de-nested float32 ``(nblocks,)`` tensor (double quantization is undone by
``QuantState.get_absmax()`` first: it touches 1/64 of the data).
"""

from __future__ import annotations


import torch

from llmtune.kernels.dispatch import triton_available, use_triton  # noqa: F401 (one rule for every kernel)

#: M at or below which :func:`matmul_4bit` uses the matrix-vector (decode) kernel.
SMALL_M = 16

def _tri():
    from llmtune.kernels import _nf4_triton

    return _nf4_triton


# ----------------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------------

def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: byte value -> (code of high nibble, code of low nibble)."""
    c = code.float()
    return torch.stack([c.repeat_interleave(16), c.repeat(16)], dim=1)


def dequantize_4bit_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, numel: int,
                        blocksize: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Reference dequantization: uint8 ``packed (ceil(numel/2),)``, float32 ``absmax (nblocks,)``,
    float32 ``code (16,)`` -> ``(numel,)`` of ``out_dtype`` (computed in float32, rounded once)."""
    vals = _pair_table(code).to(packed.device)[packed.reshape(-1).long()].reshape(-1)
    nblocks = absmax.numel()
    total = nblocks * blocksize
    if vals.numel() < total:
        vals = torch.cat([vals, vals.new_zeros(total - vals.numel())])
    out = vals[:total].view(nblocks, blocksize) * absmax.float().to(vals.device).unsqueeze(1)
    return out.reshape(-1)[:numel].to(out_dtype)


def matmul_4bit_ref(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    out_features: int, blocksize: int) -> torch.Tensor:
    """Reference ``x @ W.T``: ``x (M, K)`` float (bf16/fp16/fp32), ``W (out_features, K)`` 4-bit;
    returns ``(M, out_features)`` in ``x.dtype`` (W dequantized to ``x.dtype``, one matmul)."""
    k = x.shape[-1]
    w = dequantize_4bit_ref(packed, absmax, code, out_features * k, blocksize, x.dtype).view(out_features, k)
    return x @ w.t()


def matmul_4bit_small_m_ref(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                            out_features: int, blocksize: int) -> torch.Tensor:
    """Reference of the decode (small M) kernel: same as :func:`matmul_4bit_ref`."""
    return matmul_4bit_ref(x, packed, absmax, code, out_features, blocksize)


def matmul_4bit_grad_input_ref(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                               code: torch.Tensor, in_features: int, blocksize: int) -> torch.Tensor:
    """Reference input gradient ``grad_out @ W``: ``grad_out (M, N)``, ``W (N, in_features)`` 4-bit;
    returns ``(M, in_features)`` in ``grad_out.dtype``."""
    n = grad_out.shape[-1]
    w = dequantize_4bit_ref(packed, absmax, code, n * in_features, blocksize, grad_out.dtype)
    return grad_out @ w.view(n, in_features)


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------

def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, numel: int,
                    blocksize: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``numel`` values: Triton on CUDA, :func:`dequantize_4bit_ref` on the CPU (same signature)."""
    if use_triton(packed):
        return _tri().dequantize_4bit_triton(packed, absmax, code, numel, blocksize, out_dtype)
    return dequantize_4bit_ref(packed, absmax, code, numel, blocksize, out_dtype)


def matmul_4bit_small_m(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        out_features: int, blocksize: int) -> torch.Tensor:
    """Fused dequantize-and-multiply for small M (decode): one program per (row, N tile) streams the
    packed weight once per row; ``(M, K) -> (M, out_features)``. CPU: the reference."""
    if use_triton(x):
        return _tri().matmul_4bit_small_m_triton(x, packed, absmax, code, out_features, blocksize)
    return matmul_4bit_small_m_ref(x, packed, absmax, code, out_features, blocksize)


def matmul_4bit_tiled(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      out_features: int, blocksize: int) -> torch.Tensor:
    """Tiled fused dequantize-and-matmul (training-sized M): each (BM, BN) program dequantizes its
    (BN, BK) weight tiles in registers and accumulates ``tl.dot`` in float32. CPU: the reference."""
    if use_triton(x):
        return _tri().matmul_4bit_tiled_triton(x, packed, absmax, code, out_features, blocksize)
    return matmul_4bit_ref(x, packed, absmax, code, out_features, blocksize)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                out_features: int, blocksize: int) -> torch.Tensor:
    """``x @ W.T`` for a 4-bit ``W (out_features, K)``; ``x (M, K)`` -> ``(M, out_features)`` in x.dtype.

    Triton: the small-M kernel for ``M <= SMALL_M``, else the tiled kernel. CPU: :func:`matmul_4bit_ref`.
    """
    if use_triton(x):
        if x.shape[0] <= SMALL_M:
            return _tri().matmul_4bit_small_m_triton(x, packed, absmax, code, out_features, blocksize)
        return _tri().matmul_4bit_tiled_triton(x, packed, absmax, code, out_features, blocksize)
    return matmul_4bit_ref(x, packed, absmax, code, out_features, blocksize)


def matmul_4bit_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                           code: torch.Tensor, in_features: int, blocksize: int) -> torch.Tensor:
    """``grad_out @ W`` (the input gradient of ``x @ W.T``): ``(M, N) -> (M, in_features)``.
    Triton on CUDA (tiled, W tiles dequantized in registers), :func:`matmul_4bit_grad_input_ref` on the CPU."""
    if use_triton(grad_out):
        return _tri().matmul_4bit_grad_input_triton(grad_out, packed, absmax, code, in_features, blocksize)
    return matmul_4bit_grad_input_ref(grad_out, packed, absmax, code, in_features, blocksize)
