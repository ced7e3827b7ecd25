"""Read and write bitsandbytes' serialized 4-bit linear weights (the ``*-bnb-4bit`` safetensors layout).

Format (bitsandbytes ``QuantState.as_dict(packed=True)`` and ``Params4bit``; transformers' 4-bit
``save_pretrained``), per quantized linear with prefix ``P`` (e.g. ``model.layers.0.self_attn.q_proj.``):

============================================  ==================================================================
``P.weight``                                  uint8 ``(ceil(n/2), 1)``: two 4-bit codes per byte, first value in
                                              the high nibble (another ``bnb_4bit_quant_storage`` dtype is the
                                              same bytes viewed as that dtype)
``P.weight.absmax``                           float32 ``(nblocks,)``, or uint8 ``(nblocks,)`` when nested
``P.weight.quant_map``                        float32 ``(16,)`` code book (NF4 or FP4 values)
``P.weight.nested_absmax``                    float32 ``(ceil(nblocks/256),)`` (double quantization only)
``P.weight.nested_quant_map``                 float32 ``(256,)`` dynamic map (double quantization only)
``P.weight.quant_state.bitsandbytes__nf4``    uint8 bytes of a UTF-8 JSON object: ``quant_type``, ``blocksize``,
                                              ``dtype`` (e.g. "bfloat16"), ``shape`` ([out, in]) and, when
                                              nested, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``
                                              (``__fp4`` for FP4)
``P.bias``                                    dense, when the layer has one
============================================  ==================================================================

A model checkpoint is 4-bit bitsandbytes when its ``config.json`` has ``quantization_config`` with
``quant_method == "bitsandbytes"`` and ``load_in_4bit`` (or ``_load_in_4bit``) true: see
:func:`is_bnb_4bit_config`. The loader then feeds each tensor to :class:`BnbPlacer`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import torch
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.quant.linear4bit import Linear4bit
from llmtune.quant.nf4 import QuantState

_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
             "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4", "bias")
_QS_KEY = re.compile(r"weight\.quant_state\.bitsandbytes__(nf4|fp4)$")
_PARTS = re.compile(r"^(?P<prefix>.*?)(?P<suffix>weight(?:\.(?:absmax|quant_map|nested_absmax|nested_quant_map|"
                    r"quant_state\.bitsandbytes__(?:nf4|fp4)))?|bias)$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _parse_dtype(name: Any, key: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise LLMTuneError(f"bitsandbytes quant_state {key}: unknown dtype {name!r}.")
    return dt


def is_bnb_4bit_config(cfg: dict) -> bool:
    """True when ``cfg`` (a ``config.json`` dict, or its ``quantization_config`` alone) describes a
    bitsandbytes 4-bit checkpoint: ``quant_method == "bitsandbytes"`` and ``load_in_4bit`` or
    ``_load_in_4bit`` true (transformers writes both)."""
    if not isinstance(cfg, dict):
        return False
    q = cfg.get("quantization_config", cfg)
    if not isinstance(q, dict):
        return False
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def bnb_4bit_options(cfg: dict) -> dict:
    """``{"quant_type", "double_quant", "compute_dtype"}`` read from a bitsandbytes 4-bit
    ``quantization_config`` (``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``,
    ``bnb_4bit_compute_dtype``); defaults as transformers: fp4, False, float32."""
    q = cfg.get("quantization_config", cfg)
    cd = q.get("bnb_4bit_compute_dtype") or "float32"
    return {"quant_type": q.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(q.get("bnb_4bit_use_double_quant", False)),
            "compute_dtype": _parse_dtype(cd, "bnb_4bit_compute_dtype")}


def bnb_quantization_config(quant_type: str = "nf4", double_quant: bool = True,
                            compute_dtype: torch.dtype = torch.bfloat16,
                            skip_modules: Optional[list[str]] = None) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for a 4-bit checkpoint written with
    :func:`bnb_tensors_from_linear4bit` (the keys transformers' ``BitsAndBytesConfig.to_dict()`` writes)."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules if skip_modules is not None else ["lm_head"],
        "llm_int8_threshold": 6.0,
    }


def _by_suffix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        m = _PARTS.match(k)
        if m is None:
            raise LLMTuneError(f"tensor {k!r} is not part of a bitsandbytes 4-bit linear layer (expected names ending "
                               f"in one of {', '.join(_SUFFIXES)}).")
        out[m.group("suffix")] = v
    return out


def _read_json(t: torch.Tensor, key: str) -> dict:
    try:
        return json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LLMTuneError(f"bitsandbytes tensor {key} does not hold a JSON quant state ({e}).") from None


def linear4bit_from_bnb_tensors(prefix_tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype = torch.bfloat16
                                ) -> Linear4bit:
    """Build a :class:`Linear4bit` from one layer's bitsandbytes tensors (see the module docstring).

    Args:
        prefix_tensors: the layer's tensors keyed by full checkpoint names or by the names after the
            layer prefix (``"weight"``, ``"weight.absmax"``, ..., ``"bias"``): keys are matched by suffix.
        compute_dtype: the layer's matmul/bias dtype.
    Returns:
        the layer, on the device of ``weight``; dequantizes to exactly ``quant_map[q] * absmax`` (with
        ``absmax = nested_quant_map[qa] * nested_absmax + nested_offset`` when nested).
    Raises:
        LLMTuneError: a missing tensor, a quant state that is not 2-D, or mismatched sizes.
    """
    t = _by_suffix(prefix_tensors)
    qs_keys = [k for k in t if _QS_KEY.search(k)]
    if len(qs_keys) != 1 or "weight" not in t or "weight.absmax" not in t or "weight.quant_map" not in t:
        have = ", ".join(sorted(t))
        raise LLMTuneError(f"a bitsandbytes 4-bit layer needs weight, weight.absmax, weight.quant_map and one "
                           f"weight.quant_state.bitsandbytes__nf4/fp4; got: {have}.")
    meta = _read_json(t[qs_keys[0]], qs_keys[0])
    packed = t["weight"].contiguous()
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    shape = torch.Size(int(s) for s in meta["shape"])
    state = QuantState(absmax=t["weight.absmax"].reshape(-1), shape=shape,
                       dtype=_parse_dtype(meta.get("dtype", "float32"), qs_keys[0]),
                       blocksize=int(meta["blocksize"]), quant_type=meta["quant_type"],
                       code=t["weight.quant_map"].float().reshape(-1))
    if "nested_offset" in meta or "weight.nested_absmax" in t:
        if "weight.nested_absmax" not in t or "weight.nested_quant_map" not in t:
            raise LLMTuneError(f"{qs_keys[0]} describes double quantization but weight.nested_absmax or "
                               f"weight.nested_quant_map is missing.")
        state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        state.nested_absmax = t["weight.nested_absmax"].float().reshape(-1)
        state.nested_code = t["weight.nested_quant_map"].float().reshape(-1)
        state.nested_blocksize = int(meta.get("nested_blocksize", 256))
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise LLMTuneError(f"bitsandbytes weight has {packed.numel()} bytes, its quant state shape {tuple(shape)} "
                           f"needs {(n + 1) // 2}.")
    return Linear4bit.from_quant_state(packed, state, bias=t.get("bias"), compute_dtype=compute_dtype)


def bnb_tensors_from_linear4bit(module: Linear4bit, prefix: str = "") -> dict[str, torch.Tensor]:
    """The bitsandbytes checkpoint tensors of ``module`` (inverse of :func:`linear4bit_from_bnb_tensors`).

    ``prefix`` is the module's name (``"model.layers.0.mlp.up_proj"``; a trailing dot is added). Returns
    CPU-contiguous tensors: ``weight`` uint8 ``(ceil(n/2), 1)``, ``weight.absmax``, ``weight.quant_map``,
    nested tensors when double-quantized, ``weight.quant_state.bitsandbytes__<type>`` (JSON bytes) and
    ``bias`` (in the layer's compute dtype) when present: what transformers + bitsandbytes load.
    """
    p = prefix if (not prefix or prefix.endswith(".")) else prefix + "."
    st = module.quant_state
    meta: dict[str, Any] = {"quant_type": st.quant_type, "blocksize": st.blocksize, "dtype": _dtype_name(st.dtype),
                            "shape": [int(s) for s in st.shape]}
    out = {f"{p}weight": module.weight.detach().reshape(-1, 1).cpu().contiguous(),
           f"{p}weight.absmax": st.absmax.detach().cpu().contiguous(),
           f"{p}weight.quant_map": st.code.detach().float().cpu().contiguous()}
    if st.nested:
        out[f"{p}weight.nested_absmax"] = st.nested_absmax.detach().float().cpu().contiguous()
        out[f"{p}weight.nested_quant_map"] = st.nested_code.detach().float().cpu().contiguous()
        meta.update(nested_blocksize=st.nested_blocksize, nested_dtype="float32",
                    nested_offset=float(st.offset))
    out[f"{p}weight.quant_state.bitsandbytes__{st.quant_type}"] = torch.tensor(
        list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    if module.bias is not None:
        out[f"{p}bias"] = module.bias.detach().cpu().contiguous()
    return out


class BnbPlacer:
    """Streams a bitsandbytes 4-bit checkpoint into a model: collects each layer's tensors, then replaces
    the layer's ``nn.Linear`` (meta or real) by :func:`linear4bit_from_bnb_tensors`'s ``Linear4bit``.

    Use in the loader::

        placer = BnbPlacer(model, compute_dtype)          # when is_bnb_4bit_config(config_json)
        for name, tensor in stream:
            if placer.place(name, tensor):
                continue
            ...ordinary dense copy...
        placer.finish()                                   # raises if a layer's tensors were incomplete

    ``place`` returns True for every tensor it consumed: the packed ``.weight`` (uint8, or a ``(k, 1)``
    tensor of another ``bnb_4bit_quant_storage`` dtype) and its ``weight.*`` companions, and a ``.bias``
    arriving after its layer was built. A dense ``.weight`` (e.g. ``lm_head``, embeddings, norms) and a
    bias arriving before its weight return False (the loader fills the ``nn.Linear``; the bias is kept
    when the layer is built).
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        self.model = model
        self.compute_dtype = compute_dtype
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.placed: list[str] = []

    def _module(self, prefix: str):
        parent_name, _, child = prefix.rpartition(".")
        try:
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
        except AttributeError:
            return None, None, None
        return parent, child, getattr(parent, child, None)

    def place(self, name: str, tensor: torch.Tensor) -> bool:
        """Consume ``tensor`` if it belongs to a 4-bit layer (see the class docstring); True when consumed."""
        m = _PARTS.match(name)
        if m is None:
            return False
        prefix, suffix = m.group("prefix").rstrip("."), m.group("suffix")
        parent, child, target = self._module(prefix)
        if target is None:
            return False
        if suffix == "bias":
            if isinstance(target, Linear4bit) and target.bias is not None:
                with torch.no_grad():
                    target.bias.copy_(tensor.to(target.bias.dtype))
                return True
            return False
        if suffix == "weight":
            quantized = tensor.dtype == torch.uint8 or (
                tensor.dim() == 2 and tensor.shape[1] == 1 and getattr(target, "in_features", 1) != 1)
            if not quantized:
                return False
        group = self.pending.setdefault(prefix, {})
        group[suffix] = tensor
        qs = [k for k in group if _QS_KEY.search(k)]
        need = {"weight", "weight.absmax", "weight.quant_map"}
        if not qs or not need.issubset(group):
            return True
        meta = _read_json(group[qs[0]], f"{prefix}.{qs[0]}")
        if "nested_offset" in meta and not {"weight.nested_absmax", "weight.nested_quant_map"}.issubset(group):
            return True
        tensors = dict(self.pending.pop(prefix))
        bias = getattr(target, "bias", None)
        if bias is not None:
            tensors["bias"] = (torch.zeros(bias.shape, dtype=self.compute_dtype) if bias.is_meta else bias.detach())
        layer = linear4bit_from_bnb_tensors(tensors, compute_dtype=self.compute_dtype)
        expect = (getattr(target, "out_features", None), getattr(target, "in_features", None))
        if expect != (None, None) and expect != (layer.out_features, layer.in_features):
            raise LLMTuneError(f"bitsandbytes layer {prefix} has shape {(layer.out_features, layer.in_features)}, "
                               f"the model expects {expect}: the checkpoint does not match config.json.")
        setattr(parent, child, layer)
        self.placed.append(prefix)
        return True

    def finish(self) -> None:
        """Raise :class:`LLMTuneError` naming any layer whose 4-bit tensors did not all arrive."""
        if self.pending:
            prefix, group = next(iter(self.pending.items()))
            raise LLMTuneError(f"bitsandbytes 4-bit checkpoint is incomplete: layer {prefix} has only "
                               f"{', '.join(sorted(group))} ({len(self.pending)} layer(s) incomplete); re-download "
                               f"the checkpoint.")


def bnb_placer_for(config_json: dict) -> Optional[type[BnbPlacer]]:
    """The placer class (``(model, compute_dtype) -> BnbPlacer``) for a pre-quantized bitsandbytes 4-bit
    checkpoint's ``config.json`` (``quantization_config.quant_method`` ``bitsandbytes``, 4-bit); None for a
    checkpoint quantized another way or not at all.

    Raises:
        LLMTuneError: a bitsandbytes 8-bit checkpoint (llmtune reads the 4-bit NF4/FP4 layout only).
    """
    q = config_json.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "bitsandbytes":
        return None
    if not is_bnb_4bit_config(config_json):
        raise LLMTuneError("config.json: this is a bitsandbytes 8-bit checkpoint; llmtune reads 4-bit "
                           "(NF4/FP4) bitsandbytes checkpoints only. Use the unquantized model instead")
    return BnbPlacer
