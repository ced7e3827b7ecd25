"""Load a :class:`~llmtune.models.transformer.Transformer`'s weights from a Hugging Face folder, Hub id or GGUF
file. Adapters are not this module's business: :func:`llmtune.runs.load_model` resolves a LoRA output folder's
chain and merges it (``llmtune.load_model`` is that function).

One pass per source format: a GGUF file (:func:`llmtune.models.gguf.gguf_source`) or a model folder
(:func:`llmtune.models.folder.folder_source`) gives a :class:`~llmtune.models.config.CheckpointSource` (config,
tensor shapes, tensor stream), which :func:`load_model` checks against the model and streams in.

Streaming load: the model is built on the ``meta`` device (no memory), then each parameter is replaced
by the checkpoint tensor as it arrives from a memory-mapped safetensors file (or a dequantized GGUF
tensor), cast to the target dtype on the way; peak memory is the final model plus about one tensor.
With ``quantization_bit=4`` every tensor is first offered to ``llmtune.quant.place_quantized``.

Formats: safetensors (https://github.com/huggingface/safetensors, header + raw little-endian data),
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file), GGUF (see
:mod:`llmtune.models.gguf`).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from llmtune.errors import LLMTuneError, notice
from llmtune.models.config import CheckpointSource, ModelConfig
from llmtune.models.folder import folder_source, iter_safetensors   # (iter_safetensors: re-exported)
from llmtune.models.gguf import gguf_source
from llmtune.models.hub import is_hub_id, resolve_path
from llmtune.models.qwen_vl import QwenVL, native_name
from llmtune.models.transformer import Transformer, rope_inv_freq

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, checkpoint_dtype: str | None = None) -> torch.dtype:
    """``torch.dtype`` from a name (``float32|fp32|bfloat16|bf16|float16|fp16|auto``) or a ``torch.dtype``.

    ``"auto"`` (or ``None``) is ``checkpoint_dtype`` (config.json ``torch_dtype``), float32 when absent.

    Raises:
        LLMTuneError: an unknown name or a non-floating torch dtype.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise LLMTuneError(f"dtype {dtype}: not a floating-point dtype (use float32, bfloat16 or float16)")
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        name = str(checkpoint_dtype or "float32").replace("torch.", "").lower()
        return _DTYPES.get(name, torch.float32)
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        from llmtune.errors import nearest

        raise LLMTuneError(f"dtype {dtype!r} is not known; use one of auto, float32, bfloat16 (bf16), "
                           f"float16 (fp16).{nearest(key, list(_DTYPES) + ['auto'])}")
    return _DTYPES[key]


# -- the loader ------------------------------------------------------------------------------------

_BNB_COMPANION = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$")
_LAYER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def _check_tensors(model: Transformer, found: dict[str, tuple[tuple[int, ...], Path]], source: str,
                   bnb_4bit: bool = False) -> None:
    """Raise one :class:`LLMTuneError` listing missing, unexpected and wrongly shaped tensors.

    With ``bnb_4bit`` (a bitsandbytes 4-bit checkpoint) the packed decoder-layer linear weights and their
    ``weight.absmax/quant_map/...`` companions are exempt from the shape check.
    """
    if bnb_4bit:
        found = {n: (() if _LAYER_LINEAR.match(n) else v[0], v[1]) for n, v in found.items()
                 if not _BNB_COMPANION.search(n)}
    expected = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    if bnb_4bit:
        expected = {n: (() if _LAYER_LINEAR.match(n) else shape) for n, shape in expected.items()}
    tied = model.config.tie_word_embeddings
    missing = [n for n in expected if n not in found and not (tied and n == "lm_head.weight")]
    unexpected = [n for n in found if n not in expected and not n.endswith("rotary_emb.inv_freq")]
    wrong = [f"{n} {found[n][0]} (model expects {expected[n]})" for n in expected
             if n in found and found[n][0] != expected[n]]
    if missing or unexpected or wrong:
        parts = []

        def _list(xs):
            return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")

        if missing:
            parts.append(f"missing tensors: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_list(unexpected)}")
        if wrong:
            parts.append(f"wrongly shaped tensors: {_list(wrong)}")
        raise LLMTuneError(f"{source}: the checkpoint does not match its config.json: " + "; ".join(parts)
                           + ". The checkpoint is incomplete or belongs to another model configuration")


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))


