"""Checkpoints that hold trained tensors but no adapter and no config.json, used as models.

Two kinds of ``checkpoint-N`` folder are neither a PEFT adapter folder nor a model folder
(:mod:`llmtune.train.ckpt_adapter` makes LoRA and full fine-tuning checkpoints those):

* a **tensors** checkpoint (``finetuning_type: freeze``, or a full fine-tuning checkpoint written before
  checkpoints were model folders): ``trainable.safetensors`` holds only the trained parameters, by their
  Hugging Face names, in the training dtype (float32 for freeze tuning);
* a **sharded** checkpoint (FSDP2 full fine-tuning, :func:`llmtune.train.ckpt_parallel.save_sharded`):
  ``fsdp_shards/`` is ``torch.distributed.checkpoint``'s Hugging Face safetensors storage, one file per rank,
  each holding that rank's slices of every ``model.<name>`` and ``optim.<name>.<key>`` tensor, with the slices'
  offsets in the safetensors header metadata. Nothing in it is pickled.

Either is used as ``model_name_or_path`` the way the run's output folder is: the base recorded in the
checkpoint's run record (``llmtune.json``: ``base_model_name_or_path`` and ``parent_adapters``, copied into every
checkpoint) is loaded, the parent adapters merged, and the checkpoint's tensors laid over it
(:func:`lay_over`), so the model is the run's model at step N. **Disk cost: none beyond the resume state**:
no second copy of the weights is written; the trained tensors are stored once and the frozen ones are read
from the base, which must therefore still be where the record says (a moved base is named in the error).

:func:`lay_over` reads a tensors checkpoint with the loader's own safetensors reader (validated header, one
plain read per tensor, no memory map: :mod:`llmtune.models.loader`, the path that loads the freeze run's final
output folder), and a sharded one with ``torch.distributed.checkpoint.load(..., no_dist=True)`` and its
``HuggingFaceStorageReader``, which builds its metadata from the safetensors headers (no pickle) and copies
each rank's slice into place: one process, no process group.

:func:`apply_chain` lays every link of an adapter chain (:class:`llmtune.runs.AdapterChain`) into a loaded base, in
order: a PEFT adapter folder is merged (:mod:`llmtune.peft`), a checkpoint of the two kinds above laid over.

Sources: the safetensors format; PyTorch's ``torch.distributed.checkpoint`` documentation (``load``,
``no_dist``, ``HuggingFaceStorageReader``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from llmtune import peft
from llmtune.errors import LLMTuneError
from llmtune.fileio import read_json

TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
#: the folder of a sharded FSDP2 checkpoint's ``torch.distributed.checkpoint`` storage
FSDP_DIR = "fsdp_shards"
RUN_RECORD = "llmtune.json"

PathLike = Union[str, os.PathLike]


def checkpoint_kind(folder: PathLike) -> Optional[str]:
    """``"sharded"``, ``"tensors"`` or None: what a folder holding ``trainer_state.json`` but neither
    ``config.json`` nor ``adapter_config.json`` stores (see the module docstring); None for anything else
    (an adapter folder, a model folder, a file, a Hub id, a checkpoint without ``trainable.safetensors``)."""
    p = Path(os.path.expanduser(str(folder)))
    if not (p.is_dir() and (p / TRAINER_STATE).is_file()):
        return None
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return None
    if (p / FSDP_DIR).is_dir():
        return "sharded"
    return "tensors" if (p / TRAINABLE).is_file() else None


def describe(folder: PathLike) -> str:
    """A few words naming what a :func:`checkpoint_kind` folder is, for notices and errors."""
    if checkpoint_kind(folder) == "sharded":
        return "an FSDP full fine-tuning checkpoint (sharded)"
    ftype = read_json(Path(os.path.expanduser(str(folder))) / RUN_RECORD, "model_name_or_path", missing={}).get(
        "finetuning_type") or "freeze"
    return f"a {ftype} fine-tuning checkpoint"


def checkpoint_record(folder: PathLike) -> tuple[str, list[str]]:
    """``(base_model_name_or_path, parent_adapters)`` of a :func:`checkpoint_kind` folder, from its ``llmtune.json``.

    Raises:
        LLMTuneError: no ``llmtune.json`` (a checkpoint written before checkpoints carried the run record), a
            record without a base, or a record of a LoRA run (an older LoRA checkpoint: its adapter is not in PEFT's
            layout); each message says what to give instead.
    """
    p = Path(os.path.expanduser(str(folder)))
    record = read_json(p / RUN_RECORD, "model_name_or_path", missing={})
    if not record.get("base_model_name_or_path"):
        raise LLMTuneError(f"model_name_or_path: {p} is a training checkpoint without a run record ({RUN_RECORD}, "
                           "written by older llmtune versions); give the run's output_dir (its final model), or "
                           f"resume_from_checkpoint: {p} with save_steps to write a usable checkpoint")
    if record.get("finetuning_type") == "lora":
        raise LLMTuneError(f"model_name_or_path: {p} is a checkpoint of a LoRA run without adapter files (an older "
                           "llmtune version, or a value head trained alone); give the run's output_dir, or resume "
                           "from it to write a new checkpoint")
    return str(record["base_model_name_or_path"]), [str(a) for a in record.get("parent_adapters") or []]


def _targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter or buffer}`` of ``model``, aliases (tied weights) included."""
    out = dict(model.named_buffers())
    out.update(model.named_parameters(remove_duplicate=False))
    return out


