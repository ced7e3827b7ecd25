"""Training checkpoints without pickles: safetensors for tensors, JSON for everything else.

This is the single-process format (also written by rank 0 of DDP runs and of FSDP2 runs with frozen
parameters) and the discovery, rotation and reading helpers of every format. The trainer does not call it
directly: :mod:`llmtune.train.checkpointer` (``save``/``load``) picks the format.

A checkpoint is a folder ``output_dir/checkpoint-<global_step>`` holding

* ``trainable.safetensors``: the trainable parameters by their Hugging Face names (every parameter for full
  fine-tuning), in their training dtype; for LoRA the adapter is in ``adapter_model.safetensors`` +
  ``adapter_config.json`` (PEFT's layout, with the run's record: :mod:`llmtune.train.ckpt_adapter`) instead;
  for freeze tuning it holds the trained layers only, and the run's record copied beside it names the base they
  are laid over when the checkpoint is used as ``model_name_or_path`` (:mod:`llmtune.ckpt_weights`; no second
  copy of the weights);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter state tensors as
  ``state.<param_index>.<key>`` and the rest of ``optimizer.state_dict()`` (param groups, scalars) as JSON;
* ``scheduler.json``: ``LambdaLR.state_dict()`` (the lambdas themselves are rebuilt from the config);
* ``rng_state.safetensors`` + ``rng_state.json``: torch CPU (and CUDA) generator states as uint8 tensors,
  numpy's MT19937 key as uint32 plus its position, Python ``random``'s state as JSON;
* ``scaler.json``: the fp16 ``GradScaler`` state (CUDA only);
* ``trainer_state.json``: global step, epoch, step within the epoch, best metric, log history;
* online stages (ppo, grpo) only: ``online_state.json`` (the stage's own ``state_dict()``: prompt cursor, KL
  controller, running statistics; plus the index of the trainer's queue of pending steps) and
  ``online_queue.safetensors`` (that queue's micro-batch tensors as ``s<step>.u<update>.m<micro>.<key>``).
  A data-parallel online run (``torchrun``, no FSDP) adds ``rank<r>/`` for every rank r > 0: that rank's
  ``rng_state.*``, ``online_state.json`` and ``online_queue.safetensors`` (each rank samples its own rollouts),
  written into the temporary folder before it is published (``llmtune.train.ckpt_parallel.save_per_rank_online``).

It is written to ``output_dir/tmp-checkpoint-<step>`` and renamed when complete, so a killed run never
leaves a half-written folder that looks like a checkpoint: :func:`latest_checkpoint` only considers names
matching ``checkpoint-<digits>`` that hold ``trainer_state.json``.
Format of the optimizer state: ``torch.optim.Optimizer.state_dict()``; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from llmtune.fileio import finite_or_none, io_reason, is_io_error, publish_dir, save_tensors, strict_dumps  # noqa: F401 (re-exported)

from llmtune.errors import LLMTuneError, notice
from llmtune.train import ckpt_adapter
from llmtune.train.manifest import RUN_OUTPUTS, clear_previous_run, remove_stale_temporaries  # noqa: F401

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
ONLINE_STATE = "online_state.json"
ONLINE_QUEUE = "online_queue.safetensors"


# -- discovery --------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints ``checkpoint-N`` in ``output_dir``, sorted by N ascending.

    A folder counts only if its name matches ``checkpoint-<digits>`` exactly and it holds
    ``trainer_state.json`` (written last): leftover ``tmp-checkpoint-N`` folders of a killed run are ignored.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The complete checkpoint with the highest step in ``output_dir``, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume_from_checkpoint: Any, output_dir: str | os.PathLike) -> Optional[Path]:
    """Turn the ``resume_from_checkpoint`` config value into a checkpoint folder (or None).

    ``None``/``False``/``"false"``: no resume. ``True``/``"true"``: the latest complete ``checkpoint-N`` in
    ``output_dir``. A path: that folder. Raises :class:`LLMTuneError` when the folder is missing or
    incomplete, or when ``true`` finds no checkpoint.
    """
    value = resume_from_checkpoint
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no", "none")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "1")):
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None:
            raise LLMTuneError(
                f"resume_from_checkpoint: true, but output_dir {output_dir} holds no complete checkpoint-N "
                "folder; give the checkpoint folder's path, or remove resume_from_checkpoint to start afresh")
        return ckpt
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise LLMTuneError(f"resume_from_checkpoint: folder {path} does not exist; give a checkpoint-N folder "
                           "written by llmtune train, or true for the latest one in output_dir")
    if not (path / TRAINER_STATE).is_file():
        raise LLMTuneError(f"resume_from_checkpoint: {path} is not a complete llmtune checkpoint (no "
                           f"{TRAINER_STATE}); pick another checkpoint-N folder")
    return path


# -- optimizer --------------------------------------------------------------------------------------
def to_jsonable(x: Any) -> Any:
    """``x`` (an optimizer/scheduler/scaler ``state_dict`` part) as JSON data: a tensor becomes
    ``{"__tensor__": nested list, "dtype": name}``, tuples become lists, dict keys strings; inverse:
    :func:`from_jsonable` (exact for the small tensors of these state dicts)."""
    if isinstance(x, torch.Tensor):
        return {"__tensor__": x.tolist(), "dtype": str(x.dtype).replace("torch.", "")}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    return x


def from_jsonable(x: Any) -> Any:
    """Inverse of :func:`to_jsonable`: ``{"__tensor__": ..., "dtype": ...}`` back to a tensor of that dtype."""
    if isinstance(x, dict) and "__tensor__" in x:
        return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"]))
    if isinstance(x, list):
        return [from_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: from_jsonable(v) for k, v in x.items()}
    return x


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write ``optimizer.state_dict()`` as ``optimizer.safetensors`` (state tensors) + ``optimizer.json``."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                tensors[f"state.{idx}.{key}"] = val.detach().contiguous().cpu()
            elif isinstance(val, torch.Tensor):  # 0-d 'step' tensors: keep dtype, store as 1-element
                tensors[f"state.{idx}.{key}"] = val.detach().reshape(1).cpu()
                scalars.setdefault(str(idx), {})[key] = "0d"
            else:
                scalars.setdefault(str(idx), {})[key] = {"value": to_jsonable(val)}
    save_tensors(tensors, str(folder / "optimizer.safetensors"))
    meta = {"param_groups": to_jsonable(sd["param_groups"]), "scalars": scalars}
    (folder / "optimizer.json").write_text(json.dumps(meta, indent=1))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore an optimizer written by :func:`save_optimizer` (tensors moved to each parameter's device)."""
    meta = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for idx, entries in meta["scalars"].items():
        for key, spec in entries.items():
            if spec == "0d":
                state[int(idx)][key] = state[int(idx)][key].reshape(())
            else:
                state.setdefault(int(idx), {})[key] = from_jsonable(spec["value"])
    groups = from_jsonable(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise LLMTuneError(f"resume_from_checkpoint: the optimizer state in {folder} does not match this "
                           "run's trainable parameters (different finetuning_type, lora_target or lora_rank?); "
                           "resume with the configuration the checkpoint was trained with")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- RNG --------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Snapshot of the torch (CPU + CUDA), numpy and Python ``random`` generators (tensors and plain data)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng_state(st: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. A checkpoint written with more CUDA devices than this process sees
    restores the first ``device_count()`` device states, with a one-line notice (the others have no device)."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") and torch.cuda.is_available():
        saved, have = st["cuda"], torch.cuda.device_count()
        if len(saved) > have:
            notice(f"the checkpoint holds the random state of {len(saved)} CUDA devices and this process sees "
                   f"{have}: restoring the first {have}")
        torch.cuda.set_rng_state_all(saved[:have])


def save_rng_state(st: dict[str, Any], folder: Path) -> None:
    """Write a :func:`capture_rng_state` snapshot as ``rng_state.safetensors`` + ``rng_state.json``."""
    kind, key, pos, has_gauss, cached = st["numpy"]
    tensors = {"torch": st["torch"].clone(), "numpy_key": torch.from_numpy(np.asarray(key, dtype=np.uint32).copy())}
    for i, s in enumerate(st.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.clone()
    version, pstate, gauss = st["python"]
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(pstate), "gauss_next": gauss},
            "num_cuda": len(st.get("cuda", []))}
    save_tensors(tensors, str(folder / "rng_state.safetensors"))
    (folder / "rng_state.json").write_text(json.dumps(meta))


