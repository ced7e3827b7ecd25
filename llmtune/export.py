"""``llmtune export``: merge LoRA adapters into the base model and write a Hugging Face folder or a GGUF file.

Flow (:func:`export`): validate the config; refuse a non-empty ``export_dir`` (unless
``overwrite_export_dir``); resolve the adapters (a comma list applied in order, or one adapter folder whose
recorded chain of parents is applied whole when it roots at the given base); load the base in float32
(full precision even for an adapter trained with QLoRA), merge every adapter in float32, cast to
``infer_dtype``; write everything into a temporary sibling folder and rename it to ``export_dir`` at the end,
so a failed export leaves nothing half-written.

Formats written:

* Hugging Face folder (:func:`save_hf_folder`): ``config.json``, ``generation_config.json`` (its
  ``eos_token_id`` list holds the template's end-of-turn token), ``model.safetensors`` or shards
  ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (``metadata.total_size``,
  ``weight_map``), the tokenizer files (with ``chat_template``). Sharding follows transformers'
  ``save_pretrained(max_shard_size=f"{export_size}GB")`` (1 GB = 10**9 bytes; a tensor larger than a shard
  gets a shard of its own). Formats: safetensors (https://github.com/huggingface/safetensors) and the
  transformers sharded-checkpoint index.
* ``export_quantization_bit: 4``: the same folder with decoder linear weights in bitsandbytes' serialized
  NF4 layout (``weight`` packed uint8, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``) and ``quantization_config`` in
  ``config.json`` (QLoRA, Dettmers et al. 2023; bitsandbytes ``Params4bit`` serialization).
* GGUF (:func:`llmtune.models.gguf_writer.write_gguf`): ``<export_dir>/model-<gguf_type>.gguf``.

An rm-stage output's ``value_head.safetensors`` (keys ``v_head.summary.weight``/``bias``) is copied beside
the merged model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from llmtune.errors import LLMTuneError, notice
from llmtune.fileio import make_public_dir, publish_dir, read_json
from llmtune.peft.io import native_key
from llmtune.ckpt_weights import apply_chain, checkpoint_kind
from llmtune.runs import read_training_args, recorded_template, resolve_chain
from llmtune.sampling import eos_id_list

#: bytes in one GB of ``export_size`` (transformers parses "5GB" as 5 * 10**9 bytes).
GB = 10**9

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: copied from the base (or the last adapter folder) into a vision-language model's export
_PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# -- sharding ------------------------------------------------------------------------------------

def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors into shards of at most ``max_shard_bytes`` (greedy, in order, as transformers does).

    Args:
        sizes: ``(name, nbytes)`` in the order to write.
        max_shard_bytes: the limit in bytes; a tensor larger than it gets a shard of its own.

    Returns:
        lists of names, one per shard (at least one shard).
    """
    shards: list[list[str]] = [[]]
    current = 0
    for name, nbytes in sizes:
        if shards[-1] and current + nbytes > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    """``["model.safetensors"]`` for one shard, else ``model-00001-of-0000n.safetensors`` (HF naming)."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _export_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors to write, HF names, tied ``lm_head.weight`` dropped; not cast here (each shard is
    cast as it is written, so the whole model is never held twice)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    rename = getattr(model, "checkpoint_name", None)   # vision-language models: the family's checkpoint layout
    return {rename(k): v for k, v in state.items()} if rename is not None else state


def _bnb4_state(model: torch.nn.Module, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors in bitsandbytes' NF4 layout: decoder-layer linear weights quantized (NF4, block 64, double
    quantization; from the weight cast to ``compute_dtype``, as transformers + bitsandbytes quantize a model
    loaded in that dtype), the rest (embeddings, norms, lm_head) in ``compute_dtype``."""
    from llmtune.quant import Linear4bit
    from llmtune.quant.bnb import bnb_tensors_from_linear4bit

    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, mod in model.named_modules():
        if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
            q = Linear4bit.from_float(mod.weight.detach().to(compute_dtype), mod.bias, compute_dtype=compute_dtype,
                                      quant_type="nf4", double_quant=True)
            out.update(bnb_tensors_from_linear4bit(q, name))
            done.update({f"{name}.weight", f"{name}.bias"})
    for name, t in _export_state(model).items():
        if name not in done:
            out[name] = t.detach().to(compute_dtype if t.is_floating_point() else t.dtype)
    return out