def _sharded_meta(storage: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{parameter name: (full shape, stored dtype)}`` of the ``model.*`` tensors of a sharded checkpoint's
    storage (read from the safetensors headers by ``HuggingFaceStorageReader.read_metadata``)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    meta = HuggingFaceStorageReader(str(storage)).read_metadata()
    return {k[len("model."):]: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if k.startswith("model.")}


def lay_over(model: torch.nn.Module, folder: PathLike) -> torch.nn.Module:
    """Copy a :func:`checkpoint_kind` folder's trained tensors into ``model`` (its base), in place.

    Args:
        model: the base model with the run's parent adapters merged (plain ``nn.Linear`` layers; any dtype and
            device: each tensor is cast to the parameter's dtype as it is copied).
        folder: the checkpoint.

    A value head (``v_head.*``, a reward-model run's) is skipped when ``model`` has none. Returns ``model``.

    Raises:
        LLMTuneError: a tensor the model does not have, or with another shape (the checkpoint belongs to another
            base; the message names the tensor and the base to use); a damaged file.
    """
    p = Path(os.path.expanduser(str(folder)))
    targets = _targets(model)
    has_head = any(n.startswith("v_head.") for n in targets)

    def target(name: str, shape: tuple) -> Optional[torch.Tensor]:
        if name.startswith("v_head.") and not has_head:
            return None
        t = targets.get(name)
        if t is None or tuple(t.shape) != tuple(shape):
            what = "no such tensor" if t is None else f"shape {tuple(shape)}, the model's is {tuple(t.shape)}"
            raise LLMTuneError(f"model_name_or_path: {p} holds {name} ({what}): it was not trained on the base its "
                               f"{RUN_RECORD} records; give the run's output_dir, or restore that base")
        return t

    with torch.no_grad():
        if checkpoint_kind(p) == "sharded":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import HuggingFaceStorageReader

            storage = p / FSDP_DIR
            try:
                state = {}
                for name, (shape, dtype) in _sharded_meta(storage).items():
                    t = target(name, shape)
                    if t is not None:   # straight into the parameter when it has the stored dtype, else cast after
                        same = t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
                        state["model." + name] = t if same else torch.empty(shape, dtype=dtype)
                with warnings.catch_warnings():   # its notice that no_dist means one process: what we ask for
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(storage)), no_dist=True)
            except LLMTuneError:
                raise
            except Exception as e:  # noqa: BLE001 - a truncated or foreign shard file: one line naming it
                raise LLMTuneError(f"model_name_or_path: {storage} cannot be read as a sharded checkpoint "
                                   f"({type(e).__name__}: {e}); use an earlier checkpoint or the run's output_dir") from None
            for key, value in state.items():
                t = targets[key[len("model."):]]
                if value is not t:
                    t.copy_(value)
        else:
            from llmtune.models.folder import iter_safetensors

            for name, value in iter_safetensors([p / TRAINABLE]):
                t = target(name, tuple(value.shape))
                if t is not None:
                    t.copy_(value)
    return model


def apply_chain(model: torch.nn.Module, adapters: Sequence[PathLike], prefix: str = "chain") -> torch.nn.Module:
    """Load and merge each adapter folder of ``adapters`` into ``model``, in order (:mod:`llmtune.peft`); a
    freeze or sharded FSDP ``checkpoint-N`` in the chain has its trained tensors laid over the model instead
    (:func:`lay_over`).

    Returns ``model`` with plain ``nn.Linear`` layers again (the merged weights).

    Raises:
        LLMTuneError: from :func:`llmtune.peft.load_adapter` (missing files, shapes that do not fit) and
            :func:`lay_over`.
    """
    for i, folder in enumerate(adapters):
        if checkpoint_kind(folder):   # a freeze/FSDP checkpoint: its tensors replace the model's
            lay_over(model, folder)
            continue
        peft.load_adapter(model, str(folder), adapter_name=f"{prefix}{i}", is_trainable=False)
        peft.merge_adapters(model)
    return model


__all__ = ["apply_chain", "checkpoint_kind", "checkpoint_record", "describe", "lay_over", "FSDP_DIR", "TRAINABLE"]