def load_rng_state(folder: Path) -> dict[str, Any]:
    """Read a snapshot written by :func:`save_rng_state` (pass it to :func:`restore_rng_state`)."""
    tensors = load_file(str(folder / "rng_state.safetensors"))
    meta = json.loads((folder / "rng_state.json").read_text())
    n = meta["numpy"]
    st = {"torch": tensors["torch"],
          "numpy": (n["kind"], tensors["numpy_key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                    n["cached_gaussian"]),
          "python": (meta["python"]["version"], tuple(meta["python"]["state"]), meta["python"]["gauss_next"])}
    if meta.get("num_cuda"):
        st["cuda"] = [tensors[f"cuda.{i}"] for i in range(meta["num_cuda"])]
    return st


# -- whole checkpoint -------------------------------------------------------------------------------
def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of parameters with ``requires_grad`` (shared tensors once), detached, on the CPU."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().cpu().contiguous()
    return out


def load_trainable_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into the model's trainable parameters by name; :class:`LLMTuneError` on mismatch."""
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(n for n in wanted if n not in tensors and not _is_alias(model, n, tensors))
    unknown = sorted(n for n in tensors if n not in params)
    if missing or unknown:
        raise LLMTuneError(
            f"resume_from_checkpoint: {source} does not match this run's trainable parameters (missing "
            f"{missing[:3]}, unexpected {unknown[:3]}); resume with the configuration it was trained with")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise LLMTuneError(
                f"resume_from_checkpoint: {source} holds {name} with shape {tuple(t.shape)}, this run's is "
                f"{tuple(params[name].shape)} (another lora_rank or model?); resume with the configuration it "
                "was trained with")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].device, params[name].dtype))


