"""Triton kernels of the training step (RMSNorm, RoPE, SwiGLU, softmax cross entropy); imported lazily.

Each launcher here has the signature of its PyTorch reference in ``rmsnorm.py``, ``rope.py``, ``swiglu.py``
and ``cross_entropy.py`` (the autograd functions there call these). All arithmetic is float32 in registers;
inputs and outputs keep their dtype (bf16/fp16/fp32). Every kernel is memory bound: one read of each input
and one write of each output per call, no intermediate in global memory.

Sources: RMSNorm (Zhang & Sennrich, 2019, eq. 4) and its gradient; RoPE in the rotate-half layout of
Hugging Face checkpoints (Su et al., 2021, eq. 34); SwiGLU (Shazeer, 2020, eq. 6); softmax cross entropy
with the online (one-pass) log-sum-exp (Milakov & Gimelshein, 2018, algorithm 3). The last section is not
memory bound: LoRA fused into the frozen layer's tiled matmul (``lora.py``; Hu et al., 2021, eq. 3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _num_programs(device: torch.device, rows: int) -> int:
    """Persistent-grid size for row reductions: a few programs per multiprocessor (4 off the GPU)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, D, stride_x, stride_y, eps,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < D)
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    # as the reference: normalise in float32, round to the input dtype, then multiply by the weight
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + r64[:, None] * stride_y + cols[None, :], (n * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, D, rows_per_prog,
                    stride_dy, stride_x, stride_dx,
                    HAS_DW: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        dn = dy * w[None, :]
        c = tl.sum(dn * xhat, axis=1) / D
        dx = rstd[:, None] * (dn - xhat * c[:, None])
        tl.store(dx_ptr + r64[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += tl.sum(dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * D + cols, dw, mask=cmask)


def _rms_tiles(d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    return max(1, min(16, 2048 // block_d)), block_d


def rms_norm_fwd_triton(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """``x2d (M, D)`` (unit stride in D) -> ``(y (M, D) in promote(x, weight) dtype, rstd (M,) float32)``."""
    m, d = x2d.shape
    y = torch.empty(m, d, dtype=torch.promote_types(x2d.dtype, weight.dtype), device=x2d.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2d.device)
    rows, block_d = _rms_tiles(d)
    _rms_fwd_kernel[(triton.cdiv(m, rows),)](x2d, weight.contiguous(), y, rstd, m, d, x2d.stride(0), y.stride(0),
                                              float(eps), ROWS=rows, BLOCK_D=block_d, num_warps=_num_warps(block_d))
    return y, rstd


def rms_norm_bwd_triton(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                        need_dw: bool):
    """Gradients of :func:`rms_norm_fwd_triton`: ``(dx (M, D) in x's dtype, dw (D,) float32 or None)``."""
    m, d = x2d.shape
    dy2d = dy2d.contiguous()
    dx = torch.empty_like(x2d)
    nprog = _num_programs(x2d.device, m)
    per = triton.cdiv(m, nprog) if m else 1
    nprog = triton.cdiv(m, per) if m else 0
    dw_part = torch.empty(max(nprog, 1), d, dtype=torch.float32, device=x2d.device) if need_dw else dx
    rows, block_d = _rms_tiles(d)
    if nprog:
        _rms_bwd_kernel[(nprog,)](dy2d, x2d, weight.contiguous(), rstd, dx, dw_part, m, d, per,
                                  dy2d.stride(0), x2d.stride(0), dx.stride(0), HAS_DW=need_dw, ROWS=rows,
                                  BLOCK_D=block_d, num_warps=_num_warps(block_d))
    dw = None
    if need_dw:
        dw = dw_part[:nprog].sum(0) if nprog else torch.zeros(d, dtype=torch.float32, device=x2d.device)
    return dx, dw


# ----------------------------------------------------------------------------------------------------
# RoPE (rotate-half): y = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _rope_heads(x_ptr, o_ptr, b, t, H, HALF, sx_b, sx_h, sx_t, sx_d, so_b, so_h, so_t, so_d, c1, c2, s1, s2,
                BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < H) & (d[None, :] < HALF)
    xp = x_ptr + b * sx_b + t * sx_t + h[:, None].to(tl.int64) * sx_h + d[None, :] * sx_d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the rotation: dx1 = c1 dy1 + s2 dy2, dx2 = c2 dy2 - s1 dy1
        y1 = x1 * c1[None, :] + x2 * s2[None, :]
        y2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    op = o_ptr + b * so_b + t * so_t + h[:, None].to(tl.int64) * so_h + d[None, :] * so_d
    tl.store(op, y1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(op + HALF * so_d, y2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, HQ, HK, HALF,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                 sqo_b, sqo_h, sqo_t, sqo_d, sko_b, sko_h, sko_t, sko_d,
                 sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    cp = cos_ptr + b * sc_b + t * sc_t + d * sc_d
    sp = sin_ptr + b * ss_b + t * ss_t + d * ss_d
    c1 = tl.load(cp, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF * sc_d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sp + HALF * ss_d, mask=dm, other=0.0).to(tl.float32)
    _rope_heads(q_ptr, qo_ptr, b, t, HQ, HALF, sq_b, sq_h, sq_t, sq_d, sqo_b, sqo_h, sqo_t, sqo_d,
                c1, c2, s1, s2, BACKWARD, BLOCK_H, BLOCK_D)
    _rope_heads(k_ptr, ko_ptr, b, t, HK, HALF, sk_b, sk_h, sk_t, sk_d, sko_b, sko_h, sko_t, sko_d,
                c1, c2, s1, s2, BACKWARD, BLOCK_H, BLOCK_D)


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
                k_out: torch.Tensor, backward: bool = False) -> None:
    """Rotate ``q (B, Hq, T, D)`` and ``k (B, Hk, T, D)`` (any strides) into ``q_out``/``k_out`` (may be the
    inputs: each element is read before it is written by the same program). ``cos``/``sin`` are
    ``(B, T, D)`` (stride 0 allowed: broadcast). ``backward=True`` applies the transposed rotation."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    half = d // 2
    block_d = triton.next_power_of_2(half)
    block_h = triton.next_power_of_2(max(hq, hk))
    _rope_kernel[(b * t,)](q, k, q_out, k_out, cos, sin, t, hq, hk, half,
                           *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(), *sin.stride(),
                           BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d,
                           num_warps=_num_warps(block_h * block_d))


# ----------------------------------------------------------------------------------------------------
# SwiGLU: y = silu(gate) * up
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(du_ptr + offs, (dy * g * s).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)


_EW_BLOCK = 1024


def swiglu_fwd_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for contiguous tensors of one shape and dtype."""
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](gate, up, y, n, BLOCK=_EW_BLOCK)
    return y


def swiglu_bwd_triton(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """``(d gate, d up)`` of :func:`swiglu_fwd_triton` for the output gradient ``dy``."""
    dy = dy.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_EW_BLOCK)
    return dg, du


# ----------------------------------------------------------------------------------------------------
# Softmax cross entropy of one logits chunk, gradient written over the logits
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _ce_kernel(z_ptr, stride_z, tgt_ptr, loss_ptr, lse_ptr, scale_ptr, V, inv_temp, ignore_index,
               HAS_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    tgt = tl.load(tgt_ptr + row)
    ignored = tgt == ignore_index
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe_tgt = tl.where(ignored, 0, tgt)
    zt = tl.load(base + safe_tgt).to(tl.float32) * inv_temp
    loss = tl.where(ignored, 0.0, lse - zt)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        scale = inv_temp
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row).to(tl.float32) * inv_temp
        scale = tl.where(ignored, 0.0, scale)
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            cm = cols < V
            z = tl.load(base + cols, mask=cm, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            g = (p - tl.where(cols == safe_tgt, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=cm)


def cross_entropy_chunk_triton(logits: torch.Tensor, targets: torch.Tensor, grad_scale=None,
                               temperature: float = 1.0, write_grad: bool = False, ignore_index: int = -100):
    """Triton version of ``cross_entropy_chunk_ref`` (same arguments, result and in-place gradient)."""
    n, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_chunk: logits must have unit stride along the vocabulary")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    block = min(triton.next_power_of_2(v), 4096 if logits.is_cuda else 1024)
    scale = grad_scale.contiguous() if grad_scale is not None else loss
    _ce_kernel[(n,)](logits, logits.stride(0), targets.contiguous(), loss, lse, scale, v, 1.0 / float(temperature),
                     int(ignore_index), HAS_SCALE=grad_scale is not None, WRITE_GRAD=bool(write_grad), BLOCK=block,
                     num_warps=_num_warps(block))
    return loss, lse


# ----------------------------------------------------------------------------------------------------
# LoRA fused into the frozen layer's matmul: C = A B + scaling * P Q (+ bias), one store of C
# ----------------------------------------------------------------------------------------------------
# Forward:  y  = x W^T + s (x A^T) B^T + bias   (A = x, B = W^T, P = xa = x A^T, Q = B^T)
# Backward: dx = g W   + s (g B) A              (A = g, B = W,   P = gB,          Q = A)
# Both are the same kernel on strided views; the rank-r term is added to the float32 accumulator of the
# big product before the single store, so no second (M, N) tensor is written and re-read.

from llmtune.kernels import _tiles  # noqa: E402

_tiles.reload_if_stale()  # before the helpers are imported (see there)
from llmtune.kernels._tiles import grouped_tile, ieee_products, mm_acc, store_tile, upcast_operands  # noqa: E402
from llmtune.kernels._autotune import m_bucket as _m_bucket  # noqa: E402
from llmtune.kernels._autotune import matmul_configs as _matmul_configs  # noqa: E402
from llmtune.kernels._autotune import matmul_key as _matmul_key  # noqa: E402
from llmtune.kernels._autotune import tuner_kwargs as _tuner_kwargs  # noqa: E402


@triton.jit
def _lora_mm_kernel(a_ptr, b_ptr, p_ptr, q_ptr, bias_ptr, c_ptr, M, N, K, R, M_BUCKET, scaling,
                    s_am, s_ak, s_bk, s_bn, s_pm, s_pr, s_qr, s_qn, s_cm, s_cn,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BR: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # program -> (row tile, column tile), GROUP_M row tiles at a time (L2 reuse of the column tiles)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    # the rank-r term first, scaled, as the initial value of the one float32 accumulator (a second
    # (BM, BN) accumulator for it would double the registers and spill)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = mm_acc(acc, p_ptr, q_ptr, rm, rn, M, N, R, s_pm, s_pr, s_qr, s_qn, UPCAST, IEEE, BR) * scaling
    acc = mm_acc(acc, a_ptr, b_ptr, rm, rn, M, N, K, s_am, s_ak, s_bk, s_bn, UPCAST, IEEE, BK)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    store_tile(c_ptr, acc, rm, rn, M, N, s_cm, s_cn)


# Two tuners over one kernel: forward (W read transposed) and input gradient (W read as stored) keep
# separate caches, since a square projection has the same (M, N, K) key in both but a different layout.
_LORA_CONFIGS = _matmul_configs(interpret_block=32)
_LORA_KEY = _matmul_key("HAS_BIAS", "UPCAST", "IEEE", "BR")
_lora_fwd_kernel = triton.autotune(configs=_LORA_CONFIGS, key=_LORA_KEY, **_tuner_kwargs())(_lora_mm_kernel)
_lora_dx_kernel = triton.autotune(configs=_LORA_CONFIGS, key=_LORA_KEY, **_tuner_kwargs())(_lora_mm_kernel)


def lora_mm_triton(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                   bias, scaling: float, backward: bool = False) -> torch.Tensor:
    """``a (M, K) @ b (K, N) + scaling * p (M, R) @ q (R, N) (+ bias (N,))`` -> ``(M, N)`` in ``a.dtype``.

    Any strides (the callers pass transposed views of W, A and B); all operands of one dtype. Products are
    accumulated in float32 and rounded once. ``backward`` picks the tuner of the input-gradient launch."""
    m, k = a.shape
    n = b.shape[1]
    r = p.shape[1]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    br = 16  # ranks per step of the LoRA term, whatever the rank (wider steps spilled registers on sm_80)
    kernel = _lora_dx_kernel if backward else _lora_fwd_kernel
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    kernel[grid](a, b, p, q, bias.contiguous() if bias is not None else c, c, m, n, k, r, _m_bucket(m), float(scaling),
                 a.stride(0), a.stride(1), b.stride(0), b.stride(1), p.stride(0), p.stride(1), q.stride(0),
                 q.stride(1), c.stride(0), c.stride(1), HAS_BIAS=bias is not None,
                 UPCAST=upcast_operands(a), IEEE=ieee_products(a), BR=br)
    return c
