"""Checkpoints written by several ranks: FSDP2 sharded, FSDP2 gathered trainable-only, DDP per-rank online.

Called through the one face :mod:`llmtune.train.checkpointer` (``save``/``load`` pick the format); the
single-process format itself is :mod:`llmtune.train.checkpoint`.

* **DDP** checkpoints are the single-process format, written by rank 0 and resumable on any world size.
* **FSDP2 with frozen parameters** (LoRA/QLoRA/freeze): every rank all-gathers the trainable tensors and their
  AdamW state, rank 0 writes the single-process format (:func:`save_trainable`); it resumes on any world size
  or in one process (:func:`load_trainable`: each rank keeps its shard).
* **FSDP2 full fine-tuning**: :func:`save_sharded` writes each rank's shards of the model and optimizer with
  ``torch.distributed.checkpoint`` in its safetensors storage (no pickles, also for the metadata), and
  resumes on the same number of ranks (:func:`load_sharded`).
* **data-parallel online stages** (ppo, grpo under DDP): rank 0 writes the single-process checkpoint, every
  rank r > 0 adds ``rank<r>/`` with its own rollout state (:func:`save_per_rank_online`).

Sources: PyTorch documentation of ``torch.distributed.checkpoint`` (``state_dict.get_state_dict``,
``set_state_dict``, ``HuggingFaceStorageWriter``/``Reader``) and ``torch.distributed.tensor``
(``distribute_tensor``); the safetensors format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from llmtune.ckpt_weights import FSDP_DIR  # noqa: F401 - the sharded storage's folder (read back by lay_over)
from llmtune.errors import LLMTuneError
from llmtune.fileio import publish_dir, strict_dumps
from llmtune.train import checkpoint as ckpt, ckpt_adapter
from llmtune.train.distributed import all_reduce_sum, barrier, rank, world_size
from llmtune.train.wrap import full_parameters, full_tensor, gather_trainable, is_fsdp, unwrap


# -- FSDP2 full fine-tuning: every rank its shards ----------------------------------------------------------
def flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
               ) -> tuple[dict[str, torch.Tensor], list, dict[str, str]]:
    """``{"model.<fqn>": DTensor, "optim.<fqn>.<key>": tensor}``, the optimizer's param groups, and the
    aliases left out (tied weights: ``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    flat: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in msd.items():
        local = v.to_local() if hasattr(v, "to_local") else v
        key = (local.data_ptr(), tuple(local.shape), local.dtype) if local.numel() else ("empty", k)
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        flat[f"model.{k}"] = v
    for fqn, st in osd["state"].items():
        for key, val in st.items():
            if not isinstance(val, torch.Tensor):
                val = torch.tensor(val)
            flat[f"optim.{fqn}.{key}"] = val
    return flat, osd["param_groups"], aliases


def save_sharded(trainer: Any, rng_state: dict[str, Any]) -> Optional[Path]:
    """Write ``output_dir/checkpoint-<step>`` of an FSDP2 full fine-tuning run (every rank calls it; rank 0
    returns the path).

    Layout: ``fsdp_shards/`` (``torch.distributed.checkpoint`` safetensors storage, one file per rank
    holding its shards of the model and AdamW state, the shard offsets in the safetensors metadata),
    ``optimizer.json`` (param groups), ``scheduler.json``, ``rng_state.*`` per rank
    (``rank<r>/`` for r > 0), and ``trainer_state.json`` written last by rank 0 after a barrier, then the
    folder is renamed from ``tmp-checkpoint-<step>`` (atomic, as single-process checkpoints).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    out, step, r = Path(trainer.output_dir), trainer.global_step, rank()
    tmp, final = out / f"tmp-checkpoint-{step}", out / f"checkpoint-{step}"
    if r == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    flat, groups, _ = flat_state(trainer.model, trainer.optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / FSDP_DIR), save_distributed=True))
    rng_dir = tmp if r == 0 else tmp / f"rank{r}"
    rng_dir.mkdir(exist_ok=True)
    ckpt.save_rng_state(rng_state, rng_dir)
    barrier()
    if r == 0:
        (tmp / "optimizer.json").write_text(json.dumps(ckpt.to_jsonable(groups), indent=1))
        (tmp / "scheduler.json").write_text(json.dumps(ckpt.to_jsonable(trainer.scheduler.state_dict())))
        if trainer.scaler is not None and trainer.scaler.is_enabled():
            (tmp / "scaler.json").write_text(json.dumps(ckpt.to_jsonable(trainer.scaler.state_dict())))
        ckpt_adapter.copy_record(tmp, out)   # the base its tensors belong to: usable as model_name_or_path
        state = dict(trainer.state_dict(), strategy="fsdp")
        (tmp / ckpt.TRAINER_STATE).write_text(strict_dumps(state, indent=1))  # written last, strict JSON
        publish_dir(tmp, final)
    barrier()
    return final if r == 0 else None


def is_sharded(folder: Path) -> bool:
    """True when ``folder`` was written by :func:`save_sharded`."""
    return (Path(folder) / FSDP_DIR).is_dir()


def load_sharded(trainer: Any, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore a sharded checkpoint (:func:`save_sharded`) into ``trainer.model``/``optimizer``/``scheduler``; return
    ``(trainer_state, rng_state)`` like ``checkpoint.load_checkpoint``. Every rank calls it.

    Raises:
        LLMTuneError: the checkpoint was written with a different number of ranks, or the model is not
        sharded with FSDP2 (resume an ``fsdp`` checkpoint with the same ``fsdp`` setting).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = Path(folder)
    state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
    saved_world = int(state.get("world_size", 1))
    if not is_fsdp(trainer.model):
        raise LLMTuneError(f"resume_from_checkpoint: {folder} is a sharded FSDP checkpoint; resume it with the same "
                           f"fsdp setting and torchrun --nproc_per_node {saved_world}")
    if saved_world != world_size():
        raise LLMTuneError(f"resume_from_checkpoint: {folder} was written by {saved_world} ranks, this run has "
                           f"{world_size()}; resume with torchrun --nproc_per_node {saved_world}")
    flat, _, aliases = flat_state(trainer.model, trainer.optimizer)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / FSDP_DIR)))
    msd = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    msd.update({alias: msd[kept] for alias, kept in aliases.items()})
    osd_state: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        if k.startswith("optim."):
            fqn, key = k[len("optim."):].rsplit(".", 1)
            osd_state.setdefault(fqn, {})[key] = v
    groups = ckpt.from_jsonable(json.loads((folder / "optimizer.json").read_text()))
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=msd,
                   optim_state_dict={"state": osd_state, "param_groups": groups})
    trainer.scheduler.load_state_dict(ckpt.from_jsonable(json.loads((folder / "scheduler.json").read_text())))
    if trainer.scaler is not None and trainer.scaler.is_enabled() and (folder / "scaler.json").is_file():
        trainer.scaler.load_state_dict(ckpt.from_jsonable(json.loads((folder / "scaler.json").read_text())))
    r = rank()
    rng_dir = folder if r == 0 else folder / f"rank{r}"
    return state, ckpt.load_rng_state(rng_dir if rng_dir.is_dir() else folder)


# -- FSDP2 with frozen parameters: checkpoints of the trainable state, in the single-process format ---------
class TensorsView:
    """Stands in for a model in ``llmtune.train.checkpoint``: ``named_parameters`` yields the given tensors;
    ``source``: the model they were gathered from (its LoRA adapter is then written in PEFT's layout)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], source: Optional[torch.nn.Module] = None) -> None:
        self.named, self.source = named, source

    def named_parameters(self, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs as ``nn.Module.named_parameters`` gives them (shared tensors once by default)."""
        seen: set[int] = set()
        for n, t in self.named:
            if remove_duplicate and id(t) in seen:
                continue
            seen.add(id(t))
            yield n, t


class OptimizerView:
    """Stands in for the optimizer in ``llmtune.train.checkpoint``: ``state_dict`` returns ``sd`` (full tensors)
    and ``load_state_dict`` keeps what it is given in ``loaded``."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd, self.loaded = sd, None

    def state_dict(self) -> dict[str, Any]:
        """The gathered optimizer state given at construction."""
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Keep ``sd`` (full tensors) for the caller to shard."""
        self.loaded = sd


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every ``DTensor`` state (AdamW's ``exp_avg``/``exp_avg_sq``) replaced by
    its full tensor. A collective: ranks iterate the same parameters and keys in the same order."""
    sd = optimizer.state_dict()
    state = {idx: {k: (full_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for idx, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def save_trainable(trainer: Any, rng_state: dict[str, Any]) -> Optional[Path]:
    """FSDP2 with frozen parameters: every rank all-gathers the trainable parameters and their AdamW state,
    rank 0 writes ``checkpoint-<step>`` in the single-process format (``llmtune.train.checkpoint``:
    ``trainable.safetensors``, ``optimizer.*``, ``scheduler.json``, ``rng_state.*``, ``trainer_state.json``;
    small for LoRA, and it resumes on any number of ranks or in one process). A LoRA adapter is written in PEFT's
    layout from the gathered tensors (inside ``full_parameters``), so the checkpoint is an adapter folder as a
    single-process one is; a freeze run's is a tensors checkpoint (:mod:`llmtune.ckpt_weights`). Then ranks r > 0 add their RNG
    state in ``rank<r>/``. Returns the path on rank 0, None elsewhere."""
    model = trainer.model
    names = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    full = gather_trainable(model)
    osd = gather_optimizer_state(trainer.optimizer)
    step, r = trainer.global_step, rank()
    path, error = None, None
    if r == 0:
        ids = {id(p): n for n, p in reversed(names)}
        named = [(n, full[ids[id(p)]].requires_grad_(True)) for n, p in names if p.requires_grad and ids[id(p)] in full]
        try:   # the model's parameters are the gathered full tensors meanwhile: a LoRA adapter is written as one
            with full_parameters(model, full):
                path = ckpt.save_checkpoint(trainer.output_dir, step, model=TensorsView(named, source=model),
                                            optimizer=OptimizerView(osd), scheduler=trainer.scheduler,
                                            trainer_state=trainer.state_dict(), rng_state=rng_state,
                                            scaler=trainer.scaler)
        except LLMTuneError as err:  # NaN weights, disk full: every rank stops with it instead of waiting
            error = err
    dev = next(model.parameters()).device  # nccl reduces CUDA tensors only
    failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], device=dev))
    if error is not None:
        raise error
    if float(failed) > 0:
        raise LLMTuneError(f"rank {r}: rank 0 could not write checkpoint-{step} (its message says why)")
    if r > 0:
        rng_dir = Path(trainer.output_dir) / f"checkpoint-{step}" / f"rank{r}"
        rng_dir.mkdir(exist_ok=True)
        ckpt.save_rng_state(rng_state, rng_dir)
    barrier()
    return path


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut to ``like``'s ``DTensor`` layout (this rank's chunk, no communication); plain tensors
    are returned on ``like``'s device and dtype."""
    full = full.to(like.device, like.dtype)
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def load_trainable(trainer: Any, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore a single-process-format checkpoint (:func:`save_trainable`, or one written by a
    single process or DDP) into an FSDP2 model: every rank reads the files and keeps its own shard of each
    trainable parameter and AdamW state; any world size. Errors as ``checkpoint.load_checkpoint``."""
    model, opt = trainer.model, trainer.optimizer
    named = list(model.named_parameters(remove_duplicate=False))
    holders: dict[int, torch.Tensor] = {}
    view = []
    for n, p in named:
        if id(p) not in holders:
            holders[id(p)] = torch.empty(tuple(p.shape), dtype=p.dtype).requires_grad_(p.requires_grad)
        view.append((n, holders[id(p)]))
    trainable = {n: holders[id(p)] for n, p in named if p.requires_grad}
    optv = OptimizerView({"state": {}, "param_groups": opt.state_dict()["param_groups"]})
    state, rng = ckpt.load_checkpoint(folder, model=TensorsView(view), optimizer=optv, scheduler=trainer.scheduler,
                                      scaler=trainer.scaler)
    params = dict(named)
    with torch.no_grad():
        for n in trainable:
            params[n].copy_(shard_like(trainable[n], params[n]))
    order = [p for g in opt.param_groups for p in g["params"]]
    osd = optv.loaded
    osd["state"] = {idx: {k: (shard_like(v, order[int(idx)]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                          for k, v in st.items()} for idx, st in osd["state"].items()}
    opt.load_state_dict(osd)
    r = rank()
    if r > 0 and (Path(folder) / f"rank{r}").is_dir():
        rng = ckpt.load_rng_state(Path(folder) / f"rank{r}")
    return state, rng


# -- data-parallel online stages: rank 0's checkpoint plus every rank's rollout state ------------------------
def save_per_rank_online(trainer: Any, rng_state: dict[str, Any],
                         online: tuple[dict[str, Any], list]) -> Optional[Path]:
    """``checkpoint-<step>`` of a data-parallel (DDP, no FSDP) online run (ppo, grpo): every rank calls it at the
    same step; rank 0 writes the single-process checkpoint with its own rollout state, every rank r > 0 adds
    ``rank<r>/`` (its RNG state, ``online_state.json`` and ``online_queue.safetensors``: each rank samples and
    queues its own rollouts) inside the temporary folder, and only then is it published. Returns the path on
    rank 0, None elsewhere. ``output_dir`` must be on a file system every rank sees (as for any torchrun run
    whose ranks save).

    Every rank joins three small all-reduces whatever happens (rank 0's folder is ready; the other ranks have
    written; rank 0 has published), so a failure on one rank (NaN weights, a full disk) stops all of them with
    a message instead of leaving the others waiting.

    Raises:
        LLMTuneError: this rank, or another (then: its message says why), could not write its part; nothing is
            published then.
    """
    step, r = trainer.global_step, rank()
    dev = next(trainer.model.parameters()).device  # nccl reduces CUDA tensors only

    def failed_anywhere(failed: bool) -> bool:
        return float(all_reduce_sum(torch.tensor([1.0 if failed else 0.0], device=dev))) > 0

    if r > 0:
        rank0_failed = failed_anywhere(False)                      # 1. rank 0's temporary folder is ready
        error = None
        if not rank0_failed:
            part = Path(trainer.output_dir) / f"tmp-checkpoint-{step}" / f"rank{r}"
            try:
                part.mkdir()
                ckpt.save_rng_state(rng_state, part)
                ckpt.save_online_state(online, part)
            except OSError as err:
                error = LLMTuneError(f"rank {r}: could not write {part} ({err.strerror or err}); free space on "
                                     "its disk or make output_dir writable, then resume from the last complete "
                                     "checkpoint")
        others_failed = failed_anywhere(error is not None)          # 2. every rank has written its part
        published = not failed_anywhere(False)                      # 3. rank 0 has published the folder
        if error is not None:
            raise error
        if rank0_failed or others_failed or not published:
            raise LLMTuneError(f"rank {r}: checkpoint-{step} was not saved (another rank's message says why)")
        return None

    joined = 0

    def ranks_write(tmp: Path) -> None:
        nonlocal joined
        joined = 1
        failed_anywhere(False)                                      # 1. ready
        joined = 2
        if failed_anywhere(False):                                  # 2. the other ranks have written
            raise LLMTuneError(f"checkpoint-{step}: another rank could not write its rollout state (its message "
                               "says why), so the checkpoint is not saved")

    path, error = None, None
    try:
        path = ckpt.save_checkpoint(trainer.output_dir, step, model=unwrap(trainer.model), optimizer=trainer.optimizer,
                                    scheduler=trainer.scheduler, trainer_state=trainer.state_dict(),
                                    rng_state=rng_state, scaler=trainer.scaler, online=online,
                                    before_publish=ranks_write, with_optimizer=not trainer.config.save_only_model)
    except LLMTuneError as err:
        error = err
    for _ in range(joined, 2):                                      # the rounds the other ranks still wait in
        failed_anywhere(True)
    failed_anywhere(error is not None)                              # 3. published (or not)
    if error is not None:
        raise error
    return path
