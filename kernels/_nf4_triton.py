"""Triton kernels for 4-bit (NF4/FP4) weights; imported lazily by ``llmtune.kernels.nf4`` (Triton optional).

Each launcher has the signature of its PyTorch reference in ``nf4.py``. Weight layout: ``W (N, K)``
flattened row-major; value ``i``: byte ``i // 2`` of ``packed`` (high nibble if ``i`` even), scale
``absmax[i // BLOCKSIZE]`` (float32, de-nested), value ``code[q] * absmax``. Indexing is by flat position,
so any ``K`` works (blocks may straddle rows). Accumulation is float32; outputs are cast to the input dtype.

Design: dequantization is an elementwise gather (code book of 16 floats stays in L1; double-quantized
scales expanded in the kernel); the decode kernel (M <= 16) is in ``_nf4_decode``. The tiled kernel and
the input-gradient kernel dequantize (BN, BK) tiles into registers and feed ``tl.dot``; no dequantized
weight is ever written to global memory. On the GPU their tile sizes are autotuned per shape and variant
(``_autotune``: Ampere and Hopper configs, float32 configs for ``IEEE``; key = M bucket, N, K, variant
flags); under the interpreter one fixed config (64-wide tiles) is used. The tile loads, stores, grouped
program order and the LoRA term's loop are the helpers of ``_tiles``, shared with the fused LoRA kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmtune.kernels import _tiles
from llmtune.kernels._autotune import m_bucket, matmul_configs, matmul_key, tuner_kwargs

_tiles.reload_if_stale()  # before the helpers are imported (see there)
from llmtune.kernels._tiles import (  # noqa: E402
    dot, grouped_tile, ieee_products, load_tile, mm_acc, store_tile, upcast_operands)

# Interpreter: the 64-wide tiles these kernels always had (the tests' odd shapes are chosen around them).
_MM_CONFIGS = matmul_configs(interpret_block=64, nf4=True)


@triton.jit
def _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE: tl.constexpr):
    """Dequantized float32 tile ``W[rn, rk]`` of shape (len(rn), len(rk)); zeros outside (N, K)."""
    flat = rn[:, None].to(tl.int64) * K + rk[None, :]
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    shift = ((1 - (flat % 2)) * 4).to(tl.int32)
    q = (byte >> shift) & 0xF
    v = tl.load(code_ptr + q)
    s = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=mask, other=0.0)
    return v * s


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, numel, nabs_ptr, ncode_ptr, noff_ptr,
                    BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, NESTED: tl.constexpr, NBS: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    shift = ((1 - (offs % 2)) * 4).to(tl.int32)
    q = (byte >> shift) & 0xF
    v = tl.load(code_ptr + q)
    blk = offs // BLOCKSIZE
    if NESTED:  # double quantization expanded here: nested_code[u8] * nested_absmax[block // NBS] + offset
        c = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(ncode_ptr + c) * tl.load(nabs_ptr + blk // NBS, mask=mask, other=0.0) + tl.load(noff_ptr)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (v * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequant_compile_ptrs(p: str, nested: bool) -> dict:
    """Pointer dtypes of ``_dequant_kernel`` for output dtype ``p`` ("*bf16"...), with or without double
    quantization (read by ``benchmarks/kernels_compile.py``)."""
    return {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32", "out_ptr": p,
            "nabs_ptr": "*fp32", "ncode_ptr": "*fp32", "noff_ptr": "*fp32"}


@triton.jit
def _nf4_acc(pid, a_ptr, s_am, packed_ptr, absmax_ptr, code_ptr, M, N, K, p_ptr, q_ptr, R, s_pm, s_pr, s_qr, s_qc,
             scaling, BLOCKSIZE: tl.constexpr, W_T: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
             HAS_LORA: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr,
             GROUP_M: tl.constexpr):
    """Program ``pid``'s float32 (BM, BC) output tile of ``A @ W^T`` (``W_T``, the matmul: ``A (M, K)``, the
    columns are W's N rows, the loop runs over K) or ``A @ W`` (the input gradient: ``A (M, N)``, the columns
    are W's K columns, the loop runs over N), with the 4-bit ``W (N, K)`` dequantized tile by tile and ``A``'s
    rows at stride ``s_am``. With ``HAS_LORA`` the rank-r term ``scaling * P[rm, :R] @ Q[:R, rc]`` (float32,
    in chunks of BR) starts the accumulator BEFORE the main loop: one (BM, BC) float32 accumulator instead
    of two (a second one for the rank-r term doubled the registers and spilled). Returns (acc, rm, rc)."""
    if W_T:
        C, L = N, K
    else:
        C, L = K, N
    pid_m, pid_c = grouped_tile(pid, M, C, BM, BC, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_c * BC + tl.arange(0, BC)
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    if HAS_LORA:
        acc = mm_acc(acc, p_ptr, q_ptr, rm, rc, M, C, R, s_pm, s_pr, s_qr, s_qc, UPCAST, IEEE, BR) * scaling
    for l0 in range(0, L, BL):
        rl = l0 + tl.arange(0, BL)
        a = load_tile(a_ptr, rm, rl, M, L, s_am, 1, UPCAST)
        if W_T:
            w = tl.trans(_w_tile(packed_ptr, absmax_ptr, code_ptr, rc, rl, N, K, BLOCKSIZE).to(a.dtype))
        else:
            w = _w_tile(packed_ptr, absmax_ptr, code_ptr, rl, rc, N, K, BLOCKSIZE).to(a.dtype)
        acc += dot(a, w, IEEE)
    return acc, rm, rc


@triton.autotune(configs=_MM_CONFIGS, key=matmul_key("HAS_LORA", "HAS_BIAS", "UPCAST", "IEEE", "BR", "BLOCKSIZE"),
                 **tuner_kwargs())
@triton.jit
def _matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_xm, stride_om, M_BUCKET,
                   p_ptr, q_ptr, bias_ptr, R, s_pm, s_pr, s_qr, s_qc, scaling,
                   BLOCKSIZE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_LORA: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr):
    # HAS_LORA (QLoRA): the rank-r term is scaling * (x A^T) B^T, p = x A^T, q = B^T
    acc, rm, rn = _nf4_acc(tl.program_id(0), x_ptr, stride_xm, packed_ptr, absmax_ptr, code_ptr, M, N, K, p_ptr,
                           q_ptr, R, s_pm, s_pr, s_qr, s_qc, scaling, BLOCKSIZE, True, UPCAST, IEEE, HAS_LORA, BR,
                           BM, BN, BK, GROUP_M)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, acc, rm, rn, M, N, stride_om, 1)


@triton.autotune(configs=_MM_CONFIGS, key=matmul_key("HAS_LORA", "UPCAST", "IEEE", "BR", "BLOCKSIZE"),
                 **tuner_kwargs())
@triton.jit
def _grad_input_kernel(g_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_gm, stride_om, M_BUCKET,
                       p_ptr, q_ptr, R, s_pm, s_pr, s_qr, s_qc, scaling,
                       BLOCKSIZE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_LORA: tl.constexpr,
                       BR: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # HAS_LORA (QLoRA): the rank-r term is scaling * (g B) A, p = g B, q = A
    acc, rm, rk = _nf4_acc(tl.program_id(0), g_ptr, stride_gm, packed_ptr, absmax_ptr, code_ptr, M, N, K, p_ptr,
                           q_ptr, R, s_pm, s_pr, s_qr, s_qc, scaling, BLOCKSIZE, False, UPCAST, IEEE, HAS_LORA, BR,
                           BM, BK, BN, GROUP_M)
    store_tile(out_ptr, acc, rm, rk, M, K, stride_om, 1)


def _prep(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor):
    return packed.reshape(-1).contiguous(), absmax.float().contiguous(), code.float().contiguous()


def _nested_args(absmax: torch.Tensor, nested, device):
    """(scales, nested absmax, nested code, offset (1,), nested block size) for a kernel launch."""
    if nested is None:
        a = absmax.reshape(-1).float().contiguous()
        return a, a, a, a, 256
    off = torch.as_tensor(nested.offset, dtype=torch.float32, device=device).reshape(1)
    return (absmax.reshape(-1).contiguous(), nested.absmax.float().contiguous(), nested.code.float().contiguous(),
            off, int(nested.blocksize))


def dequantize_4bit_triton(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, numel: int,
                           blocksize: int, out_dtype: torch.dtype, nested=None) -> torch.Tensor:
    """Triton version of ``dequantize_4bit_ref`` (same arguments and result); with ``nested``
    (``nf4.Nested``) ``absmax`` holds uint8 codes, expanded inside the kernel."""
    packed = packed.reshape(-1).contiguous()
    scales, nabs, ncode, noff, nbs = _nested_args(absmax, nested, packed.device)
    out = torch.empty(numel, dtype=out_dtype, device=packed.device)
    block = 1024
    if numel:
        _dequant_kernel[(triton.cdiv(numel, block),)](packed, scales, code.float().contiguous(), out, numel, nabs,
                                                      ncode, noff, BLOCKSIZE=blocksize, BLOCK=block,
                                                      NESTED=nested is not None, NBS=nbs)
    return out


def matmul_4bit_small_m_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                               out_features: int, blocksize: int, nested=None) -> torch.Tensor:
    """Triton version of ``matmul_4bit_small_m_ref`` for ``M <= 16``: the decode kernel of ``_nf4_decode``
    (split-K, int32 weight loads, scales de-nested in the kernel when ``nested`` is given). A weight it does
    not take (``K % 8 != 0``, blocks straddling rows, blocks over 256) goes to the tiled kernel."""
    from llmtune.kernels import _nf4_decode as D

    if x.shape[0] <= 16 and D.supports(x.shape[1], blocksize, packed):
        return D.decode_triton(x, packed, absmax, code, out_features, blocksize, nested)
    if nested is not None:
        absmax = _expand(absmax, nested)
    return matmul_4bit_tiled_triton(x, packed, absmax, code, out_features, blocksize)


def _expand(absmax: torch.Tensor, nested) -> torch.Tensor:
    from llmtune.kernels.nf4 import expand_absmax

    return expand_absmax(absmax, nested)


def _launch(kernel, a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, cols: int,
            blocksize: int, col_block: str, lora_args: tuple, **consts) -> torch.Tensor:
    """Launch ``kernel`` (``_matmul_kernel``, whose output columns are W's rows, ``col_block="BN"``; or
    ``_grad_input_kernel``, columns = W's columns, ``"BK"``) on ``a (M, L)``: ``(M, cols)`` in ``a.dtype``.
    ``lora_args``: the kernel's arguments from ``p_ptr`` to ``scaling``; a ``None`` pointer is unused (the
    output stands in). ``consts``: its variant flags besides BLOCKSIZE, UPCAST and IEEE."""
    packed, absmax, code = _prep(packed, absmax, code)
    a = a.contiguous()
    m, inner = a.shape
    out = torch.empty(m, cols, dtype=a.dtype, device=a.device)
    if m == 0 or cols == 0:
        return out
    n, k = (cols, inner) if col_block == "BN" else (inner, cols)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(cols, meta[col_block]),)  # noqa: E731
    kernel[grid](a, packed, absmax, code, out, m, n, k, a.stride(0), out.stride(0), m_bucket(m),
                 *(out if t is None else t for t in lora_args),
                 BLOCKSIZE=blocksize, UPCAST=upcast_operands(a), IEEE=ieee_products(a), **consts)
    return out


def matmul_4bit_tiled_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                             out_features: int, blocksize: int) -> torch.Tensor:
    """Triton version of ``matmul_4bit_ref`` (tiles autotuned per (M bucket, N, K) on the GPU, see
    ``_autotune``; 64 x 64 x 64 under the interpreter)."""
    return _launch(_matmul_kernel, x, packed, absmax, code, out_features, blocksize, "BN",
                   (None, None, None, 0, 0, 0, 0, 0, 0.0), HAS_LORA=False, HAS_BIAS=False, BR=16)


def matmul_4bit_grad_input_triton(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                                  code: torch.Tensor, in_features: int, blocksize: int) -> torch.Tensor:
    """Triton version of ``matmul_4bit_grad_input_ref`` (tiles autotuned like the tiled matmul's)."""
    return _launch(_grad_input_kernel, grad_out, packed, absmax, code, in_features, blocksize, "BK",
                   (None, None, 0, 0, 0, 0, 0, 0.0), HAS_LORA=False, BR=16)


# ----------------------------------------------------------------------------------------------------
# QLoRA: the LoRA term fused into the 4-bit matmul and its input gradient (see ``lora.py``)
# ----------------------------------------------------------------------------------------------------

def _rank_block(r: int) -> int:
    """Ranks per step of the LoRA term: 16 for every rank (the term is small; 64-wide steps spilled
    registers on sm_80), so the rank never makes a new kernel variant."""
    return 16


def lora_matmul_4bit_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                            out_features: int, blocksize: int, xa: torch.Tensor, lora_b: torch.Tensor, bias,
                            scaling: float) -> torch.Tensor:
    """``x W^T + scaling * xa B^T (+ bias)`` for a 4-bit ``W (out_features, K)``: ``x (M, K)``,
    ``xa = x A^T (M, r)``, ``lora_b (out_features, r)``, ``bias (out_features,)`` or None, all in
    ``x.dtype``; ``(M, out_features)`` in ``x.dtype``. One tiled kernel (the tiled matmul's, autotuned
    alike) adds the rank-r term to its float32 accumulator before the single store."""
    r = xa.shape[1]
    return _launch(_matmul_kernel, x, packed, absmax, code, out_features, blocksize, "BN",
                   (xa, lora_b, bias.contiguous() if bias is not None else None, r, xa.stride(0), xa.stride(1),
                    lora_b.stride(1), lora_b.stride(0), float(scaling)),
                   HAS_LORA=True, HAS_BIAS=bias is not None, BR=_rank_block(r))


def lora_grad_input_4bit_triton(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                                code: torch.Tensor, in_features: int, blocksize: int, gb: torch.Tensor,
                                lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``grad_out W + scaling * gb A`` for a 4-bit ``W (N, in_features)``: ``grad_out (M, N)``,
    ``gb = grad_out B (M, r)``, ``lora_a (r, in_features)``, all in ``grad_out.dtype``;
    ``(M, in_features)`` in that dtype. The input-gradient kernel with the rank-r term fused."""
    r = gb.shape[1]
    return _launch(_grad_input_kernel, grad_out, packed, absmax, code, in_features, blocksize, "BK",
                   (gb, lora_a, r, gb.stride(0), gb.stride(1), lora_a.stride(0), lora_a.stride(1), float(scaling)),
                   HAS_LORA=True, BR=_rank_block(r))
