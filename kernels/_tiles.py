"""Device helpers of the tiled matmul kernels (fused LoRA in ``_fused_triton``, 4-bit in ``_nf4_triton``).

``@triton.jit`` functions called from the kernels (Triton inlines them, so they cost nothing at run time):
the grouped program order, a masked strided tile load and store, ``tl.dot`` with the float32 mode, and the
``K``-loop ``acc + A @ B`` of two strided operands. Offsets are computed in int64 (a Llama-8B weight has
more than 2^31 elements in some layouts). Plus the two launch-time flags both kernel modules derive from
the operands (:func:`upcast_operands`, :func:`ieee_products`). The kernel modules call
:func:`reload_if_stale` before importing the helpers.
"""

from __future__ import annotations

import importlib
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` on a 1-D grid over an (M, N) output in (BM, BN) tiles, in groups of
    GROUP_M row tiles: consecutive programs share column tiles (and row tiles) while they are still in L2."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def load_tile(ptr, ri, rj, I, J, s_i, s_j, UPCAST: tl.constexpr):
    """Tile ``T[ri, rj]`` (shape (len(ri), len(rj))) of a strided (I, J) tensor at ``ptr`` with strides
    (s_i, s_j); zeros outside (I, J); cast to float32 when ``UPCAST``."""
    t = tl.load(ptr + ri[:, None].to(tl.int64) * s_i + rj[None, :].to(tl.int64) * s_j,
                mask=(ri[:, None] < I) & (rj[None, :] < J), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def store_tile(ptr, acc, ri, rj, I, J, s_i, s_j):
    """Store ``acc`` (float32, (len(ri), len(rj))) at ``T[ri, rj]`` of a strided (I, J) tensor, rounded to
    its dtype; rows/columns outside (I, J) are skipped."""
    tl.store(ptr + ri[:, None].to(tl.int64) * s_i + rj[None, :].to(tl.int64) * s_j,
             acc.to(ptr.dtype.element_ty), mask=(ri[:, None] < I) & (rj[None, :] < J))


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``tl.dot`` in full float32 precision when ``IEEE`` (float32 operands, TF32 not allowed), else default."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def mm_acc(acc, a_ptr, b_ptr, rm, rn, M, N, K, s_am, s_ak, s_bk, s_bn,
           UPCAST: tl.constexpr, IEEE: tl.constexpr, BK: tl.constexpr):
    """``acc + A[rm, :K] @ B[:K, rn]`` in float32, in steps of BK along K: ``A (M, K)`` with strides
    (s_am, s_ak), ``B (K, N)`` with strides (s_bk, s_bn); ``acc`` is (len(rm), len(rn)) float32."""
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = load_tile(a_ptr, rm, rk, M, K, s_am, s_ak, UPCAST)
        b = load_tile(b_ptr, rk, rn, K, N, s_bk, s_bn, UPCAST)
        acc += dot(a, b, IEEE)
    return acc


def upcast_operands(t: torch.Tensor) -> bool:
    """Feed ``tl.dot`` float32 instead of bfloat16 off the GPU: Triton 3.9's interpreter (TRITON_INTERPRET=1)
    returns garbage (~1e10) for bf16 ``tl.dot`` operands (fp16/fp32 are right); on CUDA bf16 stays."""
    return (not t.is_cuda) and t.dtype == torch.bfloat16


def ieee_products(t: torch.Tensor) -> bool:
    """float32 operands on the GPU: full float32 products (as torch's matmul) unless the user allowed TF32."""
    return t.is_cuda and t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _probe():
    pass


def reload_if_stale() -> None:
    """Re-define the helpers when ``TRITON_INTERPRET`` changed since this module was imported: a kernel can
    only call helpers of its own kind (interpreted or compiled), and the kernel tests turn the interpreter
    on (and off) and reload the kernel modules, which call this before importing the helpers."""
    if type(triton.jit(_probe)) is not type(grouped_tile):
        importlib.reload(sys.modules[__name__])
