"""Triton kernels for 4-bit (NF4/FP4) weights; imported lazily by ``llmtune.kernels.nf4`` (Triton optional).

Each launcher has the signature of its PyTorch reference in ``nf4.py``. Weight layout: ``W (N, K)``
flattened row-major; value ``i``: byte ``i // 2`` of ``packed`` (high nibble if ``i`` even), scale
``absmax[i // BLOCKSIZE]`` (float32, de-nested), value ``code[q] * absmax``. Indexing is by flat position,
so any ``K`` works (blocks may straddle rows). Accumulation is float32; outputs are cast to the input dtype.

Design: dequantization is an elementwise gather (code book of 16 floats stays in L1); the decode kernel
(M <= 16) runs one program per (row, N tile) and reduces ``w * x`` along K in registers, reading the
packed weight (0.5 byte/param) instead of a dense bf16 copy (2 bytes/param): it is memory bound, so the
4x fewer bytes are the speed-up. The tiled kernel and the input-gradient kernel dequantize (BN, BK) tiles
into registers and feed ``tl.dot``; no dequantized weight is ever written to global memory.
On the GPU the tile sizes are autotuned per shape (``_autotune``: Ampere and Hopper configs, key = M bucket,
N, K); under the interpreter one fixed config (64-wide tiles; decode 64 x 128) is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmtune.kernels._autotune import m_bucket, matmul_configs, matvec_configs, tuner_kwargs

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
def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, numel,
                    BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    shift = ((1 - (offs % 2)) * 4).to(tl.int32)
    q = (byte >> shift) & 0xF
    v = tl.load(code_ptr + q)
    s = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (v * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` on a 1-D grid, in groups of GROUP_M row tiles: consecutive
    programs share weight tiles (and row tiles) while they are still in L2."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.autotune(configs=matvec_configs(), key=["N", "K"], **tuner_kwargs(prune=False))
@triton.jit
def _matvec_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, N, K, stride_xm, stride_om,
                   BLOCKSIZE: tl.constexpr, ROW_BLOCKS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BN,), dtype=tl.float32)
    if ROW_BLOCKS and BK % BLOCKSIZE == 0:
        # K % BLOCKSIZE == 0 (every real projection): each quantization block lies inside one row, so the
        # tile is (BN, NB blocks, BLOCKSIZE / 2 bytes): each packed byte is loaded once (contiguous runs,
        # vectorised) and gives two codes, the high nibble for the even column and the low one for the
        # odd column; code * x is summed within each block first and each block sum scaled once (one
        # absmax load and multiply per block instead of per element)
        NB: tl.constexpr = BK // BLOCKSIZE
        HALF: tl.constexpr = BLOCKSIZE // 2
        rb = tl.arange(0, NB)
        rh = tl.arange(0, HALF)
        for k0 in range(0, K, BK):
            ke = k0 + rb[:, None] * BLOCKSIZE + 2 * rh[None, :]  # (NB, HALF) even column indices
            km = ke < K
            xe = tl.load(x_ptr + m * stride_xm + ke, mask=km, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + m * stride_xm + ke + 1, mask=km, other=0.0).to(tl.float32)
            mask = (rn[:, None, None] < N) & km[None, :, :]
            byte = tl.load(packed_ptr + rn[:, None, None].to(tl.int64) * (K // 2) + ke[None, :, :] // 2,
                           mask=mask, other=0).to(tl.int32)
            hi = tl.load(code_ptr + (byte >> 4))
            lo = tl.load(code_ptr + (byte & 0xF))
            part = tl.sum(hi * xe[None, :, :] + lo * xo[None, :, :], axis=2)  # (BN, NB)
            kb = k0 + rb * BLOCKSIZE
            sc = tl.load(absmax_ptr + (rn[:, None].to(tl.int64) * K + kb[None, :]) // BLOCKSIZE,
                         mask=(rn[:, None] < N) & (kb[None, :] < K), other=0.0)
            acc += tl.sum(part * sc, axis=1)
    else:  # blocks straddle rows (or are wider than BK): scale per element
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
            w = _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE)
            acc += tl.sum(w * x[None, :], axis=1)
    tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``tl.dot`` in full float32 precision when ``IEEE`` (float32 operands, TF32 not allowed), else default."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _low_rank(acc, p_ptr, q_ptr, rm, rc, M, C, R, s_pm, s_pr, s_qr, s_qc, scaling,
              UPCAST: tl.constexpr, IEEE: tl.constexpr, BR: tl.constexpr):
    """``acc + scaling * P[rm, :R] @ Q[:R, rc]`` (the LoRA term, accumulated in float32 in chunks of BR)."""
    low = tl.zeros_like(acc)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        pt = tl.load(p_ptr + rm[:, None].to(tl.int64) * s_pm + rr[None, :] * s_pr,
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        qt = tl.load(q_ptr + rr[:, None] * s_qr + rc[None, :].to(tl.int64) * s_qc,
                     mask=(rr[:, None] < R) & (rc[None, :] < C), other=0.0)
        if UPCAST:
            pt = pt.to(tl.float32)
            qt = qt.to(tl.float32)
        low += _dot(pt, qt, IEEE)
    return acc + low * scaling


@triton.autotune(configs=_MM_CONFIGS, key=["M_BUCKET", "N", "K"], **tuner_kwargs())
@triton.jit
def _matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_xm, stride_om, M_BUCKET,
                   p_ptr, q_ptr, bias_ptr, R, s_pm, s_pr, s_qr, s_qc, scaling,
                   BLOCKSIZE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_LORA: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        w = _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE).to(x.dtype)
        acc += _dot(x, tl.trans(w), IEEE)
    if HAS_LORA:  # QLoRA: + scaling * (x A^T) B^T, into the same accumulator (p = x A^T, q = B^T)
        acc = _low_rank(acc, p_ptr, q_ptr, rm, rn, M, N, R, s_pm, s_pr, s_qr, s_qc, scaling, UPCAST, IEEE, BR)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.autotune(configs=_MM_CONFIGS, key=["M_BUCKET", "N", "K"], **tuner_kwargs())
@triton.jit
def _grad_input_kernel(g_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_gm, stride_om, M_BUCKET,
                       p_ptr, q_ptr, R, s_pm, s_pr, s_qr, s_qc, scaling,
                       BLOCKSIZE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_LORA: tl.constexpr,
                       BR: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BM, BK, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :],
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
        w = _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE).to(g.dtype)
        acc += _dot(g, w, IEEE)
    if HAS_LORA:  # QLoRA: + scaling * (g B) A (p = g B, q = A)
        acc = _low_rank(acc, p_ptr, q_ptr, rm, rk, M, K, R, s_pm, s_pr, s_qr, s_qc, scaling, UPCAST, IEEE, BR)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rk[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def _upcast(t: torch.Tensor) -> bool:
    """Feed ``tl.dot`` float32 instead of bfloat16 off the GPU: Triton 3.9's interpreter (TRITON_INTERPRET=1)
    returns garbage (~1e10) for bf16 ``tl.dot`` operands (fp16/fp32 are right); on CUDA bf16 stays."""
    return (not t.is_cuda) and t.dtype == torch.bfloat16


def _ieee(t: torch.Tensor) -> bool:
    """float32 operands on the GPU: full float32 products (as torch's matmul) unless the user allowed TF32."""
    return t.is_cuda and t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _prep(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor):
    return packed.reshape(-1).contiguous(), absmax.float().contiguous(), code.float().contiguous()


def dequantize_4bit_triton(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, numel: int,
                           blocksize: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton version of ``dequantize_4bit_ref`` (same arguments and result)."""
    packed, absmax, code = _prep(packed, absmax, code)
    out = torch.empty(numel, dtype=out_dtype, device=packed.device)
    block = 1024
    _dequant_kernel[(triton.cdiv(numel, block),)](packed, absmax, code, out, numel, BLOCKSIZE=blocksize, BLOCK=block)
    return out


def matmul_4bit_small_m_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                               out_features: int, blocksize: int) -> torch.Tensor:
    """Triton version of ``matmul_4bit_small_m_ref`` (one program per row and BN-column tile; BN, BK
    autotuned per (N, K) on the GPU, 64 x 128 under the interpreter)."""
    packed, absmax, code = _prep(packed, absmax, code)
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out
    grid = lambda meta: (triton.cdiv(out_features, meta["BN"]), m)  # noqa: E731
    _matvec_kernel[grid](x, packed, absmax, code, out, out_features, k, x.stride(0), out.stride(0),
                         BLOCKSIZE=blocksize, ROW_BLOCKS=k % blocksize == 0)
    return out


def matmul_4bit_tiled_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                             out_features: int, blocksize: int) -> torch.Tensor:
    """Triton version of ``matmul_4bit_ref`` (tiles autotuned per (M bucket, N, K) on the GPU, see
    ``_autotune``; 64 x 64 x 64 under the interpreter)."""
    packed, absmax, code = _prep(packed, absmax, code)
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(out_features, meta["BN"]),)  # noqa: E731
    _matmul_kernel[grid](x, packed, absmax, code, out, m, out_features, k, x.stride(0), out.stride(0), m_bucket(m),
                         out, out, out, 0, 0, 0, 0, 0, 0.0,
                         BLOCKSIZE=blocksize, UPCAST=_upcast(x), IEEE=_ieee(x), HAS_LORA=False, HAS_BIAS=False,
                         BR=16)
    return out


def matmul_4bit_grad_input_triton(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                                  code: torch.Tensor, in_features: int, blocksize: int) -> torch.Tensor:
    """Triton version of ``matmul_4bit_grad_input_ref`` (tiles autotuned like the tiled matmul's)."""
    packed, absmax, code = _prep(packed, absmax, code)
    g = grad_out.contiguous()
    m, n = g.shape
    out = torch.empty(m, in_features, dtype=g.dtype, device=g.device)
    if m == 0 or in_features == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(in_features, meta["BK"]),)  # noqa: E731
    _grad_input_kernel[grid](g, packed, absmax, code, out, m, n, in_features, g.stride(0), out.stride(0),
                             m_bucket(m), out, out, 0, 0, 0, 0, 0, 0.0,
                             BLOCKSIZE=blocksize, UPCAST=_upcast(g), IEEE=_ieee(g), HAS_LORA=False, BR=16)
    return out


# ----------------------------------------------------------------------------------------------------
# QLoRA: the LoRA term fused into the 4-bit matmul and its input gradient (see ``lora.py``)
# ----------------------------------------------------------------------------------------------------

def _rank_block(r: int) -> int:
    return max(16, min(64, triton.next_power_of_2(r)))


def lora_matmul_4bit_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                            out_features: int, blocksize: int, xa: torch.Tensor, lora_b: torch.Tensor, bias,
                            scaling: float) -> torch.Tensor:
    """``x W^T + scaling * xa B^T (+ bias)`` for a 4-bit ``W (out_features, K)``: ``x (M, K)``,
    ``xa = x A^T (M, r)``, ``lora_b (out_features, r)``, ``bias (out_features,)`` or None, all in
    ``x.dtype``; ``(M, out_features)`` in ``x.dtype``. One tiled kernel (the tiled matmul's, autotuned
    alike) adds the rank-r term to its float32 accumulator before the single store."""
    packed, absmax, code = _prep(packed, absmax, code)
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out
    r = xa.shape[1]
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(out_features, meta["BN"]),)  # noqa: E731
    _matmul_kernel[grid](x, packed, absmax, code, out, m, out_features, k, x.stride(0), out.stride(0), m_bucket(m),
                         xa, lora_b, bias.contiguous() if bias is not None else out, r, xa.stride(0), xa.stride(1),
                         lora_b.stride(1), lora_b.stride(0), float(scaling),
                         BLOCKSIZE=blocksize, UPCAST=_upcast(x), IEEE=_ieee(x), HAS_LORA=True,
                         HAS_BIAS=bias is not None, BR=_rank_block(r))
    return out


