"""Read and write LoRA adapters in PEFT's on-disk format.

An adapter folder holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields: ``peft_type: "LORA"``,
``r``, ``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` ``(r, in)``, ``...lora_B.weight`` ``(out, r)``,
``...lora_magnitude_vector`` ``(out,)`` (DoRA) and ``base_model.model.<path>.<param>`` for
``modules_to_save``. Source: PEFT's ``PeftModel.save_pretrained`` / ``LoraConfig`` (peft 0.x), checked
against files written by peft itself in ``tests/test_lora_peft.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from llmtune.errors import LLMTuneError
from llmtune.peft.adapters import (PEFT_PREFIX, adapter_parameters, adapter_targets, inject_lora, list_adapters,
                                   lora_state_dict)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Fields of PEFT's LoraConfig whose only supported value here is the default: anything else is refused when
# reading. The first ones are also written into every adapter_config.json (fields older PEFT versions know).
_WRITTEN_DEFAULTS: dict[str, Any] = {
    "bias": "none",
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
}
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    **_WRITTEN_DEFAULTS,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "exclude_modules": None,
}


def native_key(model: nn.Module, key: str) -> str:
    """An adapter file's tensor key (``base_model.model.<module>.<tensor>``) in ``model``'s own module names: a
    model with ``native_module_name`` (:class:`llmtune.models.qwen_vl.QwenVL`, whose adapters are written in
    transformers' layout ``model.language_model.*`` / ``model.visual.*``) maps it; other keys are unchanged."""
    native = getattr(model, "native_module_name", None)
    if native is None or not key.startswith(PEFT_PREFIX):
        return key
    return PEFT_PREFIX + native(key[len(PEFT_PREFIX):])


def _base_path(base_model_name_or_path: Optional[str]) -> Optional[str]:
    if base_model_name_or_path is None:
        return None
    p = Path(str(base_model_name_or_path)).expanduser()
    return str(p.resolve()) if p.exists() else str(base_model_name_or_path)


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: Optional[str],
                 adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``out_dir`` in PEFT's format.

    Args:
        model: a model with the adapter (see :func:`llmtune.peft.apply_lora`).
        out_dir: folder to write (created if needed); ``adapter_config.json`` and
            ``adapter_model.safetensors`` in it are replaced.
        base_model_name_or_path: the base model; a local path is recorded as an absolute path (so
            ``chat``/``export``/chained stages find the base from anywhere), a Hub id as given.
        adapter_name: which adapter.

    ``adapter_config.json`` holds PEFT's ``LoraConfig`` fields only (peft warns about any other key); llmtune's
    own record of a run goes beside it in ``llmtune.json`` (:mod:`llmtune.runs`).

    A model with ``peft_module_name`` (:class:`llmtune.models.qwen_vl.QwenVL`) has its keys written in that
    layout (transformers' module names, so peft loads the folder onto transformers' model).

    Returns:
        ``Path(out_dir)``. Tensors are saved contiguous in their current dtype (float32 when upcast).

    Raises:
        LLMTuneError: unknown adapter name.
    """
    from llmtune.fileio import save_tensors

    if adapter_name not in list_adapters(model):
        raise LLMTuneError(f"save_adapter: no adapter named {adapter_name!r}; the model has: "
                           f"{', '.join(list_adapters(model)) or 'none'}")
    cfg = (getattr(model, "lora_config", None) or {}).get(adapter_name)
    if cfg is None:
        raise LLMTuneError(f"save_adapter: adapter {adapter_name!r} has no recorded config (was it added by "
                           "apply_lora or load_adapter?)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rename = getattr(model, "peft_module_name", None) or (lambda name: name)
    tensors = {PEFT_PREFIX + rename(k[len(PEFT_PREFIX):]): v.detach().to("cpu").contiguous().clone()
               for k, v in lora_state_dict(model, adapter_name).items()}
    target = cfg["target_modules"]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_path(base_model_name_or_path),
        "revision": None,
        "inference_mode": True,
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"],
        "target_modules": target if isinstance(target, str) else list(target),
        "use_rslora": cfg["use_rslora"],
        "use_dora": cfg["use_dora"],
        "modules_to_save": cfg["modules_to_save"],
        "init_lora_weights": True,
        **_WRITTEN_DEFAULTS,
    }
    save_tensors(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The parsed ``adapter_config.json`` of ``adapter_dir``.

    Raises:
        LLMTuneError: the folder or the file is missing, it is not JSON, or it is not a LoRA adapter.
    """
    d = Path(adapter_dir)
    path = d / CONFIG_NAME
    if not d.is_dir():
        raise LLMTuneError(f"adapter folder {d} does not exist")
    if not path.is_file():
        raise LLMTuneError(f"{d} is not an adapter folder: it has no {CONFIG_NAME}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LLMTuneError(f"{path}: not valid JSON ({e})") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise LLMTuneError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (peft_type LORA) "
                           "are supported")
    return cfg


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT-format LoRA adapter (written by :func:`save_adapter` or by peft) into ``model``.

    The adapter becomes the active one. ``is_trainable=False``: its parameters are frozen and the
    base's ``requires_grad`` flags are left alone (the loader merges it next). ``is_trainable=True``
    (resume training): the adapter is trainable (float32 when the base is half precision) and everything
    else frozen, as :func:`llmtune.peft.apply_lora` does.

    Returns ``model``.

    Raises:
        LLMTuneError: missing folder/files, a pickle-only ``adapter_model.bin``, a LoRA variant not
            supported here (bias, rank_pattern, ...), a target module absent from the model, a missing
            or unexpected tensor, or a shape mismatch (naming the folder, the key and both shapes).
    """
    from safetensors import safe_open

    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        if (d / "adapter_model.bin").is_file():
            raise LLMTuneError(f"{d}: only adapter_model.bin (a pickle) is present; llmtune never unpickles. "
                               "Convert it to adapter_model.safetensors with peft (save_pretrained with "
                               "safe_serialization=True)")
        raise LLMTuneError(f"{d}: missing {WEIGHTS_NAME}")
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        value = cfg.get(key, default)
        if value not in (default, None) and not (isinstance(default, dict) and not value):
            raise LLMTuneError(f"{d / CONFIG_NAME}: {key}={value!r} is not supported by llmtune's LoRA "
                               f"(supported: {default!r})")
    target = cfg.get("target_modules")
    if target is None:
        raise LLMTuneError(f"{d / CONFIG_NAME}: target_modules is missing")
    regex = isinstance(target, str) and target not in ("all-linear",)
    dtype = None
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if is_trainable and ref is not None and ref.dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    try:
        inject_lora(model, lora_rank=int(cfg.get("r", 8)), lora_alpha=cfg.get("lora_alpha", 8),
                    lora_dropout=float(cfg.get("lora_dropout") or 0.0), lora_target=target,
                    use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
                    adapter_name=adapter_name, additional_target=cfg.get("modules_to_save"), dtype=dtype,
                    regex=regex)
    except LLMTuneError as e:
        raise LLMTuneError(f"adapter {d}: {e}") from None
    model.lora_config[adapter_name]["base_model_name_or_path"] = cfg.get("base_model_name_or_path")
    params = adapter_targets(model, adapter_name)
    seen = set()
    try:
        handle = safe_open(str(weights), framework="pt")
    except Exception as e:  # noqa: BLE001 - a truncated or damaged file: one line naming it
        raise LLMTuneError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0][:160]}); copy the "
                           "adapter again or retrain it") from None
    with handle as f:
        for key in f.keys():
            name = native_key(model, key)
            if name not in params:
                # peft writes no adapter name, but tolerate ".<adapter>." forms from hand-made files
                name = name.replace(f".{adapter_name}.", ".").replace(".default.", ".")
                if name.endswith("lora_magnitude_vector.weight"):
                    name = name[: -len(".weight")]
            if name not in params:
                raise LLMTuneError(f"adapter {d}: tensor {key!r} in {WEIGHTS_NAME} has no matching module in "
                                   "the model: was this adapter trained on another base model?")
            t = f.get_tensor(key)
            p = params[name]
            if tuple(t.shape) != tuple(p.shape):
                raise LLMTuneError(f"adapter {d}: {key} has shape {tuple(t.shape)} in {WEIGHTS_NAME} but the "
                                   f"model expects {tuple(p.shape)}: the adapter was trained on a different "
                                   "base model (or adapter_config.json's r does not match the file)")
            with torch.no_grad():
                p.copy_(t.to(p.dtype))
            seen.add(name)
    missing = [k for k in params if k not in seen]
    if missing:
        raise LLMTuneError(f"adapter {d}: {WEIGHTS_NAME} lacks {len(missing)} tensor(s) the config implies, "
                           f"e.g. {missing[0]!r}")
    if is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    for p in adapter_parameters(model, adapter_name):
        p.requires_grad_(bool(is_trainable))
    return model