def _quant_hook():
    try:
        from llmtune.quant import place_quantized
    except ImportError:
        raise LLMTuneError("quantization_bit: 4-bit quantization is not available in this llmtune install "
                           "(llmtune.quant.place_quantized is missing); load without quantization_bit") from None
    return place_quantized


@contextlib.contextmanager
def _no_init():
    """Skip ``torch.nn.init`` while a model is built on the ``meta`` device: there are no values to fill, and
    the meta ``normal_`` goes through a reference implementation that imports ``torch._dynamo`` (1.5 s of
    every load on the CPU). The same idea as ``accelerate.init_empty_weights``."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LLMTuneError(f"device {device!r} is not a valid torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        notice(f"device {device!r} does not exist on this machine; using the CPU")
        return torch.device("cpu")
    return dev


def _stream_into_model(source: CheckpointSource, path: Path, dtype, device: torch.device,
                       quantize: tuple | None) -> Transformer:
    """Build the model of ``source`` (its :class:`ModelConfig`) on the meta device, check the checkpoint's
    tensors against it, then fill it tensor by tensor (cast to the dtype, quantized, or placed by a
    bitsandbytes placer) on ``device``."""
    config, bnb_4bit = ModelConfig.from_hf_dict(source.hf_config, source=source.config_name), source.placer
    with torch.device("meta"), _no_init():
        model = QwenVL(config) if config.vision else Transformer(config)
    found = source.shapes
    if config.vision:   # checkpoints in transformers' model.language_model.* / model.visual.* layout
        found = {native_name(n): v for n, v in found.items()}
    _check_tensors(model, found, source.name, bnb_4bit=bnb_4bit is not None)
    target = parse_dtype(dtype, config.torch_dtype)   # "auto": the checkpoint's dtype
    place_quantized = _quant_hook() if quantize else None
    placer = bnb_4bit(model, target) if bnb_4bit is not None else None
    tied = config.tie_word_embeddings
    # as_is: the checkpoint's tensors become the weights (a memory map, no copy); not for mixture-of-experts
    # models, whose per-expert tensors are copied into stacked weights: their mapped pages would stay resident
    # beside the copies (a 2-layer Qwen3-MoE benchmark model: peak RSS 1642 -> 2191 MiB)
    as_is = placer is None and place_quantized is None and device.type == "cpu" and source.mapped is not None \
        and not config.num_experts
    for name, tensor in (source.mapped(target) if as_is else source.tensors()):   # as_is: no copy (mapped)
        name = native_name(name) if config.vision else name
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if placer is not None and placer.place(name, tensor.to(device)):
            continue
        if place_quantized is not None and place_quantized(model, name, tensor.to(device), target, *quantize):
            continue
        _set_tensor(model, name, tensor.to(device=device, dtype=target))
        del tensor
    if placer is not None:
        placer.finish()
    model.tie_weights()
    model.inv_freq = rope_inv_freq(config).to(device)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise LLMTuneError(f"{source.name}: tensors were not loaded: {', '.join(left[:8])}")
    model.name_or_path = str(path)
    if source.release is not None:
        source.release()
    return model


def check_quantization(quantization_bit: int | None, quantization_type: str = "nf4") -> None:
    """Refuse quantization settings the loader cannot honour.

    Raises:
        LLMTuneError: ``quantization_bit`` other than None/4, or ``quantization_type`` other than nf4/fp4.
    """
    if quantization_bit is not None and int(quantization_bit) != 4:
        raise LLMTuneError(f"quantization_bit {quantization_bit}: only 4-bit quantization (NF4/FP4, QLoRA) is "
                           "supported; use quantization_bit: 4 or leave it unset")
    if quantization_type not in ("nf4", "fp4"):
        raise LLMTuneError(f"quantization_type {quantization_type!r}: use nf4 or fp4")


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", revision: str | None = None, quantization_bit: int | None = None,
               quantization_type: str = "nf4", double_quantization: bool = True) -> Transformer:
    """Load a causal LM's weights as an llmtune :class:`Transformer` (Llama, Mistral, Qwen2, Qwen3).

    Args:
        name_or_path: a local folder (``config.json`` + ``model.safetensors`` or shards with
            ``model.safetensors.index.json``), a Hub repo id (downloaded with ``snapshot_download``), or a
            ``.gguf`` file (llama architecture; dequantized). A LoRA output folder is
            :func:`llmtune.runs.load_model`'s (it merges the adapter chain).
        dtype: ``torch.dtype`` or name: ``auto`` (config.json ``torch_dtype``; float32 for GGUF),
            ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``. Parameters are cast as loaded.
        device: where parameters live (``cpu``, ``cuda``, ``cuda:N``; a missing GPU falls back to the CPU
            with a notice).
        revision: Hub revision (branch, tag, commit) for a Hub id.
        quantization_bit: ``None`` or ``4`` (QLoRA NF4/FP4 via ``llmtune.quant.place_quantized``).
        quantization_type: ``nf4`` or ``fp4``.
        double_quantization: quantize the absmax scales too (QLoRA's double quantization).

    Returns:
        the model in eval mode, with ``model.name_or_path`` the resolved local path (folder or .gguf file).

    Raises:
        LLMTuneError: missing path / Hub download failure; a LoRA output folder; folder with only pickled
            weights; corrupt or truncated safetensors; missing, unexpected or wrongly shaped tensors;
            unsupported architecture; unknown dtype; unsupported quantization settings.
    """
    check_quantization(quantization_bit, quantization_type)
    if not isinstance(dtype, torch.dtype) and dtype is not None:
        parse_dtype(dtype)  # fail early on an unknown name, before any download
    dev = _resolve_device(device)
    quantize = (quantization_type, bool(double_quantization)) if quantization_bit else None
    path = resolve_path(name_or_path, revision)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise LLMTuneError(f"{name_or_path} is a LoRA output folder (adapter_config.json, no config.json); load "
                           "it with llmtune.load_model (llmtune.runs.load_model), which merges its adapter chain")
    if path.is_file() and path.suffix == ".gguf":   # one pass per source format
        source = gguf_source(path)
    elif path.is_dir():
        source = folder_source(path)
    else:
        raise LLMTuneError(f"model_name_or_path {str(path)!r}: a file that is not a .gguf model; give a model "
                           "folder (config.json + safetensors) or a .gguf file")
    model = _stream_into_model(source, path, dtype, dev, quantize)
    model.eval()
    return model


def quantize_model(model: Transformer, compute_dtype: torch.dtype, quantization_type: str = "nf4",
                   double_quantization: bool = True) -> Transformer:
    """Quantize a loaded model's decoder-layer linear weights in place (``llmtune.quant.place_quantized`` on
    every parameter, as the streaming load does); returns ``model``.

    Raises:
        LLMTuneError: 4-bit quantization is not available in this install.
    """
    place_quantized = _quant_hook()
    for name, p in list(model.named_parameters()):
        place_quantized(model, name, p.detach(), compute_dtype, quantization_type, bool(double_quantization))
    return model


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` names a ``.gguf`` file."""
    return str(name_or_path).lower().endswith(".gguf")


__all__ = ["load_model", "check_quantization", "quantize_model", "parse_dtype", "is_hub_id", "is_gguf",
           "iter_safetensors"]
