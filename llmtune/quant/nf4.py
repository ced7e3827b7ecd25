"""Block-wise 4-bit quantization (NF4 and FP4) with optional double quantization: the PyTorch reference.

Source: Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314),
section 3 (4-bit NormalFloat, eq. 4 for the quantile construction; double quantization) and the storage
layout of the bitsandbytes library (``bitsandbytes.functional.quantize_4bit`` / ``QuantState``), which
this module reproduces byte for byte so checkpoints interoperate:

* the weight is flattened (row-major) and cut into blocks of ``blocksize`` (64) values; the last block
  may be partial (equivalent to padding with zeros, which changes no absmax);
* each block stores ``absmax = max |w|`` (float32) and, per value, the index of the code value nearest
  to ``w / absmax`` (``w * (1 / absmax)`` in float32, as bitsandbytes computes it);
* two 4-bit indices per byte, the FIRST value of each pair in the HIGH nibble;
* double quantization: ``offset = mean(absmax)`` (float32) is subtracted, then the centred scales are
  quantized to 8 bits in blocks of 256 with the signed "dynamic" map of
  :func:`create_dynamic_map` as the code (Dettmers, 2016, "8-Bit Approximations for Parallelism in
  Deep Learning"), each 256-block with its own float32 absmax (``nested_absmax``).

Memory (double quantization, blocksize 64): 4 bits + 8/64 bits + 32/(64*256) bits = 4.127 bits/param.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from llmtune.errors import LLMTuneError

#: The 16 NF4 values (QLoRA, Appendix E; the table bitsandbytes ships), ascending, index = 4-bit code.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

#: bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) values in bit-pattern order,
#: normalised by the largest magnitude 12; index = 4-bit code (bit 3 is the sign).
FP4_CODE_VALUES = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                          -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))

QUANT_TYPES = ("nf4", "fp4")


def get_4bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry float32 code book of ``quant_type`` ("nf4" or "fp4"), index = 4-bit code.

    Raises :class:`LLMTuneError` for another ``quant_type``.
    """
    if quant_type == "nf4":
        values = NF4_CODE_VALUES
    elif quant_type == "fp4":
        values = FP4_CODE_VALUES
    else:
        raise LLMTuneError(f"quantization_type {quant_type!r} is not supported: use 'nf4' or 'fp4'.")
    return torch.tensor(values, dtype=torch.float32, device=device)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 256-value "dynamic" 8-bit code (Dettmers, 2016, arXiv:1511.04561), float32 ascending.

    Values are ``10**(-(max_exponent_bits-1)+i) * m`` for decades ``i = 0..max_exponent_bits-1`` where the
    fractions ``m`` are the midpoints of ``linspace(0.1, 1, 2**(i + total_bits-1 - max_exponent_bits) + 1)``
    (one more bit of fraction per decade), mirrored for ``signed``, plus ``0`` and ``1.0``, padded with
    zeros to ``2**total_bits`` and sorted. This is the code bitsandbytes uses for the 8-bit blockwise
    quantization of the absmax scales (double quantization), stored in checkpoints as ``nested_quant_map``.
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    decade = 0
    for decade in range(max_exponent_bits):
        frac_bits = decade + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        n = 2 ** frac_bits + 1
        edges = torch.linspace(0.1, 1, n, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + decade)
        values += (scale * mids).tolist()  # the product rounded to float32
        if signed:
            values += (-scale * mids).tolist()
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + decade)
        values += (scale * mids).tolist()  # the product rounded to float32
        if signed:
            values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_MAP: Optional[torch.Tensor] = None


def dynamic_map() -> torch.Tensor:
    """Cached signed :func:`create_dynamic_map` (256 float32 values, CPU); callers must not modify it."""
    global _DYNAMIC_MAP
    if _DYNAMIC_MAP is None:
        _DYNAMIC_MAP = create_dynamic_map(signed=True)
    return _DYNAMIC_MAP


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64, shape of ``scaled``) of the ``code`` value nearest to each float32 ``scaled`` value.

    Nearest by midpoints between the sorted code values (``torch.bucketize``, a value exactly on a midpoint
    goes to the lower code), as bitsandbytes does; duplicate code values (FP4's +0/-0, the dynamic map's
    padding zeros) resolve to the first index in stable sorted order.
    """
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    idx = torch.bucketize(scaled, mids, out_int32=True)
    if torch.equal(order, torch.arange(code.numel(), device=order.device)):
        return idx.long()
    return order[idx.long()]


def pack_4bit(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Pack 4-bit codes (any integer dtype, values 0..15, flattened) two per byte, first in the high nibble.

    Returns uint8 ``(ceil(n/2),)``; an odd count is padded with ``pad_code`` (quantize_4bit passes the
    code of 0.0, as bitsandbytes pads the scaled values with zero).
    """
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), pad_code)])
    return (c[0::2] << 4) | c[1::2]


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: uint8 ``(ceil(numel/2),)`` -> int64 codes ``(numel,)``."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel].long()


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantization of a float tensor to the indices of a code book.

    Args:
        x: float tensor, any shape (flattened row-major).
        code: float32 code book ``(K,)`` with values in ``[-1, 1]`` (K = 16 or 256).
        blocksize: values per block; the last block may be partial.
    Returns:
        ``(indices int64 (numel,), absmax float32 (ceil(numel/blocksize),))`` with
        ``indices[i] = nearest(code, x[i] * (1/absmax[block]))``. A zero block gets absmax 0 and the
        index nearest to 0 (bitsandbytes clamps the divisor to 1e-38).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    pad = nblocks * blocksize - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)  # in [-1, 1] up to rounding: no clamp needed
    idx = nearest_code(scaled.reshape(-1), code.to(flat.device))[:n]
    return idx, absmax


