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

Absmax is the de-nested float32 ``(nblocks,)`` tensor, or, when the keyword ``nested`` (a :class:`Nested`)
is given, the uint8 codes of double quantization (QLoRA, Dettmers et al., 2023, section 3): the decode
and dequantization kernels expand them inside the kernel, the references and the tiled kernels through
:func:`expand_absmax` (1/64 of the data).

Training-shape products (M > 16) take one of two paths per shape (:func:`training_path`): the tiled fused
kernel, or dequantize to the compute dtype then a cuBLAS matmul, from the table ``nf4_paths.json`` that
``benchmarks/gpu_check.py`` measures (:func:`write_path_table`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from llmtune.kernels.dispatch import triton_available, use_triton  # noqa: F401 (one rule for every kernel)

#: M at or below which :func:`matmul_4bit` uses the matrix-vector (decode) kernel.
SMALL_M = 16



class Nested(NamedTuple):
    """Double quantization of the block scales (bitsandbytes' nested ``QuantState``): the scale of block
    ``i`` is ``code[absmax_u8[i]] * absmax[i // blocksize] + offset``. ``absmax`` float32
    ``(ceil(nblocks / blocksize),)``, ``code`` float32 ``(256,)``, ``offset`` float32 0-d tensor (or float),
    ``blocksize`` int (256)."""

    absmax: torch.Tensor
    code: torch.Tensor
    offset: object
    blocksize: int = 256


def expand_absmax(absmax: torch.Tensor, nested: Optional[Nested]) -> torch.Tensor:
    """float32 block scales ``(nblocks,)``: ``absmax`` itself (as float32) when ``nested`` is None, else the
    uint8 codes ``absmax`` de-nested by the formula of :class:`Nested`."""
    if nested is None:
        return absmax.reshape(-1).float()
    q = absmax.reshape(-1).long()
    outer = nested.absmax.float().to(q.device).repeat_interleave(int(nested.blocksize))[: q.numel()]
    off = torch.as_tensor(nested.offset, dtype=torch.float32).to(q.device)
    return nested.code.float().to(q.device)[q] * outer + off


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
                    blocksize: int, out_dtype: torch.dtype, *, nested: Optional[Nested] = None) -> torch.Tensor:
    """Dequantize ``numel`` values: Triton on CUDA (double-quantized scales expanded in the kernel when
    ``nested`` is given), :func:`dequantize_4bit_ref` on the CPU (same arguments)."""
    if use_triton(packed):
        return _tri().dequantize_4bit_triton(packed, absmax, code, numel, blocksize, out_dtype, nested)
    return dequantize_4bit_ref(packed, expand_absmax(absmax, nested), code, numel, blocksize, out_dtype)


def matmul_4bit_small_m(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        out_features: int, blocksize: int, *, nested: Optional[Nested] = None) -> torch.Tensor:
    """Fused dequantize-and-multiply for ``M <= 16`` rows (decode): ``(M, K) -> (M, out_features)`` in
    ``x.dtype``. Triton: the decode kernel (``_nf4_decode``: split-K over the SMs, int32 weight loads, one
    weight decode for all rows, scales de-nested in the kernel). CPU: the reference."""
    if use_triton(x):
        return _tri().matmul_4bit_small_m_triton(x, packed, absmax, code, out_features, blocksize, nested)
    return matmul_4bit_small_m_ref(x, packed, expand_absmax(absmax, nested), code, out_features, blocksize)