def _quantization_config(compute_dtype: torch.dtype) -> dict[str, Any]:
    """``config.json: quantization_config`` of a bitsandbytes NF4 checkpoint (transformers' BitsAndBytesConfig)."""
    from llmtune.quant.bnb import bnb_quantization_config

    return bnb_quantization_config("nf4", True, compute_dtype)


def save_hf_folder(model: torch.nn.Module, out_dir: Union[str, Path], *, dtype: torch.dtype = torch.bfloat16,
                   export_size: float = 5.0, tokenizer: Any = None, stop_token_ids: Iterable[int] = (),
                   quantization_bit: Optional[int] = None,
                   base_generation_config: Optional[dict] = None) -> list[Path]:
    """Write a merged model as a Hugging Face folder that transformers, vLLM and llmtune load.

    Args:
        model: a :class:`~llmtune.models.Transformer` without adapters (merged); any float dtype.
        out_dir: an existing, empty folder.
        dtype: the dtype of the written weights (float32, float16, bfloat16); with ``quantization_bit=4``
            the compute dtype (non-quantized tensors are stored in it).
        export_size: shard size in GB (10**9 bytes); LLaMA-Factory's ``export_size``.
        tokenizer: an llmtune ``Tokenizer`` (``save_pretrained(dir)``, ``bos/eos/pad_token_id``) or None.
        stop_token_ids: the template's end-of-turn ids (e.g. ``<|im_end|>``), added to the eos lists of
            ``config.json`` and ``generation_config.json``.
        quantization_bit: None, or 4 for the bitsandbytes NF4 layout (double quantization, block 64).
        base_generation_config: the base's ``generation_config.json`` dict, kept with eos ids extended.

    Returns:
        the weight files written.

    Raises:
        LLMTuneError: ``export_size`` not positive, unsupported dtype.
    """
    from llmtune.fileio import save_tensors

    out_dir = Path(out_dir)
    if not export_size or export_size <= 0:
        raise LLMTuneError(f"export_size: {export_size} must be a positive shard size in GB (e.g. 2 or 0.5)")
    if dtype not in _DTYPE_NAMES:
        raise LLMTuneError(f"infer_dtype: {dtype} cannot be exported; use float32, float16 or bfloat16")
    if quantization_bit:
        state = _bnb4_state(model, dtype)
    else:
        state = _export_state(model)

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if (t.is_floating_point() and not quantization_bit) else t.dtype

    sizes = [(n, t.numel() * torch.empty((), dtype=out_dtype(t)).element_size()) for n, t in state.items()]
    groups = plan_shards(sizes, int(export_size * GB))
    names = shard_file_names(len(groups))
    files = []
    weight_map: dict[str, str] = {}
    for group, fname in zip(groups, names):
        tensors = {n: state[n].detach().to(out_dtype(state[n])).contiguous().clone() for n in group}
        save_tensors(tensors, str(out_dir / fname), metadata={"format": "pt"})
        files.append(out_dir / fname)
        weight_map.update({n: fname for n in group})
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    cfg = model.config.to_hf_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = _DTYPE_NAMES[dtype]
    cfg.pop("dtype", None)
    stops = [int(i) for i in stop_token_ids]
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    eos = eos_id_list(tok_eos if tok_eos is not None else cfg.get("eos_token_id"), stops)
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    for key in ("bos_token_id", "pad_token_id"):
        v = getattr(tokenizer, key, None) if tokenizer is not None else None
        if v is not None:
            cfg[key] = int(v)
    if quantization_bit:
        cfg["quantization_config"] = _quantization_config(dtype)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    gen = dict(base_generation_config or {})
    gen_eos = eos_id_list(eos, gen.get("eos_token_id"))
    if gen_eos:
        gen["eos_token_id"] = gen_eos
    for key in ("bos_token_id", "pad_token_id"):
        if cfg.get(key) is not None:
            gen.setdefault(key, cfg[key])
    gen.pop("transformers_version", None)
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n",
                                                    encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return files


