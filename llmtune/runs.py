"""Run folders: what an llmtune output folder records, and which adapters apply to which base.

An llmtune output folder describes itself (DESIGN.md, "Outputs describe themselves"):

* ``training_args.yaml``: the run's full config, with the template actually used;
* ``llmtune.json``: ``llmtune_version``, ``stage``, ``finetuning_type``, ``template``,
  ``base_model_name_or_path`` (the root base actually loaded, absolute) and ``parent_adapters`` (the adapter
  folders merged into it before this run, root first, absolute): llmtune's own record, kept OUT of PEFT's
  ``adapter_config.json`` so that peft reads our adapters without warnings. Folders written before this
  record existed carry the parents as ``llmtune_parent_adapters`` in ``adapter_config.json``; it is still read;
* for a LoRA run, the adapter in PEFT's format (``adapter_config.json`` with ``base_model_name_or_path``).

An **adapter chain** (:class:`AdapterChain`) is a base model plus the adapters to merge into it, in order.
:func:`resolve_chain` decides it from ``model_name_or_path`` and ``adapter_name_or_path`` for every command
(train, chat, export, the reference and reward models); :func:`load_model` loads the base weights
(:func:`llmtune.models.loader.load_model`) and merges the chain (:func:`llmtune.ckpt_weights.apply_chain`), and
records on the model the chain it applied (``model.adapter_chain``), which a training run then writes into
``llmtune.json``.

Two bases are the same base when they are the same path or hold the same weights (:func:`llmtune.fileio.same_base`:
a SHA-256 of the weight files' bytes; for a ``.gguf`` file its first 16 MiB and its size; cached per process).

Formats: PEFT's ``adapter_config.json`` (``base_model_name_or_path``); YAML for ``training_args.yaml``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import yaml

from llmtune import __version__, ckpt_weights
# apply_chain, same_base and base_fingerprint are re-exported: callers import them from here too
from llmtune.ckpt_weights import apply_chain
from llmtune.errors import LLMTuneError, notice
from llmtune.fileio import base_fingerprint, read_json, same_base, same_path, write_json
from llmtune.models import loader
from llmtune.models.hub import is_hub_id, resolve_path
from llmtune.sampling import eos_id_list

ADAPTER_CONFIG = "adapter_config.json"
RUN_RECORD = "llmtune.json"
TRAINING_ARGS = "training_args.yaml"
#: where folders written by earlier llmtune versions recorded the parent adapters (in ``adapter_config.json``)
LEGACY_PARENTS_KEY = "llmtune_parent_adapters"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class AdapterChain:
    """A base model and the LoRA adapters merged into it, in order.

    Attributes:
        base: the root base model: an absolute local path (folder or ``.gguf`` file), or a Hub id.
        adapters: absolute adapter folders, root first (empty: the base alone).
        local_base: where ``base`` is on this machine when :func:`resolve_chain` knows it (a local path, or the
            snapshot of a Hub model it downloaded); None for a Hub id recorded by an adapter (the loader
            downloads it). Not part of the chain's identity (equality ignores it).
        template: the template recorded by the last run of the chain (:func:`recorded_template` of the last
            adapter first, then the model given), or None; set by :func:`resolve_chain`. Not part of the
            chain's identity.
    """

    base: str
    adapters: tuple[Path, ...] = ()
    local_base: Optional[Path] = field(default=None, compare=False, repr=False)
    template: Optional[str] = field(default=None, compare=False, repr=False)

    @property
    def parents(self) -> list[str]:
        """The adapters as strings (what ``llmtune.json`` records as ``parent_adapters``)."""
        return [str(a) for a in self.adapters]


# -- reading records -------------------------------------------------------------------------------

def is_adapter_folder(path: PathLike) -> bool:
    """True for a folder with ``adapter_config.json`` and no ``config.json`` (a LoRA output folder)."""
    p = Path(os.path.expanduser(str(path)))
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def read_run_record(folder: PathLike) -> dict:
    """The ``llmtune.json`` of an output folder as a dict (``{}`` when absent).

    Raises:
        LLMTuneError: the file exists but is not JSON.
    """
    f = Path(os.path.expanduser(str(folder))) / RUN_RECORD
    return read_json(f, "run record", fix="remove it if the folder is not an llmtune output", missing={})


def read_training_args(folder: Optional[PathLike]) -> dict:
    """The ``training_args.yaml`` of an output folder as a dict (``{}`` when absent or not a folder).

    Raises:
        LLMTuneError: the file exists but is not valid YAML.
    """
    if not folder:
        return {}
    f = Path(os.path.expanduser(str(folder))) / TRAINING_ARGS
    if not f.is_file():
        return {}
    try:
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LLMTuneError(f"{f}: cannot read it as YAML ({e}); fix or delete the file") from None
    return data if isinstance(data, dict) else {}


def recorded_template(*folders: Optional[PathLike]) -> Optional[str]:
    """The template recorded in ``training_args.yaml`` of the first of ``folders`` that records one.

    Pass the last adapter first. Non-folders (Hub ids, ``.gguf`` files) and ``None`` are skipped.

    Raises:
        LLMTuneError: a ``training_args.yaml`` exists but is not valid YAML.
    """
    for folder in folders:
        name = read_training_args(folder).get("template")
        if name:
            return str(name)
    return None


def _recorded_parents(folder: Path, adapter_cfg: dict) -> list[str]:
    """The parent adapters recorded for an adapter folder: ``llmtune.json``, else the legacy key."""
    record = read_run_record(folder)
    if "parent_adapters" in record:
        return [str(p) for p in record.get("parent_adapters") or []]
    return [str(p) for p in adapter_cfg.get(LEGACY_PARENTS_KEY) or []]


# -- resolving chains ------------------------------------------------------------------------------

def resolve_model_chain(path: PathLike) -> tuple[str, list[Path]]:
    """Follow an adapter folder's ``base_model_name_or_path`` (recursively) to the root base model.

    Args:
        path: a model folder, ``.gguf`` file, Hub id, or a LoRA adapter folder (``adapter_config.json``
            without ``config.json``), whose base may itself be an adapter folder; or a freeze / sharded FSDP
            ``checkpoint-N`` (:func:`llmtune.ckpt_weights.checkpoint_kind`), whose base and parents come from its
            ``llmtune.json`` and which takes its place in the chain like an adapter (its tensors are laid over).

    Returns:
        ``(base, adapters)``: the root base (an absolute local path, or the name as given when it is not a
        local path) and the adapter folders (absolute) in the order they must be applied, root first. An
        adapter trained by llmtune on top of earlier adapters lists them in its ``llmtune.json``
        (``parent_adapters``; older folders: ``llmtune_parent_adapters`` in ``adapter_config.json``); each is
        expanded recursively and applied before it. A relative ``base_model_name_or_path`` is taken relative
        to the adapter folder, then to the working directory. For a non-adapter ``path``: ``(path, [])``.

    Raises:
        LLMTuneError: unreadable ``adapter_config.json``, missing ``base_model_name_or_path``, or a cycle.
    """
    root, adapters, _ = _resolve(str(path), ())
    return root, adapters


def _adapter_config(item: str, folder: Path) -> dict:
    """The ``adapter_config.json`` of ``folder``, the local folder of the ``adapter_name_or_path`` item ``item``.

    Raises:
        LLMTuneError: ``folder`` has none; the message says what it is instead (a freeze or sharded FSDP
            checkpoint: pass it as ``model_name_or_path``; an older run's checkpoint; anything else), or the file
            is not JSON.
    """
    if not (folder / ADAPTER_CONFIG).is_file():
        if ckpt_weights.checkpoint_kind(folder):   # its trained tensors replace the base's: not an adapter
            raise LLMTuneError(f"adapter_name_or_path: {item!r} is {ckpt_weights.describe(folder)}, not an "
                               f"adapter: pass it as --model_name_or_path {item} (its recorded base is loaded "
                               "and its trained tensors laid over) and leave adapter_name_or_path unset")
        if (folder / "trainer_state.json").is_file():    # a checkpoint-N of an older llmtune run
            raise LLMTuneError(f"adapter_name_or_path: {item!r} is a training checkpoint without an adapter or "
                               "trained tensors (an older llmtune run's: for resume_from_checkpoint only); "
                               "give the run's output_dir (its final model) instead")
        raise LLMTuneError(f"adapter_name_or_path: {item!r} has no {ADAPTER_CONFIG} (in {folder}); give the "
                           "output folder of a LoRA training run (or leave adapter_name_or_path unset)")
    return read_json(folder / ADAPTER_CONFIG, "adapter_name_or_path")


def _resolve(current: str, seen: tuple, given: Optional[str] = None) -> tuple[str, list[Path], Optional[str]]:
    """:func:`resolve_model_chain`'s ``(base, adapters)``, and third the ``base_model_name_or_path`` that
    ``current``'s own ``adapter_config.json`` records, as written (None when it records none, or when ``given``
    is None). ``given``: the ``adapter_name_or_path`` item that named ``current``, which must then be an adapter
    folder (:func:`_adapter_config`); its ``adapter_config.json`` is read once."""
    adapters: list[Path] = []
    first = _adapter_config(given, Path(os.path.expanduser(current))) if given is not None else None
    recorded = first.get("base_model_name_or_path") if first is not None else None
    while True:
        p = Path(os.path.expanduser(current))
        tensors = ckpt_weights.checkpoint_kind(p) is not None   # a freeze or sharded FSDP checkpoint-N
        if not (tensors or is_adapter_folder(p)):
            break
        p = p.resolve()
        if p in adapters or p in seen:
            raise LLMTuneError(f"{p}/{ADAPTER_CONFIG}: base_model_name_or_path chain loops back to {p}")
        adapters.append(p)
        if tensors:   # its llmtune.json records the base and the parents, as an adapter's do
            base, parents = ckpt_weights.checkpoint_record(p)
        else:
            cfg = first if first is not None else read_json(p / ADAPTER_CONFIG, "adapter_name_or_path")
            base, parents = cfg.get("base_model_name_or_path"), _recorded_parents(p, cfg)
        first = None   # read for the first folder only
        if not base:
            raise LLMTuneError(f"{p / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base model as "
                               f"model_name_or_path and this folder as adapter_name_or_path")
        base = os.path.expanduser(str(base))
        if not os.path.isabs(base):
            if (p / base).exists():
                base = str((p / base).resolve())
            elif Path(base).exists():
                base = str(Path(base).resolve())
        if parents:
            # an llmtune run on top of earlier adapters records them (root first) and the root base: expand
            # each parent's own record too, so the whole chain is applied in training order
            chain: list[Path] = []
            for parent in parents:
                _, sub, _ = _resolve(parent, seen + tuple(adapters))
                chain.extend(a for a in sub if a not in chain)
            adapters = chain + [a for a in reversed(adapters) if a not in chain]
            adapters.reverse()
        current = base
    adapters.reverse()
    p = Path(os.path.expanduser(current))
    return (str(p.resolve()) if p.exists() else current), adapters, recorded


def _split(value: Union[None, str, Sequence[Any]]) -> list[str]:
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [a.strip() for a in str(value).split(",") if a.strip()]


def _local_paths(model_name_or_path: PathLike, adapters: list[str], revision: Optional[str]) -> list[Any]:
    """The model and adapter names as local paths: Hub ids are downloaded here (:func:`resolve_path`), the one
    place a chain touches the Hub. A model name that is neither local nor a Hub id passes through unchanged (the
    loader names it in its error).

    Raises: LLMTuneError for an adapter path that does not exist, or a Hub download that fails."""
    model = str(model_name_or_path)
    first = (resolve_path(model, revision) if Path(os.path.expanduser(model)).exists() or is_hub_id(model)
             else model)
    return [first] + [resolve_path(item, revision=None, what="adapter_name_or_path") for item in adapters]


def resolve_chain(model_name_or_path: PathLike, adapter_name_or_path: Union[None, str, Sequence[Any]] = None,
                  quiet: bool = False, revision: Optional[str] = None) -> AdapterChain:
    """The one rule deciding which adapters apply to which base, for every command.

    * ``model_name_or_path`` may be a LoRA output folder: its recorded root base is the base and its chain
      goes first (one notice); or a freeze / sharded FSDP ``checkpoint-N`` (:mod:`llmtune.ckpt_weights`): the base
      its ``llmtune.json`` records, its parent adapters, then the checkpoint itself (its tensors laid over).
    * ``adapter_name_or_path`` (a comma list or a list) is applied in the given order, each folder as is;
    * except that the first adapter, given on a plain base, whose own recorded chain roots at that base (same
      path or same weights, :func:`same_base`) brings its whole chain (the seed's chat and export give only
      the last adapter of pt -> sft -> dpo), with a notice naming the adapters added;
    * an adapter recorded against another base gets a notice (it is applied; its tensor shapes are checked
      when it is loaded).

    ``quiet``: no notices (a check that resolves the chain before the load that prints them). Hub ids (the
    model, at ``revision``, and the adapters) are resolved once, first; everything after reads local folders.

    Returns:
        the :class:`AdapterChain` (absolute adapter folders; ``local_base`` set when the base is local;
        ``template`` the one the chain's last run recorded).

    Raises:
        LLMTuneError: an adapter path that does not exist or has no ``adapter_config.json`` (a freeze or sharded
            FSDP checkpoint given as an adapter: the message says to pass it as ``model_name_or_path``); a
            checkpoint whose recorded base no longer exists; the errors of :func:`resolve_model_chain`; a
            recorded ``training_args.yaml`` that is not YAML.
    """
    say = (lambda message: None) if quiet else notice
    items = _split(adapter_name_or_path)
    start, *locals_ = _local_paths(model_name_or_path, items, revision)
    base, chain = resolve_model_chain(start)
    if chain and ckpt_weights.checkpoint_kind(chain[-1]):   # a freeze or sharded FSDP checkpoint-N
        what = ckpt_weights.describe(chain[-1])
        if not Path(os.path.expanduser(base)).exists() and not is_hub_id(base):
            raise LLMTuneError(f"model_name_or_path: {model_name_or_path} is {what} that stores only its trained "
                               f"tensors; its recorded base {base} no longer exists: put the base back there, or "
                               "give the run's output_dir (its final model)")
        merged = f", {len(chain) - 1} parent adapter(s) merged" if len(chain) > 1 else ""
        say(f"model_name_or_path {model_name_or_path} is {what}: using its base {base}{merged}, with its "
            "trained tensors laid over")
    elif chain:
        if not Path(os.path.expanduser(base)).exists() and not is_hub_id(base):   # the base was moved or deleted
            raise LLMTuneError(f"model_name_or_path: {model_name_or_path} is a LoRA output folder whose recorded base "
                               f"{base} no longer exists; put the base back there, or give it: --model_name_or_path "
                               f"BASE --adapter_name_or_path {model_name_or_path}")
        say(f"model_name_or_path {model_name_or_path} is a LoRA output folder: using its base {base} with "
               f"{len(chain)} adapter(s) merged")
    elif is_hub_id(str(model_name_or_path)) and not Path(os.path.expanduser(str(model_name_or_path))).exists():
        base = str(model_name_or_path)   # a Hub model: the record names the Hub id; start is its snapshot
    local_base = Path(start) if not chain and Path(str(start)).exists() else (
        Path(base) if Path(base).exists() else None)
    for item, local in zip(items, locals_):
        root, sub, recorded = _resolve(str(local), (), given=item)   # (an error unless it is an adapter folder)
        on_adapter = bool(recorded) and is_adapter_folder(os.path.expanduser(str(recorded)))
        if len(sub) > 1 and not chain and same_base(root, base):
            say(f"adapter {item} was trained on top of {len(sub) - 1} other adapter(s) on this base "
                   f"({', '.join(p.name for p in sub[:-1])}); applying the whole recorded chain")
            chain.extend(sub)
            continue
        if (recorded and not same_base(recorded, base) and not (chain and same_path(recorded, chain[-1]))
                and not (len(sub) > 1 and same_base(root, base))):
            if on_adapter:
                say(f"adapter {item} was trained on top of adapter {recorded}, whose chain does not root at "
                       f"{base}; applying {item} alone")
            else:
                say(f"adapter {item} was trained on base {recorded}, not {base}; applying it because its "
                       "tensor shapes fit")
        chain.append(local.resolve())
    template = recorded_template(*reversed(chain), start)   # the last run of the chain first
    return AdapterChain(base, tuple(chain), local_base, template)


# -- loading a chain -------------------------------------------------------------------------------

def load_model(name_or_path: PathLike, dtype: Union[str, torch.dtype] = "auto", device: Union[str, torch.device] = "cpu",
               revision: Optional[str] = None, adapter_name_or_path: Union[None, str, Sequence[Any]] = None,
               quantization_bit: Optional[int] = None, quantization_type: str = "nf4",
               double_quantization: bool = True) -> torch.nn.Module:
    """Load a model with its adapter chain merged: what ``llmtune.load_model`` and every command use.

    Args:
        name_or_path: a model folder, Hub id, ``.gguf`` file, or an llmtune/PEFT LoRA output folder (its
            base is loaded and its recorded chain merged), or a freeze / sharded FSDP ``checkpoint-N`` (its
            recorded base with its trained tensors laid over, :mod:`llmtune.ckpt_weights`).
        adapter_name_or_path: adapter folder(s) to merge after it (comma list or list; see
            :func:`resolve_chain` for the whole-chain rule).
        dtype, device, revision, quantization_bit, quantization_type, double_quantization: as
            :func:`llmtune.models.loader.load_model`. With adapters and ``quantization_bit``, the adapters
            are merged in the compute dtype first, then the merged weights quantized (merging into 4-bit
            weights would lose the adapter).

    Returns:
        the model in eval mode; ``model.name_or_path`` the resolved base, ``model.adapter_chain`` the
        :class:`AdapterChain` that was applied.

    Raises:
        LLMTuneError: everything :func:`resolve_chain`, the loader and :func:`apply_chain` raise.
    """
    chain = resolve_chain(name_or_path, adapter_name_or_path, revision=revision)   # Hub ids resolved here, once
    base_path = chain.local_base if chain.local_base is not None else chain.base   # (a Hub base an adapter records)
    loader.check_quantization(quantization_bit, quantization_type)
    merge_first = bool(chain.adapters and quantization_bit)   # merge in the compute dtype, then quantize
    model = loader.load_model(base_path, dtype=dtype, device=device, revision=revision,
                              quantization_bit=None if merge_first else quantization_bit,
                              quantization_type=quantization_type, double_quantization=double_quantization)
    apply_chain(model, chain.adapters)
    if merge_first:
        loader.quantize_model(model, loader.parse_dtype(dtype, model.config.torch_dtype), quantization_type,
                              double_quantization)
    model.eval()
    model.adapter_chain = chain
    return model


# -- writing records -------------------------------------------------------------------------------

def save_metadata(out: Path, cfg: Any, tokenizer: Any, template: Any, base: str, parents: Sequence[str]) -> None:
    """Write a run's record into ``out``: ``training_args.yaml`` (``cfg.to_dict()`` with the template used),
    ``llmtune.json`` (stage, finetuning type, template, ``base_model_name_or_path``, ``parent_adapters``),
    the tokenizer files and ``generation_config.json`` (its ``eos_token_id`` lists the tokenizer's eos ids
    and the template's end-of-turn ids; sampling keys from ``cfg``)."""
    args = cfg.to_dict()
    args["template"] = template.name
    (out / TRAINING_ARGS).write_text(yaml.safe_dump(args, sort_keys=False, allow_unicode=True))
    meta = {"llmtune_version": __version__, "stage": cfg.stage, "finetuning_type": cfg.finetuning_type,
            "template": template.name, "base_model_name_or_path": base, "parent_adapters": list(parents)}
    write_json(out / RUN_RECORD, meta)
    tokenizer.save_pretrained(str(out))
    eos = eos_id_list(getattr(tokenizer, "eos_token_ids", None) or tokenizer.eos_token_id, template.stop_token_ids)
    gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
           "pad_token_id": tokenizer.pad_token_id, "do_sample": bool(cfg.do_sample),
           "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
           "max_new_tokens": cfg.max_new_tokens, "repetition_penalty": cfg.repetition_penalty}
    write_json(out / "generation_config.json", gen)


__all__ = ["AdapterChain", "is_adapter_folder", "read_run_record", "read_training_args", "recorded_template",
           "resolve_model_chain", "resolve_chain", "base_fingerprint", "same_base", "apply_chain", "load_model",
           "save_metadata"]