def matmul_4bit_tiled(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      out_features: int, blocksize: int, *, nested: Optional[Nested] = None) -> torch.Tensor:
    """Tiled fused dequantize-and-matmul (training-sized M): each (BM, BN) program dequantizes its
    (BN, BK) weight tiles in registers and accumulates ``tl.dot`` in float32. CPU: the reference."""
    absmax = expand_absmax(absmax, nested)
    if use_triton(x):
        return _tri().matmul_4bit_tiled_triton(x, packed, absmax, code, out_features, blocksize)
    return matmul_4bit_ref(x, packed, absmax, code, out_features, blocksize)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                out_features: int, blocksize: int, *, nested: Optional[Nested] = None) -> torch.Tensor:
    """``x @ W.T`` for a 4-bit ``W (out_features, K)``; ``x (M, K)`` -> ``(M, out_features)`` in x.dtype.

    Triton: the decode kernel for ``M <= SMALL_M``; above, :func:`training_path` picks the tiled kernel or
    dequantize-then-cuBLAS for the shape. CPU: :func:`matmul_4bit_ref`."""
    if use_triton(x):
        m, k = x.shape
        if m <= SMALL_M:
            return _tri().matmul_4bit_small_m_triton(x, packed, absmax, code, out_features, blocksize, nested)
        if training_path(m, out_features, k, "forward") == "tiled":
            return _tri().matmul_4bit_tiled_triton(x, packed, expand_absmax(absmax, nested), code, out_features,
                                                   blocksize)
        w = dequantize_4bit(packed, absmax, code, out_features * k, blocksize, x.dtype, nested=nested)
        return x @ w.view(out_features, k).t()
    return matmul_4bit_ref(x, packed, expand_absmax(absmax, nested), code, out_features, blocksize)


def matmul_4bit_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                           code: torch.Tensor, in_features: int, blocksize: int, *,
                           nested: Optional[Nested] = None) -> torch.Tensor:
    """``grad_out @ W`` (the input gradient of ``x @ W.T``): ``(M, N) -> (M, in_features)``.
    Triton on CUDA: the tiled kernel (W tiles dequantized in registers) or dequantize-then-cuBLAS, as
    :func:`training_path` says for the shape; :func:`matmul_4bit_grad_input_ref` on the CPU."""
    if use_triton(grad_out):
        m, n = grad_out.shape
        if training_path(m, n, in_features, "grad_input") == "tiled":
            return _tri().matmul_4bit_grad_input_triton(grad_out, packed, expand_absmax(absmax, nested), code,
                                                        in_features, blocksize)
        w = dequantize_4bit(packed, absmax, code, n * in_features, blocksize, grad_out.dtype, nested=nested)
        return grad_out @ w.view(n, in_features)
    return matmul_4bit_grad_input_ref(grad_out, packed, expand_absmax(absmax, nested), code, in_features,
                                      blocksize)


# ----------------------------------------------------------------------------------------------------
# Training shapes: tiled fused kernel or dequantize + cuBLAS, from a measured table
# ----------------------------------------------------------------------------------------------------

#: The table of :func:`training_path` (shipped with the package; rewritten by ``write_path_table``).
PATH_TABLE = Path(__file__).resolve().parent / "nf4_paths.json"
PATHS = ("tiled", "dequant")
_TABLE_CACHE: dict = {}


def _bucket(m: int) -> int:
    """The M bucket of the tables and tuners: next power of two, clamped to 16..8192."""
    return max(16, min(8192, 1 << max(0, int(m) - 1).bit_length()))


def load_path_table(path: Optional[os.PathLike] = None) -> dict:
    """The path table (cached per file and modification time): ``{"measured": bool, "device": str|None,
    "default": "tiled"|"dequant", "entries": [{"op", "m_bucket", "n", "k", "path", ...}]}``. A missing
    file gives the unmeasured default (dequantize + cuBLAS everywhere). Raises ValueError naming the file
    when it is not such a table."""
    p = Path(path) if path is not None else PATH_TABLE
    try:
        stamp = p.stat().st_mtime_ns
    except OSError:
        return {"measured": False, "device": None, "default": "dequant", "entries": []}
    hit = _TABLE_CACHE.get(str(p))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        table = json.loads(p.read_text())
        ok = table.get("default") in PATHS and all(e.get("path") in PATHS and e.get("op") in ("forward", "grad_input")
                                                  for e in table.get("entries", []))
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{p}: not an NF4 path table (needs 'default' and 'entries' with op forward/grad_input and "
                         f"path tiled/dequant); delete it to use the defaults or rewrite it with "
                         f"llmtune.kernels.nf4.write_path_table")
    _TABLE_CACHE[str(p)] = (stamp, table)
    return table