def _is_alias(model: torch.nn.Module, name: str, tensors: dict) -> bool:
    # a tied parameter saved under its other name
    target = dict(model.named_parameters())[name]
    return any(p is target and n in tensors for n, p in model.named_parameters(remove_duplicate=False))


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                    rng_state: dict[str, Any], scaler: Any = None,
                    online: Optional[tuple[dict[str, Any], list]] = None,
                    before_publish: Optional[Callable[[Path], None]] = None, with_optimizer: bool = True) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (temp folder, fsync, then rename); return its path.

    An existing ``checkpoint-<step>`` (e.g. written again after a resume) is replaced only once the new
    one is complete. Every file and the folder are flushed to disk (``fsync``) before the rename, and the
    parent folder after it, so a power loss never publishes a checkpoint whose files are still in the page
    cache. See the module docstring for the files. ``online``: an online stage's ``(stage_state, queue)``
    (:func:`pack_online_queue`), written as ``online_state.json`` + ``online_queue.safetensors``.
    ``before_publish(tmp)``: called with the temporary folder before ``trainer_state.json`` is written (the
    other ranks of a data-parallel online run add their ``rank<r>/`` there); what it raises removes the folder.
    ``with_optimizer`` False (``save_only_model``): no optimizer files, and ``trainer_state`` records
    ``"optimizer_saved": false`` so that a resume starts the optimizer afresh (with a notice).

    Raises:
        LLMTuneError: the trainable weights hold NaN/inf (nothing is written); the disk is full or the folder
            is read-only (the temporary folder is removed; the message names the last complete checkpoint).
    """
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f"tmp-checkpoint-{step}"
    weights = trainable_state_dict(model)
    bad = next((n for n, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise LLMTuneError(f"step {step}: the trained weights hold NaN/inf ({bad}), so no checkpoint is saved; "
                           f"the last finite checkpoint is {last_checkpoint_text(out)}; lower learning_rate or "
                           "set max_grad_norm, then resume from it")
    module = getattr(model, "source", model)   # the FSDP2 model behind a view of its gathered tensors
    names = ckpt_adapter.split_adapter(module, weights)  # LoRA: the adapter goes to PEFT's files, not twice
    full = [] if names else ckpt_adapter.full_model_names(model, weights)   # full: model.safetensors
    try:
        if tmp.exists():  # our own half-written folder from a killed run
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        kept = set(names.values()) | set(full)
        save_tensors({n: t for n, t in weights.items() if n not in kept}, str(tmp / "trainable.safetensors"))
        if names:
            ckpt_adapter.write_adapter(module, tmp, out)
            trainer_state = dict(trainer_state, adapter_tensors=names)
        elif full:
            save_tensors({n: weights[n] for n in full}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            ckpt_adapter.write_model_config(model, tmp, out, weights, full)
            trainer_state = dict(trainer_state, weights_file="model.safetensors")
        else:   # freeze tuning: the trained tensors alone, over the recorded base (llmtune.ckpt_weights)
            ckpt_adapter.copy_record(tmp, out)
        if with_optimizer:
            save_optimizer(optimizer, tmp)
        else:
            trainer_state = dict(trainer_state, optimizer_saved=False)
        (tmp / "scheduler.json").write_text(json.dumps(to_jsonable(scheduler.state_dict())))
        save_rng_state(rng_state, tmp)
        if scaler is not None and scaler.is_enabled():
            (tmp / "scaler.json").write_text(json.dumps(to_jsonable(scaler.state_dict())))
        if online is not None:
            save_online_state(online, tmp)
        if before_publish is not None:
            try:
                before_publish(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        (tmp / TRAINER_STATE).write_text(strict_dumps(trainer_state, indent=1))  # written last
        publish_dir(tmp, final)
    except Exception as err:  # noqa: BLE001 - disk full, read-only folder, quota: one line, no tmp left
        if not is_io_error(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise LLMTuneError(f"output_dir: could not write checkpoint-{step} in {out} ({io_reason(err)}); free "
                           f"space on its disk or make it writable, then resume from the last complete "
                           f"checkpoint, {last_checkpoint_text(out)}") from None
    return final


# -- online stages: the stage's own state and the trainer's queue of pending steps --------------------------
def pack_online_queue(queue: list) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Flatten a queue of :class:`~llmtune.train.stages.base.OnlineStep` into safetensors + a JSON index.

    Each micro-batch tensor ``queue[i].updates[j][k][key]`` becomes ``s<i>.u<j>.m<k>.<key>`` (a CPU copy, so
    views of one rollout tensor are stored apart: safetensors refuses shared storage); the index is one entry
    per step: ``{"metrics": {...}, "updates": [[{"tensors": [key...], "values": {key: int/float}}]]}``.
    Exact: the bytes (and dtype, shape) of every tensor are kept. Raises ``TypeError`` for a micro-batch value
    that is neither a tensor nor a JSON scalar.
    """
    tensors: dict[str, torch.Tensor] = {}
    index = []
    for i, step in enumerate(queue):
        updates = []
        for j, micro in enumerate(step.updates):
            entries = []
            for k, batch in enumerate(micro):
                names, values = [], {}
                for key, v in batch.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"s{i}.u{j}.m{k}.{key}"] = v.detach().to("cpu", copy=True).contiguous()
                        names.append(key)
                    elif isinstance(v, (bool, int, float, str)) or v is None:
                        values[key] = v
                    else:
                        raise TypeError(f"online queue: micro-batch key {key!r} holds a {type(v).__name__}")
                entries.append({"tensors": names, "values": values})
            updates.append(entries)
        index.append({"metrics": {k: float(v) for k, v in step.metrics.items()}, "updates": updates})
    return tensors, index


