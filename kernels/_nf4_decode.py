"""Triton NF4/FP4 decode kernel (``x @ W.T`` for M = 1..16 rows, inference); imported lazily by ``nf4.py``.

Decoding one token reads every weight once and does 2 flops per weight per row, so the product is
memory bound: the time is the bytes of the 4-bit weight (0.5 byte/param, plus 1/64 byte of uint8 scales
with double quantization) over the GPU's bandwidth, against 2 bytes/param for a bf16 ``F.linear``. The
kernel is built to stream those bytes at full bandwidth:

* Grid ``(ceil(N / BN), SPLIT)``: BN = 32 output rows per program and split-K over ``SPLIT`` slices of K,
  chosen so that about 4 programs per SM exist (an 8B k/v projection, N = 1024, gives 32 row tiles x 16
  K slices = 512 programs on a 132-SM H100, where a grid of N/BN x M gave 64). With ``SPLIT > 1`` each
  program writes float32 partial sums ``(SPLIT, M, N)`` that one ``sum`` reduces (deterministic, no atomics).
* Wide loads: the packed weight is read as int32 words (8 codes each; rows of ``K / 8`` words, so
  ``K % 8 == 0``), a (BN, BK / 8) tile per step, contiguous along K (16-byte vector loads per thread).
* Code table: a 256-entry int64 table (2 KiB, L1-resident) maps a packed byte to both of its values
  (two float32 bit patterns: high nibble = even column, low nibble = odd column), so each byte costs one
  table load instead of two (bitsandbytes' kernel keeps the 16 codes in shared memory and decodes per nibble).
* Scales: per quantization block of ``BLOCKSIZE`` weights (``K % BLOCKSIZE == 0`` so blocks lie inside
  rows, ``BLOCKSIZE`` divides ``BK``): one load per block; with double quantization (``NESTED``) the uint8
  code is expanded in the kernel, ``nested_code[q] * nested_absmax[block // NBS] + offset``, so the float32
  scales are never materialised (``Linear4bit.forward`` used to expand them on every call).
* One decode per weight tile for all M <= 16 rows: the decoded (BN, BK) tile is multiplied with every row
  of ``x`` before the next tile is loaded: a loop of broadcast-multiply-sums for M <= 4 (``BM`` = 1, 2, 4)
  and one ``tl.dot`` (rows padded to 16) for M = 5..16 in bf16/fp16 (float32 ``x``: groups of 4 rows).
Accumulation is float32; the output is rounded once to ``x.dtype``.

Facts used (no code taken): bitsandbytes' ``kgemm_4bit_inference_naive`` (a warp per output row, 16-byte
loads of packed weights, code book in shared memory, absmax per block), the split-K decomposition for
W4A16 GEMMs with few rows (Hoque et al., 2024, arXiv:2402.00025), and Marlin's aim of streaming the
weight at full bandwidth at small batch (Frantar et al., 2024, arXiv:2408.11743).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Tile of the decode kernel: output rows per program, columns per step, warps, pipeline stages.
BN, BK, NUM_WARPS, NUM_STAGES = 32, 128, 4, 3
#: Largest quantization block the kernel handles (it must divide BK); larger blocks take the tiled kernel.
MAX_BLOCKSIZE = BK


@triton.jit
def _decode_kernel(x_ptr, w_ptr, absmax_ptr, pair_ptr, nabs_ptr, ncode_ptr, noff_ptr, out_ptr, ws_ptr,
                   M, N, K, KW, KB, k_per_split, stride_xm, stride_om, SPLIT,
                   BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NBS: tl.constexpr, BM: tl.constexpr,
                   USE_DOT: tl.constexpr, UPCAST: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rn64 = rn.to(tl.int64)
    rw = tl.arange(0, BK // 8)  # int32 words of one row of the tile
    rb = tl.arange(0, BK // BLOCKSIZE)  # quantization blocks of one row of the tile
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    shifts = tl.arange(0, 4) * 8  # byte j of a little-endian int32 word: bits 8j .. 8j+7
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        # packed weight tile (BN, BK / 8) int32 -> bytes (BN, BK / 8, 4) -> value pairs from the table
        words = tl.load(w_ptr + rn64[:, None] * KW + (k0 // 8 + rw[None, :]),
                        mask=nmask[:, None] & (k0 + rw[None, :] * 8 < k_hi), other=0)
        byte = (words[:, :, None] >> shifts[None, None, :]) & 0xFF
        pair = tl.load(pair_ptr + byte)
        even = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)  # high nibble: column 2j
        odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)  # low nibble: column 2j + 1
        vals = tl.reshape(tl.join(even, odd), (BN, BK // BLOCKSIZE, BLOCKSIZE))
        # block scales (BN, BK / BLOCKSIZE), de-nested here when double-quantized
        blk = rn64[:, None] * KB + (k0 // BLOCKSIZE + rb[None, :])
        bmask = nmask[:, None] & (k0 + rb[None, :] * BLOCKSIZE < k_hi)
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
            scale = tl.load(ncode_ptr + q) * tl.load(nabs_ptr + blk // NBS, mask=bmask, other=0.0) \
                + tl.load(noff_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
        w = tl.reshape(vals * scale[:, :, None], (BN, BK))  # (BN, BK) float32
        kk = k0 + rk
        kmask = kk < k_hi
        if USE_DOT:  # 5..16 rows: one product per tile (rows padded to BM = 16)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & kmask[None, :],
                         other=0.0)
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong: float32 operands there
                acc += tl.dot(xt.to(tl.float32), tl.trans(w))
            else:  # tensor cores, W rounded once to x's dtype (as the reference dequantizes to it)
                acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
        else:  # 1..4 rows (or float32 x): broadcast multiply and sum along K, row by row
            for mi in tl.static_range(BM):
                xm = tl.load(x_ptr + mi * stride_xm + kk, mask=kmask & (tl.full((BK,), mi, tl.int32) < M),
                             other=0.0).to(tl.float32)
                part = tl.sum(w * xm[None, :], axis=1)
                acc = tl.where(rm[:, None] == mi, acc + part[None, :], acc)
    omask = (rm[:, None] < M) & nmask[None, :]
    if SPLIT > 1:  # float32 partial sums of this K slice: ws (SPLIT, M, N)
        tl.store(ws_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn64[None, :], acc, mask=omask)
    else:
        tl.store(out_ptr + rm[:, None] * stride_om + rn64[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


_PAIRS: dict = {}


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 ``(256,)`` on ``code``'s device: entry ``b`` holds the float32 bit patterns of ``code[b >> 4]``
    (low 32 bits) and ``code[b & 15]`` (high 32 bits). Cached per code tensor (its storage and version)."""
    key = (code.device, code.data_ptr(), code._version)
    hit = _PAIRS.get(key)
    if hit is not None:
        return hit[1]
    c = code.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    table = (c.repeat_interleave(16) | (c.repeat(16) << 32)).contiguous()
    if len(_PAIRS) > 4096:
        _PAIRS.clear()
    _PAIRS[key] = (code, table)  # the reference keeps the storage alive, so the key cannot be reused
    return table