def dequantize_blockwise(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[idx[i]] * absmax[i // blocksize]``, float32 ``(numel,)``."""
    vals = code.to(absmax.device)[idx.reshape(-1).long()]
    n = vals.numel()
    nblocks = absmax.numel()
    pad = nblocks * blocksize - n
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    return (vals.view(nblocks, blocksize) * absmax.float().unsqueeze(1)).reshape(-1)[:n]


@dataclass
class QuantState:
    """Everything needed to dequantize a 4-bit packed tensor (bitsandbytes' ``QuantState`` fields).

    Attributes:
        absmax: float32 ``(nblocks,)`` block scales, or, when ``nested``, their uint8 8-bit codes.
        shape: original tensor shape; ``dtype``: original dtype (dequantization returns it).
        blocksize: values per 4-bit block (64). ``quant_type``: "nf4" or "fp4".
        code: float32 ``(16,)`` code book (checkpoint key ``quant_map``).
        offset: float32 0-d tensor, the mean subtracted from absmax before double quantization, or None.
        nested_absmax: float32 ``(ceil(nblocks/256),)`` scales of the 8-bit absmax codes, or None.
        nested_code: float32 ``(256,)`` dynamic map (``nested_quant_map``), or None.
        nested_blocksize: 256. ``nested_dtype``: float32 (the dtype of the de-nested absmax).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor = field(default_factory=lambda: get_4bit_code("nf4"))
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = 256
    nested_dtype: torch.dtype = torch.float32

    @property
    def nested(self) -> bool:
        """True when the absmax scales are double-quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of quantized values (product of ``shape``)."""
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def get_absmax(self) -> torch.Tensor:
        """The float32 block scales ``(nblocks,)``, de-nested when double-quantized:
        ``nested_code[q] * nested_absmax[i // 256] + offset``."""
        if not self.nested:
            return self.absmax.float()
        out = dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return out + self.offset.to(out.device).float()

    def nbytes(self) -> int:
        """Bytes held by the scales and code books (not the packed weight)."""
        ts = [self.absmax, self.code, self.offset, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy with every tensor moved to ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=mv(self.absmax), code=mv(self.code), offset=mv(self.offset),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code))


def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` to 4 bits (NF4 or FP4), block-wise absmax, optional double quantization.

    Args:
        weight: float tensor of any shape and float dtype (on any device); flattened row-major.
        blocksize: values per absmax block (64 in QLoRA; any positive even number works).
        quant_type: "nf4" (QLoRA's NormalFloat) or "fp4" (bitsandbytes' 4-bit float).
        double_quant: quantize the float32 absmax scales to 8 bits in blocks of 256 (QLoRA section 3).
    Returns:
        ``(packed, state)``: packed uint8 ``(ceil(numel/2),)`` two codes per byte, first in the high
        nibble; ``state`` a :class:`QuantState` with ``shape``/``dtype`` of ``weight``.
    Raises:
        LLMTuneError: unknown ``quant_type``, non-float or empty ``weight``, bad ``blocksize``.
    """
    if not weight.is_floating_point():
        raise LLMTuneError(f"quantize_4bit needs a floating-point weight, got {weight.dtype}.")
    if weight.numel() == 0:
        raise LLMTuneError("quantize_4bit got an empty tensor.")
    if blocksize <= 0 or blocksize % 2:
        raise LLMTuneError(f"quantization blocksize must be a positive even number, got {blocksize}.")
    code = get_4bit_code(quant_type, weight.device)
    idx, absmax = quantize_blockwise(weight, code, blocksize)
    packed = pack_4bit(idx, pad_code=int(nearest_code(torch.zeros(1, device=code.device), code)))
    state = QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code)
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map().to(weight.device)
        q8, nested_absmax = quantize_blockwise(absmax - offset, nested_code, 256)
        state.absmax = q8.to(torch.uint8)
        state.offset = offset
        state.nested_absmax = nested_absmax
        state.nested_code = nested_code
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: ``code[q_i] * absmax[i // blocksize]`` reshaped to ``state.shape``.

    Computed in float32, returned in ``dtype`` (default ``state.dtype``). Runs the Triton kernel on CUDA
    and ``llmtune.kernels.nf4.dequantize_4bit_ref`` (one gather from a 256x2 byte table, one multiply)
    on the CPU.
    """
    from llmtune.kernels import nf4 as kernels

    out = kernels.dequantize_4bit(packed, state.get_absmax().to(packed.device), state.code.to(packed.device),
                                  state.numel, state.blocksize, dtype or state.dtype)
    return out.view(state.shape)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="nf4"`` (the QLoRA default)."""
    return quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", double_quant=double_quant)


def quantize_fp4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(weight, blocksize=blocksize, quant_type="fp4", double_quant=double_quant)


def dequantize_nf4(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Alias of :func:`dequantize_4bit` (works for either ``state.quant_type``)."""
    return dequantize_4bit(packed, state, dtype)