# -- adapters ------------------------------------------------------------------------------------

def _adapter_weights_file(folder: Path) -> Path:
    f = folder / "adapter_model.safetensors"
    if f.is_file():
        return f
    if (folder / "adapter_model.bin").is_file():
        raise LLMTuneError(f"{folder}/adapter_model.bin: pickled adapter weights are never loaded; convert it to "
                           "adapter_model.safetensors (peft: save_pretrained(safe_serialization=True))")
    raise LLMTuneError(f"{folder}: no adapter_model.safetensors; give the output folder of a LoRA training run")


def check_adapter_fits(model: torch.nn.Module, folder: Union[str, Path]) -> None:
    """Check that a PEFT LoRA adapter's tensors fit ``model`` before anything is merged.

    ``lora_A.weight`` must be ``(r, in_features)`` and ``lora_B.weight`` ``(out_features, r)`` of the target
    module named in the key (``base_model.model.<module>.lora_A.weight``, PEFT's layout); other saved
    tensors (modules_to_save, e.g. ``lm_head.weight``) must match the model's tensor shape.

    Raises:
        LLMTuneError: naming the adapter file, the key, its shape and the model's shape.
    """
    from safetensors import safe_open

    folder = Path(folder)
    file = _adapter_weights_file(folder)
    modules = dict(model.named_modules())
    params = dict(model.state_dict())
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise LLMTuneError(f"{file}: not a readable safetensors file ({e})") from None
    with handle as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = native_key(model, key)
            name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            for part in (".lora_A.", ".lora_B."):
                if part in name:
                    mod_name = name.split(part)[0]
                    mod = modules.get(mod_name)
                    if mod is None or not hasattr(mod, "in_features"):
                        raise LLMTuneError(f"{file}: tensor {key} targets module {mod_name!r}, which this model "
                                           f"({model.config.architecture}) does not have; the adapter was trained "
                                           "for a different model: pass its base as model_name_or_path")
                    want = (shape[0], mod.in_features) if part == ".lora_A." else (mod.out_features, shape[1])
                    if shape != want:
                        raise LLMTuneError(
                            f"{file}: tensor {key} has shape {list(shape)} but the module {mod_name} of the model "
                            f"needs {list(want)} (in_features={mod.in_features}, out_features={mod.out_features}); "
                            "the adapter was trained for a different model: pass its base as model_name_or_path")
                    break
            else:
                if ".lora_" in name or ".lora_magnitude_vector" in name:
                    continue
                plain = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
                if plain in params and tuple(params[plain].shape) != shape:
                    raise LLMTuneError(f"{file}: tensor {key} has shape {list(shape)} but the model's {plain} is "
                                       f"{list(params[plain].shape)}; the adapter was trained for a different model")


def merge_chain(model: torch.nn.Module, adapters: Sequence[Path]) -> torch.nn.Module:
    """Load and merge each adapter of ``adapters`` into ``model`` in order (float32 math in the model's
    dtype, which :func:`export` makes float32), each checked by :func:`check_adapter_fits` first
    (:func:`llmtune.ckpt_weights.apply_chain`).

    Returns the model with plain ``nn.Linear`` layers (no LoRA wrappers).
    """
    for i, folder in enumerate(adapters):
        if not checkpoint_kind(folder):   # a freeze/FSDP checkpoint's tensors are checked as they are laid over
            check_adapter_fits(model, folder)
        apply_chain(model, [folder], prefix=f"export{i}_")
    return model


# -- the command ---------------------------------------------------------------------------------