def training_path(m: int, n: int, k: int, op: str = "forward", table: Optional[dict] = None) -> str:
    """``"tiled"`` or ``"dequant"``: the faster path for an ``(m, k) x (k, n)``-shaped product (``op``
    ``"forward"``: ``x @ W.T`` with W ``(n, k)``; ``"grad_input"``: ``grad_out (m, n) @ W (n, k)``).

    Rule: the environment variable ``LLMTUNE_NF4_PATH`` (``tiled``/``dequant``) wins; else the table
    entry of the same op and ``(n, k)`` whose M bucket is nearest (in log2) to ``m``'s; else the table's
    ``default``. The shipped table is UNMEASURED (default ``dequant``: dequantize to the compute dtype,
    then cuBLAS) until ``benchmarks/gpu_check.py`` measures both paths on a GPU and writes it."""
    forced = os.environ.get("LLMTUNE_NF4_PATH", "").strip().lower()
    if forced in PATHS:
        return forced
    table = load_path_table() if table is None else table
    mb = _bucket(m).bit_length()
    best = None
    for e in table.get("entries", []):
        if e["op"] == op and int(e["n"]) == n and int(e["k"]) == k:
            d = abs(_bucket(int(e["m_bucket"])).bit_length() - mb)
            if best is None or d < best[0]:
                best = (d, e["path"])
    return best[1] if best is not None else table.get("default", "dequant")


def write_path_table(entries: list, device: str, path: Optional[os.PathLike] = None,
                     default: str = "dequant") -> Path:
    """Write a measured table for :func:`training_path` (``benchmarks/gpu_check.py`` calls it).

    ``entries``: dicts with ``op`` (``forward``/``grad_input``), ``m`` or ``m_bucket``, ``n``, ``k``,
    ``tiled_ms`` and ``dequant_ms`` (milliseconds measured on ``device``); each gets ``path`` = the faster
    one. Written to ``path`` (default: the package's ``nf4_paths.json``); returns the path. Raises
    ValueError for an entry without those keys."""
    rows = []
    for e in entries:
        try:
            t, d = float(e["tiled_ms"]), float(e["dequant_ms"])
            row = {"op": str(e["op"]), "m_bucket": _bucket(int(e.get("m_bucket", e.get("m")))), "n": int(e["n"]),
                   "k": int(e["k"]), "tiled_ms": round(t, 5), "dequant_ms": round(d, 5)}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"write_path_table: entry {e!r} needs op, m, n, k, tiled_ms, dequant_ms ({err})") from None
        if row["op"] not in ("forward", "grad_input"):
            raise ValueError(f"write_path_table: op must be forward or grad_input, got {row['op']!r}")
        row["path"] = "tiled" if t < d else "dequant"
        rows.append(row)
    out = Path(path) if path is not None else PATH_TABLE
    out.write_text(json.dumps({"measured": True, "device": device, "default": default, "entries": rows},
                              indent=1) + "\n")
    return out


def measure_paths(shapes: list, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", bench=None) -> list:
    """Time both training paths on the GPU for each ``(m, n, k)`` in ``shapes`` (forward and input
    gradient, a random NF4 weight with double quantization): entries for :func:`write_path_table`.
    ``bench(fn) -> ms`` defaults to ``triton.testing.do_bench`` (median)."""
    from llmtune.quant.nf4 import quantize_4bit

    if bench is None:
        import triton.testing as tt

        bench = lambda fn: tt.do_bench(fn, return_mode="median")  # noqa: E731
    T = _tri()
    out = []
    for m, n, k in shapes:
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        packed, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
        absmax, code = st.get_absmax(), st.code
        x = torch.randn(m, k, device=device, dtype=dtype)
        g = torch.randn(m, n, device=device, dtype=dtype)
        deq = lambda: T.dequantize_4bit_triton(packed, absmax, code, n * k, 64, dtype).view(n, k)  # noqa: E731
        out.append({"op": "forward", "m": m, "n": n, "k": k,
                    "tiled_ms": bench(lambda: T.matmul_4bit_tiled_triton(x, packed, absmax, code, n, 64)),
                    "dequant_ms": bench(lambda: x @ deq().t())})
        out.append({"op": "grad_input", "m": m, "n": n, "k": k,
                    "tiled_ms": bench(lambda: T.matmul_4bit_grad_input_triton(g, packed, absmax, code, k, 64)),
                    "dequant_ms": bench(lambda: g @ deq())})
    return out