def save_online_state(online: tuple[dict[str, Any], list], folder: Path) -> None:
    """Write an online stage's ``(stage_state, queue)`` into ``folder`` as ``online_queue.safetensors`` (the
    queue's tensors, :func:`pack_online_queue`) and ``online_state.json`` (strict JSON: the stage's state and
    the queue's index). Raises ``OSError`` when the folder cannot be written."""
    tensors, index = pack_online_queue(online[1])
    save_tensors(tensors, str(Path(folder) / ONLINE_QUEUE))
    (Path(folder) / ONLINE_STATE).write_text(strict_dumps({"stage_state": online[0], "queue": index}, indent=1))


def load_online_state(folder: Path, device: Any) -> tuple[dict[str, Any], list]:
    """Read ``online_state.json`` + ``online_queue.safetensors`` of ``folder``: ``(stage_state, queue)``, the
    queue rebuilt as :class:`~llmtune.train.stages.base.OnlineStep` s with tensors on ``device``.

    Raises:
        LLMTuneError: the files are missing or damaged (naming the folder).
    """
    from llmtune.train.stages.base import OnlineStep

    folder = Path(folder)
    if not (folder / ONLINE_STATE).is_file():
        raise LLMTuneError(f"resume_from_checkpoint: {folder} has no {ONLINE_STATE} (the rollout state of an online "
                           "stage: a checkpoint of another stage, or of an llmtune without online resume); resume "
                           "from a checkpoint of this stage, or start afresh without resume_from_checkpoint")
    meta = read_checkpoint_json(folder / ONLINE_STATE)
    if not isinstance(meta, dict) or not isinstance(meta.get("queue"), list):
        raise _broken(folder / ONLINE_STATE, "no queue list")
    tensors = read_checkpoint_tensors(folder / ONLINE_QUEUE)
    queue = []
    with checkpoint_file_errors(folder / ONLINE_STATE):
        for i, step in enumerate(meta["queue"]):
            updates = []
            for j, micro in enumerate(step["updates"]):
                batches = []
                for k, entry in enumerate(micro):
                    b = {key: tensors[f"s{i}.u{j}.m{k}.{key}"].to(device) for key in entry["tensors"]}
                    b.update(entry["values"])
                    batches.append(b)
                updates.append(batches)
            metrics = {k: (float("nan") if v is None else float(v)) for k, v in step["metrics"].items()}
            queue.append(OnlineStep(updates=updates, metrics=metrics))
    return meta.get("stage_state") or {}, queue


