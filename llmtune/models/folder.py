"""A Hugging Face model folder as a checkpoint source: ``config.json`` and safetensors weights, read in one
pass by :func:`folder_source` for :func:`llmtune.models.loader.load_model`.

Formats: safetensors (https://github.com/huggingface/safetensors: an 8-byte little-endian header length, a JSON
header, then the raw little-endian tensor data), ``model.safetensors.index.json`` (``weight_map``: tensor name
-> shard file), Hugging Face ``config.json`` (``quantization_config`` of a bitsandbytes 4-bit checkpoint).
"""

from __future__ import annotations

import functools
import json
import mmap
from pathlib import Path
from typing import Iterator

import torch

from llmtune.errors import LLMTuneError
from llmtune.fileio import read_json
from llmtune.models.config import CheckpointSource


def folder_source(path: Path) -> CheckpointSource:
    """The checkpoint of a model folder: its ``config.json``, every tensor's shape (from
    the safetensors headers), a reader that streams the tensors one at a time, and, for a pre-quantized
    bitsandbytes 4-bit checkpoint, the factory of its placer.

    Raises:
        LLMTuneError: no ``config.json``; no safetensors weights (pickled ones are refused); a malformed or
            truncated safetensors file or shard index; a ``config.json`` that is not a JSON object; a
            bitsandbytes 8-bit checkpoint.
    """
    if not (path / "config.json").is_file():
        raise LLMTuneError(f"{path}: no config.json; a model folder needs config.json and safetensors "
                           "weights (or pass a .gguf file, or a LoRA output folder with adapter_config.json)")
    files = _safetensors_files(path)
    shapes, tensors = _safetensors_shapes(files), functools.partial(iter_safetensors, files)
    hf_config = read_json(path / "config.json", fix="copy config.json again from the model")
    placer = None
    if isinstance(hf_config.get("quantization_config"), dict):   # (llmtune.quant loads for such folders only)
        from llmtune.quant.bnb import bnb_placer_for

        placer = bnb_placer_for(hf_config)   # a pre-quantized bitsandbytes 4-bit checkpoint (*-bnb-4bit)
    return CheckpointSource(hf_config, str(path / "config.json"), shapes, tensors, str(path), placer=placer,
                            mapped=functools.partial(iter_safetensors, files))


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a model folder (from the shard index when there is one)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise LLMTuneError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LLMTuneError(f"{index} lists shard files that are missing: {', '.join(missing)}; "
                               "download the complete checkpoint")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("adapter_model"))
    if files:
        return files
    pickled = sorted(f.name for f in folder.iterdir()
                     if f.suffix in (".bin", ".pt", ".pth", ".ckpt") or f.name.endswith(".bin.index.json"))
    if pickled:
        raise LLMTuneError(
            f"{folder}: holds only pickled weights ({', '.join(pickled[:3])}); llmtune never unpickles "
            "files (they can run arbitrary code). Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out_folder, safe_serialization=True)")
    raise LLMTuneError(f"{folder}: no model.safetensors (or sharded *.safetensors with "
                       "model.safetensors.index.json) found; is this a model folder?")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_safetensors_header(file: Path) -> tuple[dict, int]:
    """Parse a safetensors header: ``({name: {dtype, shape, data_offsets}}, data_start)``.

    Format (safetensors spec): 8-byte little-endian header length N, N bytes of JSON, then the raw
    little-endian tensor data; ``data_offsets`` are ``[begin, end)`` byte offsets into that data.

    Raises:
        LLMTuneError: unreadable, malformed or truncated file (named).
    """
    bad = (f"{file}: not a valid safetensors file (%s); the download is probably incomplete or corrupt: "
           "download it again")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LLMTuneError(bad % "file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                raise LLMTuneError(bad % f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise LLMTuneError(f"{file}: cannot be read ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LLMTuneError(bad % "header is not JSON") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype = _ST_DTYPES[info["dtype"]]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise LLMTuneError(bad % f"tensor {name!r} has a malformed entry") from None
        if end - begin != numel * dtype.itemsize:
            raise LLMTuneError(bad % f"tensor {name!r} has {end - begin} bytes for shape {info['shape']}")
        if data_start + end > size:
            raise LLMTuneError(bad % f"truncated: tensor {name!r} ends at byte {data_start + end}, the file "
                               f"has {size}")
    return header, data_start


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        header, _ = _read_safetensors_header(file)
        for name, info in header.items():
            out[name] = (tuple(int(d) for d in info["shape"]), file)
    return out


def iter_safetensors(files: list[Path], mapped_dtype: torch.dtype | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in file order, each read with one ``readinto`` into a fresh CPU tensor.

    Plain reads instead of a memory map: mapped file pages would count in the process's resident memory
    until the file is closed, so peak RSS would be model + whole checkpoint instead of model + one tensor.
    That holds where the loader casts (or quantizes) what it reads. With ``mapped_dtype`` (the loader's target
    dtype on the CPU, no quantization), a file whose tensors all have that dtype, at offsets aligned to it, is
    memory-mapped copy-on-write (``mmap.ACCESS_COPY``: a write, e.g. a full fine-tuning step or a merge, copies
    that page for this process and never reaches the file) and its tensors are views of the mapping, kept as
    the model's weights: no copy and no fresh zeroed pages (a 269 MB bfloat16 checkpoint: 0.17 s of reads ->
    0.002 s, the pages then come in on first use from the page cache). The mapping lives as long as any
    tensor viewing it.
    """
    for file in files:
        header, data_start = _read_safetensors_header(file)
        order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        if mapped_dtype is not None and order and all(
                _ST_DTYPES[info["dtype"]] == mapped_dtype
                and (data_start + info["data_offsets"][0]) % mapped_dtype.itemsize == 0 for _, info in order):
            yield from _mapped_tensors(file, order, data_start, mapped_dtype)
            continue
        with open(file, "rb") as f:
            for name, info in order:
                begin, end = info["data_offsets"]
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(data_start + begin)
                if f.readinto(memoryview(buf.numpy())) != end - begin:
                    raise LLMTuneError(f"{file}: tensor {name!r} is truncated; download the file again")
                dtype = _ST_DTYPES[info["dtype"]]
                yield name, buf.view(dtype).reshape([int(d) for d in info["shape"]])


def _mapped_tensors(file: Path, order: list, data_start: int, dtype: torch.dtype
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file (``order``: its header items by offset, all of ``dtype``) as views
    of a copy-on-write memory map of it (:func:`iter_safetensors`); sizes were checked against the file by
    :func:`_read_safetensors_header`."""
    try:
        with open(file, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise LLMTuneError(f"{file}: cannot be read ({e})") from None
    for name, info in order:
        begin, end = info["data_offsets"]
        shape = [int(d) for d in info["shape"]]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        yield name, torch.frombuffer(mapping, dtype=dtype, count=count, offset=data_start + begin).view(shape)