def supports(k: int, blocksize: int, packed: torch.Tensor) -> bool:
    """Whether the decode kernel takes a weight with ``K = k`` and ``blocksize`` (else the tiled kernel):
    ``K % 8 == 0`` (rows of whole int32 words), ``K % blocksize == 0`` (blocks inside rows), a
    power-of-two ``blocksize`` from 8 to :data:`MAX_BLOCKSIZE`, and a 4-byte-aligned packed buffer."""
    return (k % 8 == 0 and k % blocksize == 0 and 8 <= blocksize <= MAX_BLOCKSIZE
            and blocksize & (blocksize - 1) == 0 and packed.data_ptr() % 4 == 0)


def row_block(m: int) -> int:
    """``BM`` of ``m`` rows: 1, 2, 4 (loop over rows) or 16 (rows 5..16, one ``tl.dot``)."""
    return 1 if m <= 1 else 2 if m == 2 else 4 if m <= 4 else 16


def split_k(n: int, k: int, sms: int) -> tuple[int, int]:
    """``(SPLIT, k_per_split)``: the number of K slices giving about ``4 * sms`` programs with the
    ``ceil(n / BN)`` row tiles (at most one slice per ``BK`` columns) and the columns per slice (a multiple
    of ``BK``)."""
    tiles_n = triton.cdiv(n, BN)
    k_tiles = triton.cdiv(k, BK)
    split = max(1, min(k_tiles, triton.cdiv(4 * sms, tiles_n)))
    per = triton.cdiv(k_tiles, split) * BK
    return triton.cdiv(k, per), per


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: as an H100, so the tests exercise split-K