def lora_grad_input_4bit_triton(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                                code: torch.Tensor, in_features: int, blocksize: int, gb: torch.Tensor,
                                lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``grad_out W + scaling * gb A`` for a 4-bit ``W (N, in_features)``: ``grad_out (M, N)``,
    ``gb = grad_out B (M, r)``, ``lora_a (r, in_features)``, all in ``grad_out.dtype``;
    ``(M, in_features)`` in that dtype. The input-gradient kernel with the rank-r term fused."""
    packed, absmax, code = _prep(packed, absmax, code)
    g = grad_out.contiguous()
    m, n = g.shape
    out = torch.empty(m, in_features, dtype=g.dtype, device=g.device)
    if m == 0 or in_features == 0:
        return out
    r = gb.shape[1]
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(in_features, meta["BK"]),)  # noqa: E731
    _grad_input_kernel[grid](g, packed, absmax, code, out, m, n, in_features, g.stride(0), out.stride(0),
                             m_bucket(m), gb, lora_a, r, gb.stride(0), gb.stride(1), lora_a.stride(0),
                             lora_a.stride(1), float(scaling),
                             BLOCKSIZE=blocksize, UPCAST=_upcast(g), IEEE=_ieee(g), HAS_LORA=True, BR=_rank_block(r))
    return out