def rank_part(folder: str | os.PathLike, rank: int) -> Path:
    """Rank ``rank``'s part of a checkpoint written by several ranks: the folder itself for rank 0,
    ``folder/rank<r>`` for the others (their RNG state; online stages: their rollout state)."""
    return Path(folder) if rank == 0 else Path(folder) / f"rank{rank}"


def last_checkpoint_text(output_dir: str | os.PathLike) -> str:
    """``"<path>"`` of the newest complete checkpoint in ``output_dir``, or a phrase saying there is none."""
    last = latest_checkpoint(output_dir)
    return str(last) if last is not None else "none (no checkpoint was saved yet)"


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer, scheduler (and scaler) from ``folder``; return (trainer_state, rng_state).

    The caller restores the RNG state (:func:`restore_rng_state`) right before the next step.
    """
    folder = Path(folder)
    state = read_checkpoint_json(folder / TRAINER_STATE)  # first: a truncated state fails before any copy
    missing = [k for k in ("global_step", "epoch", "step_in_epoch")
               if not isinstance(state, dict) or not isinstance(state.get(k), int) or isinstance(state.get(k), bool)]
    if missing or not isinstance(state.get("log_history", []), list):
        raise LLMTuneError(f"resume_from_checkpoint: {folder / TRAINER_STATE} is not an llmtune trainer state "
                           f"(no integer {', '.join(missing) or 'log_history list'}); resume from another "
                           "checkpoint-N folder")
    load_trainable_state_dict(model, read_trainable(folder, state), str(folder))
    if state.get("optimizer_saved", True) is False:   # written with save_only_model
        notice(f"resume_from_checkpoint: {folder} holds no optimizer state (save_only_model), so the optimizer "
               "starts afresh: the losses will differ from those of an uninterrupted run")
    else:
        with checkpoint_file_errors(folder / "optimizer.safetensors"):
            load_optimizer(optimizer, folder)
    with checkpoint_file_errors(folder / "scheduler.json"):
        scheduler.load_state_dict(from_jsonable(read_checkpoint_json(folder / "scheduler.json")))
    if scaler is not None and scaler.is_enabled() and (folder / "scaler.json").is_file():
        scaler.load_state_dict(from_jsonable(read_checkpoint_json(folder / "scaler.json")))
    with checkpoint_file_errors(folder / "rng_state.safetensors"):
        rng = load_rng_state(folder)
    return state, rng


def read_trainable(folder: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable tensors by parameter name: ``trainable.safetensors`` plus, for LoRA, the
    adapter file's tensors (:mod:`llmtune.train.ckpt_adapter`). Errors name the damaged file."""
    tensors = read_checkpoint_tensors(folder / "trainable.safetensors")
    if state.get("adapter_tensors"):
        tensors.update(ckpt_adapter.rename(state, read_checkpoint_tensors(folder / ckpt_adapter.ADAPTER_WEIGHTS)))
    if state.get("weights_file") == "model.safetensors":
        tensors.update(read_checkpoint_tensors(folder / "model.safetensors"))
    return tensors