def _checkpoint_dtype(base: str) -> torch.dtype:
    """``infer_dtype: auto``: the base checkpoint's ``torch_dtype``; bfloat16 for a GGUF base."""
    from llmtune.models.loader import is_gguf, parse_dtype

    if is_gguf(base):
        return torch.bfloat16
    cfg_file = Path(base) / "config.json"
    name = None
    if cfg_file.is_file():
        raw = read_json(cfg_file, "model_name_or_path")
        name = raw.get("torch_dtype") or raw.get("dtype")
    return parse_dtype("auto", name)


def _has_tokenizer(path: Path) -> bool:
    if str(path).lower().endswith(".gguf"):
        return path.is_file()
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def _check_export_dir(export_dir: Path, overwrite: bool, protected: Sequence[Union[str, Path]]) -> None:
    if export_dir.exists() and not export_dir.is_dir():
        raise LLMTuneError(f"export_dir: {export_dir} is a file; give a folder path")
    for p in protected:
        pp = Path(str(p))
        if pp.exists() and (export_dir.resolve() == pp.resolve() or pp.resolve().is_relative_to(export_dir.resolve())):
            raise LLMTuneError(f"export_dir: {export_dir} holds the model or adapter being exported ({p}); "
                               "choose another folder")
    from llmtune.locks import LOCK_NAME

    if export_dir.is_dir() and any(p.name != LOCK_NAME for p in export_dir.iterdir()) and not overwrite:
        raise LLMTuneError(f"export_dir: {export_dir} already holds files; choose an empty or new folder, or pass "
                           "--overwrite_export_dir True to replace its contents")


def export(config: Any) -> Path:
    """Merge and export a model as configured; returns ``export_dir``.

    Args:
        config: a :class:`llmtune.config.TrainConfig`, a dict of LLaMA-Factory keys, a YAML path or argv words
            (anything :func:`llmtune.config.parse_config` takes). Keys used: ``model_name_or_path``,
            ``adapter_name_or_path``, ``template``, ``export_dir``, ``export_size`` (GB per shard),
            ``export_quantization_bit`` (None or 4), ``export_format`` (``safetensors`` | ``gguf``),
            ``gguf_type``, ``infer_dtype`` (``auto`` = the base's ``torch_dtype``; bfloat16 for a GGUF base),
            ``overwrite_export_dir``, ``quantization_bit`` (only noticed: export always merges into the
            full-precision base).

    Raises:
        LLMTuneError: invalid config, ``export_dir`` not empty (nothing is written), an adapter that does not
            fit the model, an unsupported format/architecture.
    """
    from llmtune.config import parse_config

    if not isinstance(config, (dict, str, Path, list, tuple)) and type(config).__name__ != "TrainConfig":
        raise LLMTuneError(f"export: expected a config dict, a YAML path or a TrainConfig, got "
                           f"{type(config).__name__} {config!r:.60}")
    cfg = parse_config(config, command="export")
    fmt = (cfg.export_format or "safetensors").lower()
    if fmt not in ("safetensors", "gguf"):
        raise LLMTuneError(f"export_format: {cfg.export_format!r} is not one of safetensors, gguf")
    if fmt == "gguf":
        from llmtune.models.gguf_writer import GGUF_TYPES

        if str(cfg.gguf_type).lower() not in GGUF_TYPES:
            from llmtune.errors import nearest

            raise LLMTuneError(f"gguf_type: {cfg.gguf_type!r} is not supported; choose one of "
                               f"{', '.join(GGUF_TYPES)}." + nearest(str(cfg.gguf_type).lower(), GGUF_TYPES))
        if str(cfg.export_dir).lower().endswith(".gguf"):
            raise LLMTuneError(f"export_dir: {cfg.export_dir} looks like a file name; export_dir is a folder, and "
                               f"the GGUF file is written in it as model-{str(cfg.gguf_type).lower()}.gguf: give "
                               "a folder name")
        if cfg.export_quantization_bit:
            raise LLMTuneError("export_quantization_bit: 4 writes the bitsandbytes safetensors layout; for a "
                               "quantized GGUF use --gguf_type q8_0, q4_0 or q4_1 instead")
    if cfg.export_size is None or cfg.export_size <= 0:
        raise LLMTuneError(f"export_size: {cfg.export_size} must be a positive shard size in GB (e.g. 2 or 0.5)")
    export_dir = Path(os.path.expanduser(cfg.export_dir))
    protected = [cfg.model_name_or_path] + [a.strip() for a in str(cfg.adapter_name_or_path or "").split(",")
                                            if a.strip()]
    _check_export_dir(export_dir, cfg.overwrite_export_dir, protected)
    from llmtune.locks import lock_output

    with lock_output(export_dir, "export_dir"):  # one export per folder at a time (llmtune.locks)
        return _export(cfg, fmt, export_dir)


