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
flags); under the interpreter one fixed config (64-wide tiles) is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmtune.kernels._autotune import m_bucket, matmul_configs, matmul_key, tuner_kwargs

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
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` on a 1-D grid, in groups of GROUP_M row tiles: consecutive
    programs share weight tiles (and row tiles) while they are still in L2."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


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
    """``scaling * (acc + P[rm, :R] @ Q[:R, rc])`` (the LoRA term, accumulated in float32 in chunks of BR).
    The kernels call it on their zero accumulator BEFORE the main loop: one (BM, BN) float32 accumulator
    instead of two (a second one for the rank-r term doubled the registers and spilled)."""
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        pt = tl.load(p_ptr + rm[:, None].to(tl.int64) * s_pm + rr[None, :] * s_pr,
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        qt = tl.load(q_ptr + rr[:, None] * s_qr + rc[None, :].to(tl.int64) * s_qc,
                     mask=(rr[:, None] < R) & (rc[None, :] < C), other=0.0)
        if UPCAST:
            pt = pt.to(tl.float32)
            qt = qt.to(tl.float32)
        acc += _dot(pt, qt, IEEE)
    return acc * scaling


@triton.autotune(configs=_MM_CONFIGS, key=matmul_key("HAS_LORA", "HAS_BIAS", "UPCAST", "IEEE", "BR", "BLOCKSIZE"),
                 **tuner_kwargs())
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
    if HAS_LORA:  # QLoRA: scaling * (x A^T) B^T starts the accumulator (p = x A^T, q = B^T)
        acc = _low_rank(acc, p_ptr, q_ptr, rm, rn, M, N, R, s_pm, s_pr, s_qr, s_qc, scaling, UPCAST, IEEE, BR)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        w = _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE).to(x.dtype)
        acc += _dot(x, tl.trans(w), IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.autotune(configs=_MM_CONFIGS, key=matmul_key("HAS_LORA", "UPCAST", "IEEE", "BR", "BLOCKSIZE"),
                 **tuner_kwargs())
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
    if HAS_LORA:  # QLoRA: scaling * (g B) A starts the accumulator (p = g B, q = A)
        acc = _low_rank(acc, p_ptr, q_ptr, rm, rk, M, K, R, s_pm, s_pr, s_qr, s_qc, scaling, UPCAST, IEEE, BR)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :],
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
        w = _w_tile(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE).to(g.dtype)
        acc += _dot(g, w, IEEE)
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