def _broken(path: Path, why: str) -> LLMTuneError:
    return LLMTuneError(f"resume_from_checkpoint: {path} is damaged ({why}); resume from an earlier "
                        f"checkpoint-N folder in {path.parent.parent}, or start afresh without resume_from_checkpoint")


def read_checkpoint_json(path: Path) -> Any:
    """A checkpoint's JSON file; :class:`LLMTuneError` naming the file (and byte offset) when it is missing,
    truncated, not UTF-8 or not JSON."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _broken(path, err.strerror or "unreadable") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _broken(path, f"bytes that are not UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise _broken(path, f"invalid JSON at byte {err.pos} of {len(raw)}: {err.msg}") from None


def read_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors`` ``load_file`` with a damaged or missing file turned into one :class:`LLMTuneError`."""
    with checkpoint_file_errors(path):
        return load_file(str(path))


class checkpoint_file_errors:
    """Context manager: any error while reading ``path`` (truncated safetensors, bad JSON, missing key)
    becomes one :class:`LLMTuneError` naming it; an :class:`LLMTuneError` passes through unchanged."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or isinstance(err, (LLMTuneError, KeyboardInterrupt)) or not isinstance(err, Exception):
            return False
        why = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        if isinstance(err, FileNotFoundError):
            why = "missing"
        raise _broken(self.path, why) from None


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: Optional[int],
                       keep: Optional[str] = None, newest: Optional[str | os.PathLike] = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``save_total_limit`` (never ``keep``, the best one, and
    never the newest one: checkpoints are only written with finite weights, so the newest is the newest
    finite checkpoint).

    ``newest``: the checkpoint just written (default: the highest-numbered one). Checkpoints numbered above
    it are left from a run that was resumed from an earlier checkpoint: they are older than every step of
    this run, so they go first (else the limit deleted the resumed run's own checkpoints and kept them).

    Returns the deleted folders. ``None`` or ``<= 0`` keeps everything.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    if newest is not None and Path(newest).resolve() in [c.resolve() for c in ckpts]:
        top = [c.resolve() for c in ckpts].index(Path(newest).resolve())
        ckpts = ckpts[top + 1:] + ckpts[:top + 1]   # superseded ones first, the newest last
    deleted = []
    excess = len(ckpts) - save_total_limit
    for ck in ckpts[:-1]:
        if excess <= 0:
            break
        if keep is not None and Path(keep).resolve() == ck.resolve():
            continue
        shutil.rmtree(ck)
        deleted.append(ck)
        excess -= 1
    return deleted


def clear_for_overwrite(cfg: Any, output_dir: str | os.PathLike) -> list[str]:
    """With ``overwrite_output_dir`` (and no ``resume_from_checkpoint``), :func:`clear_previous_run` with a
    notice naming the folder; otherwise nothing. Called by ``run_train`` after the model, tokenizer, data,
    stage and Trainer are built (so any mistake in them has already been reported) and before training."""
    if not cfg.overwrite_output_dir:
        return []
    if resolve_resume(cfg.resume_from_checkpoint, output_dir) is not None:
        return []
    removed = clear_previous_run(output_dir)
    if removed:
        from llmtune.errors import notice

        notice(f"overwrite_output_dir: removed the previous run's files in {output_dir} ({len(removed)} files and "
               "checkpoint folders; other files are kept)")
    return removed
