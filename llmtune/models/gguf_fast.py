"""A fast reader of GGUF headers (metadata and tensor table), with tensor data memory-mapped.

``gguf.GGUFReader`` builds numpy views for every part of every metadata field: for a 49k-token vocabulary that
is ~10^6 small arrays and ~10 s per process. This reader walks the same header with ``struct`` (tens of
milliseconds) and exposes what llmtune uses: ``fields[key].contents()`` and ``tensors`` (``name``,
``tensor_type``, ``shape`` (innermost dimension first, as stored), ``n_elements``, ``n_bytes``, ``data``: a
numpy view shaped as ``GGUFReader`` shapes it: ``(rows, bytes_per_row)`` uint8 for block-quantized types,
the element dtype with the logical shape otherwise). Dequantization stays with ``gguf.quants``.

Source: the GGUF specification (ggml/docs/gguf.md): little-endian; magic ``GGUF``, version (3), tensor count
(u64), metadata count (u64); each key a u64-length UTF-8 string, a u32 value type and the value (arrays: a u32
element type, a u64 count, the elements); then per tensor: name, u32 n_dims, n_dims u64 dims, u32 ggml type,
u64 offset; data starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types -> struct format (scalars)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class Field:
    """One metadata key: ``contents()`` gives the Python value (str, int, float, bool, or a list)."""

    name: str
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class TensorInfo:
    """One tensor of the table; ``data`` is a read-only numpy view into the memory-mapped file."""

    name: str
    shape: np.ndarray
    tensor_type: Any
    n_elements: int
    n_bytes: int
    data: np.ndarray
    data_offset: int


class FastGGUFReader:
    """Parse ``path``'s header; raise ``ValueError`` on a file that is not GGUF (v2/v3) or is truncated."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = str(path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mm
        self._buf = memoryview(buf)
        self._pos = 0
        if bytes(self._take(4)) != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        (version,) = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        (n_tensors,) = self._unpack("<Q")
        (n_kv,) = self._unpack("<Q")
        # GGUFReader's pseudo-fields for the header, then the metadata in file order
        self.fields: dict[str, Field] = {"GGUF.version": Field("GGUF.version", version),
                                         "GGUF.tensor_count": Field("GGUF.tensor_count", n_tensors),
                                         "GGUF.kv_count": Field("GGUF.kv_count", n_kv)}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = Field(key, self._value(vtype))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", self._buf, self._pos)
            self._pos += 8 * n_dims
            ttype, offset = self._unpack("<IQ")
            infos.append((name, dims, ttype, offset))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        self.alignment = align
        self.data_offset = (self._pos + align - 1) // align * align
        self.tensors: list[TensorInfo] = []
        for name, dims, ttype, offset in infos:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_el = int(np.prod(dims)) if dims else 1
            n_bytes = n_el * type_size // block
            start = self.data_offset + offset
            if start + n_bytes > len(buf):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated download?)")
            raw = buf[start:start + n_bytes]
            logical = tuple(int(d) for d in reversed(dims))
            np_dtype = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
                        28: np.float64}.get(ttype) if block == 1 else None
            if np_dtype is not None:
                data = raw.view(np_dtype).reshape(logical)
            else:  # block-quantized (and bf16): one row of raw bytes per output row, as GGUFReader
                data = raw.reshape(-1, int(dims[0]) * type_size // block)
            self.tensors.append(TensorInfo(name, np.array(dims, dtype=np.uint64), qtype, n_el, n_bytes, data,
                                           start))

    # -- primitive readers ----------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._buf):
            raise ValueError("unexpected end of file in the GGUF header")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._buf):
            raise ValueError("unexpected end of file in the GGUF header")
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        return bytes(self._take(n)).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._unpack("<IQ")
            if etype == _STRING:
                return [self._string() for _ in range(count)]
            if etype == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            dt = np.dtype(_NP[etype]).newbyteorder("<")
            arr = np.frombuffer(self._take(count * dt.itemsize), dtype=dt)
            return arr.tolist()
        if vtype in _SCALAR:
            (v,) = self._unpack(_SCALAR[vtype])
            return v
        raise ValueError(f"unknown GGUF value type {vtype}")