def _export(cfg: Any, fmt: str, export_dir: Path) -> Path:
    from llmtune.models.loader import is_gguf, load_model, parse_dtype

    chain = resolve_chain(cfg.model_name_or_path, cfg.adapter_name_or_path)
    base, adapters = chain.base, list(chain.adapters)
    _check_export_dir(export_dir, cfg.overwrite_export_dir, [base, *adapters])
    trained_4bit = cfg.quantization_bit or any(read_training_args(a).get("quantization_bit") for a in adapters)
    if trained_4bit:
        notice("quantization_bit: export merges the adapter into the full-precision base (loaded without "
               "4-bit quantization), as LLaMA-Factory does")
    out_dtype = (_checkpoint_dtype(base) if cfg.infer_dtype in (None, "auto") else parse_dtype(cfg.infer_dtype))

    model = load_model(base, dtype=torch.float32, revision=cfg.revision)
    if adapters:
        merge_chain(model, adapters)
    model.eval()
    for name, t in model.state_dict().items():   # issue 25: a NaN in the weights was exported with exit 0
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LLMTuneError(f"export: {name} holds NaN/inf in {' + '.join(map(str, [base, *adapters]))}; "
                               "nothing is exported (export an earlier checkpoint of the run, or retrain)")

    tokenizer, stop_ids = _tokenizer_and_stops(cfg, base, adapters)

    value_head = next((a / "value_head.safetensors" for a in reversed(adapters)
                       if (a / "value_head.safetensors").is_file()), None)
    if value_head is None and Path(base).is_dir() and (Path(base) / "value_head.safetensors").is_file():
        value_head = Path(base) / "value_head.safetensors"

    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=str(export_dir.parent)))
    make_public_dir(tmp)
    try:
        if fmt == "gguf":
            _write_gguf_export(model, tmp, cfg.gguf_type, tokenizer, stop_ids, base, name=export_dir.name)
        else:
            base_gen = None
            for folder in [*reversed(adapters), Path(base)]:
                if folder.is_dir() and (folder / "generation_config.json").is_file():
                    base_gen = read_json(folder / "generation_config.json", "generation_config.json")
                    break
            save_hf_folder(model, tmp, dtype=out_dtype, export_size=float(cfg.export_size), tokenizer=tokenizer,
                           stop_token_ids=stop_ids, quantization_bit=cfg.export_quantization_bit,
                           base_generation_config=base_gen)
        if fmt != "gguf" and getattr(model.config, "vision", None):   # the image processor's settings
            for name in _PROCESSOR_FILES:
                src = next((f / name for f in [*reversed(adapters), Path(base)] if (f / name).is_file()), None)
                if src is not None:
                    shutil.copyfile(src, tmp / name)
        if value_head is not None:
            shutil.copyfile(value_head, tmp / "value_head.safetensors")
            notice(f"copied the reward model's value head {value_head} into {export_dir}")
        _move_into_place(tmp, export_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return export_dir


def _tokenizer_and_stops(cfg: Any, base: str, adapters: Sequence[Path]) -> tuple[Any, list[int]]:
    """The tokenizer to ship (the last adapter folder's, else the base's) and the template's stop ids."""
    source = next((a for a in reversed(adapters) if _has_tokenizer(a)), None) or Path(base)
    if not _has_tokenizer(Path(source)):
        notice(f"no tokenizer files found in {source}; the export has no tokenizer")
        return None, []
    from llmtune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(source))
    name = cfg.template or recorded_template(*reversed(adapters))
    from llmtune.data.templates import get_template

    template = get_template(name, tokenizer)
    return tokenizer, list(template.stop_token_ids)