def decode_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                  out_features: int, blocksize: int, nested=None) -> torch.Tensor:
    """``x (M, K) @ W.T`` for ``M <= 16`` (see the module docstring); ``(M, out_features)`` in ``x.dtype``.

    ``packed`` uint8 ``(N * K / 2,)``; ``absmax`` float32 ``(N * K / blocksize,)``, or uint8 codes when
    ``nested`` is given (``llmtune.kernels.nf4.Nested``: nested absmax, 256-entry code, offset, block size);
    ``code`` float32 ``(16,)``. Requires :func:`supports` (the caller checks). Raises ValueError for M > 16."""
    m, k = x.shape
    if m > 16:
        raise ValueError(f"decode_triton: at most 16 rows, got {m} (use the tiled kernel)")
    x = x.contiguous()
    n = out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    words = packed.reshape(-1).view(torch.int32)
    split, per = split_k(n, k, _sms(x.device))
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    if nested is not None:
        nabs, ncode, noff, nbs = nested.absmax.float(), nested.code.float(), nested.offset, int(nested.blocksize)
        noff = torch.as_tensor(noff, dtype=torch.float32, device=x.device).reshape(1)
        scales = absmax.reshape(-1)
    else:
        scales = absmax.reshape(-1).float()
        nabs = ncode = noff = scales
        nbs = 256
    if x.dtype == torch.float32 and m > 4:  # float32 x: rows in groups of 4 (a float32 16-row product spills)
        for r0 in range(0, m, 4):
            out[r0:r0 + 4] = decode_triton(x[r0:r0 + 4], packed, absmax, code, n, blocksize, nested)
        return out
    bm = row_block(m)
    use_dot = bm == 16
    _decode_kernel[(triton.cdiv(n, BN), split)](
        x, words, scales, pair_table(code), nabs, ncode, noff, out, ws, m, n, k, k // 8, k // blocksize, per,
        x.stride(0), out.stride(0), split, BLOCKSIZE=blocksize, NESTED=nested is not None, NBS=nbs, BM=bm,
        USE_DOT=use_dot, UPCAST=use_dot and not x.is_cuda, BN=BN, BK=BK, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)
    if split > 1:
        out.copy_(ws.sum(0))
    return out


def compile_jobs(full: bool = False) -> list[dict]:
    """The variants the launcher can compile, for ``benchmarks/kernels_compile.py``: every ``BM`` (1, 2, 4,
    16) with and without double quantization, bf16 and float32 ``x``, blocksize 64 (``full``: also 32 and
    128), at a Llama-8B k/v projection (N = 1024, K = 4096)."""
    n, k = 1024, 4096
    out = []
    for dt in ("bf16", "fp32"):
        for bs in ((32, 64, 128) if full else (64,)):
            for nested in (False, True):
                for bm in (1, 2, 4, 16):
                    if dt == "fp32" and (bm == 16 or (not full and bm == 2)):
                        continue  # float32 x: BM <= 4 only (the launcher splits more rows into groups of 4)
                    use_dot = bm == 16
                    ptrs = {"x_ptr": "*" + dt, "w_ptr": "*i32", "absmax_ptr": "*u8" if nested else "*fp32",
                            "pair_ptr": "*i64", "nabs_ptr": "*fp32", "ncode_ptr": "*fp32", "noff_ptr": "*fp32",
                            "out_ptr": "*" + dt, "ws_ptr": "*fp32"}
                    ints = {"M": bm, "N": n, "K": k, "KW": k // 8, "KB": k // bs, "k_per_split": 256, "stride_xm": k,
                            "stride_om": n, "SPLIT": 16}
                    consts = {"BLOCKSIZE": bs, "NESTED": nested, "NBS": 256, "BM": bm, "USE_DOT": use_dot,
                              "UPCAST": False, "BN": BN, "BK": BK}
                    out.append({"ptrs": ptrs, "ints": ints, "consts": consts,
                                "cfg": {"kwargs": {}, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES},
                                "label": f"nf4 decode M<={bm} bs={bs} nested={nested} {dt}"})
    return out
