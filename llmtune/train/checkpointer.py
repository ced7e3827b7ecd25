"""Checkpoints with one face: :func:`save` (``checkpoint-<step>``) and :func:`load` (resume) pick the format.

The :class:`~llmtune.train.trainer.Trainer` calls ``save(trainer)`` on its save schedule and on Ctrl-C/SIGTERM,
and ``load(trainer, folder)`` on resume; it never asks which format applies. The format follows from how
the model is wrapped (:mod:`llmtune.train.wrap`) and the run:

==========================================  =======================================  ========================
run                                         format                                   written by
==========================================  =======================================  ========================
one process, or DDP (offline stages)        single process (:mod:`.checkpoint`)      rank 0
DDP, online stage (ppo, grpo)               single process + ``rank<r>/`` rollouts   every rank
FSDP2 with frozen parameters (LoRA, QLoRA)  single process, trainable tensors only    all gather, rank 0 writes
FSDP2 full fine-tuning                      sharded (``fsdp_shards/``)               every rank its shards
==========================================  =======================================  ========================

The multi-rank formats live in :mod:`llmtune.train.ckpt_parallel`. Every format is written to
``tmp-checkpoint-<step>`` and published by one rename (atomic), holds no pickles (safetensors + JSON), and is
read back by :func:`load` whatever wrote it (a single-process checkpoint resumes under FSDP2 and back; a
sharded one needs the same ``fsdp`` setting and world size).

Sources: the formats' own modules; ``torch.distributed.checkpoint`` for the sharded one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from llmtune.train import checkpoint as ckpt
from llmtune.train import ckpt_parallel
from llmtune.train import resume as resume_rules
from llmtune.train.distributed import is_main, rank, world_size
from llmtune.train.wrap import has_frozen, is_fsdp, unwrap

#: the formats :func:`format_for_save` names
FORMATS = ("single", "per_rank_online", "trainable", "sharded")


def format_for_save(trainer: Any, online: Optional[tuple[dict, list]]) -> str:
    """Which format a checkpoint of ``trainer`` takes now (one of :data:`FORMATS`, table in the module docstring).

    ``online``: the online stage's ``(stage_state, queue)`` to save, or None (offline, or no stage state).
    """
    if is_fsdp(trainer.model):
        return "trainable" if has_frozen(trainer.model) else "sharded"
    if online is not None and world_size() > 1:
        return "per_rank_online"   # every rank's rollouts are its own: each adds its part (a collective)
    return "single"


def save(trainer: Any, rng_state: Optional[dict[str, Any]] = None,
         online: Optional[tuple[dict, list]] = None) -> Optional[Path]:
    """Write ``trainer.output_dir/checkpoint-<global_step>`` in the format of :func:`format_for_save`, then
    delete old checkpoints beyond ``save_total_limit`` (never the best one). Every rank calls it.

    ``rng_state`` / ``online``: those of a step's start (a step stopped by a signal), else the current ones
    (``capture_rng_state()``, ``trainer.online_state()``). Returns the folder on rank 0, None elsewhere.

    Raises:
        LLMTuneError: NaN/inf weights (nothing written), a full or read-only disk, or another rank's failure
            (the multi-rank formats stop every rank with one message).
    """
    online = online if online is not None else trainer.online_state()
    rng_state = rng_state or ckpt.capture_rng_state()
    kind = format_for_save(trainer, online)
    path = None
    if kind == "sharded":
        path = ckpt_parallel.save_sharded(trainer, rng_state)
    elif kind == "trainable":
        path = ckpt_parallel.save_trainable(trainer, rng_state)
    elif kind == "per_rank_online":
        path = ckpt_parallel.save_per_rank_online(trainer, rng_state, online)
    if not is_main():
        return None
    if kind == "single":
        path = ckpt.save_checkpoint(trainer.output_dir, trainer.global_step, model=unwrap(trainer.model),
                                    optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                                    trainer_state=trainer.state_dict(), rng_state=rng_state, scaler=trainer.scaler,
                                    online=online, with_optimizer=not trainer.config.save_only_model)
    out = Path(trainer.output_dir)
    keep = out / f"checkpoint-{trainer.best_step}" if trainer.best_step is not None else None
    ckpt.rotate_checkpoints(out, trainer.config.save_total_limit, keep=keep,
                            newest=out / f"checkpoint-{trainer.global_step}")
    return path


def load(trainer: Any, folder: Path) -> tuple[dict[str, Any], dict[str, Any], Optional[tuple[dict, list]]]:
    """Restore ``folder`` (any format) into ``trainer.model``, ``optimizer``, ``scheduler`` and ``scaler``; every
    rank calls it. Returns ``(trainer_state, rng_state, online)``: the checkpoint's ``trainer_state.json``, this
    rank's RNG snapshot (restore it right before the next step) and, for an online stage, this rank's
    ``(stage_state, queue)`` (else None). The caller applies the trainer state.

    Raises:
        LLMTuneError: a damaged or mismatched checkpoint (another configuration, stage, world size for the
            formats that need the same one), naming the folder and what to change.
    """
    folder = Path(folder)
    if trainer.online is not None:  # before any weight is copied
        resume_rules.check_online_resume(trainer, folder)
    if is_fsdp(trainer.model) and not ckpt_parallel.is_sharded(folder):
        state, rng = ckpt_parallel.load_trainable(trainer, folder)
    elif ckpt_parallel.is_sharded(folder):   # without FSDP2 it refuses with the setting to use
        state, rng = ckpt_parallel.load_sharded(trainer, folder)
    else:
        state, rng = ckpt.load_checkpoint(folder, model=unwrap(trainer.model), optimizer=trainer.optimizer,
                                          scheduler=trainer.scheduler, scaler=trainer.scaler)
    online = None
    if trainer.online is not None:
        part = ckpt.rank_part(folder, rank())
        online = ckpt.load_online_state(part, trainer.device)
        if part != folder:  # this rank's own sampling state
            rng = ckpt.load_rng_state(part)
    return state, rng, online


__all__ = ["FORMATS", "format_for_save", "save", "load"]