def _write_gguf_export(model: torch.nn.Module, out_dir: Path, gguf_type: str, tokenizer: Any,
                       stop_ids: Sequence[int], base: str, name: Optional[str] = None) -> Path:
    from llmtune.models.gguf_writer import write_gguf

    tok_json, pre, add_bos = None, "default", None
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as d:
            tokenizer.save_pretrained(d)
            if (Path(d) / "tokenizer.json").is_file():
                tok_json = json.loads((Path(d) / "tokenizer.json").read_text(encoding="utf-8"))
            tcfg = Path(d) / "tokenizer_config.json"
            if tcfg.is_file():
                add_bos = json.loads(tcfg.read_text(encoding="utf-8")).get("add_bos_token")
    if str(base).lower().endswith(".gguf"):
        from llmtune.models.gguf import read_gguf_metadata

        meta = read_gguf_metadata(base)
        pre = meta.get("tokenizer.ggml.pre", pre)
        if add_bos is None:
            add_bos = meta.get("tokenizer.ggml.add_bos_token")
    elif tok_json is not None:
        notice("GGUF export: the llama.cpp pre-tokenizer name is unknown for a Hugging Face tokenizer; writing "
               "tokenizer.ggml.pre = 'default' (llama.cpp's convert_hf_to_gguf.py picks it by hashing)")
    stops = list(stop_ids)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else model.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    path = out_dir / f"model-{str(gguf_type).lower()}.gguf"
    write_gguf(model, path, gguf_type, tokenizer_json=tok_json,
               chat_template=getattr(tokenizer, "chat_template", None) if tokenizer is not None else None,
               bos_token_id=getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None,
               eos_token_id=eos,
               pad_token_id=getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None,
               eot_token_ids=stops, add_bos_token=add_bos, tokenizer_pre=pre, name=name or out_dir.name)
    return path


#: file names (glob patterns) an export of ours writes; ``overwrite_export_dir`` replaces only these
EXPORT_OUTPUTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "model-*.gguf",
                  "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "value_head.safetensors")


def _move_into_place(tmp: Path, export_dir: Path) -> None:
    """Publish the finished temporary folder as ``export_dir`` (:func:`llmtune.fileio.publish_dir`): a rename
    when ``export_dir`` is new; when overwriting, each new file is renamed in and the earlier export's files
    that the new one does not have (e.g. other shards, :data:`EXPORT_OUTPUTS`) are removed; any other file
    (and the folder's lock) is kept."""
    from llmtune.locks import LOCK_NAME

    publish_dir(tmp, export_dir, replace_only=EXPORT_OUTPUTS, keep=(LOCK_NAME,))


def main(argv: Optional[list[str]] = None) -> int:
    """``llmtune export [config.yaml] [--key value ...]``: run :func:`export`; returns the exit status (0).

    Raises:
        LLMTuneError: as :func:`export` (the CLI prints it as one line and exits 2).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    out = export(argv)
    print(f"llmtune: exported to {out}", file=sys.stderr)
    return 0


__all__ = ["export", "main", "save_hf_folder", "plan_shards", "shard_file_names",
           "check_adapter_fits", "merge_chain", "GB"]


class _CallableModule(__import__("types").ModuleType):
    """Makes ``llmtune.export(config)`` work even after ``import llmtune.export`` has bound the attribute
    ``llmtune.export`` to this module (Python binds a package's submodules as attributes on import)."""

    def __call__(self, config: Any) -> Path:
        return export(config)


__import__("sys").modules[__name__].__class__ = _CallableModule
