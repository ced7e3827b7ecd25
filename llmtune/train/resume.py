"""What a resumed run may change, and how the change is honoured (issue 25).

A checkpoint's ``trainer_state.json`` records, besides the step and data position, the run's stage,
learning rate, schedule length, a fingerprint of its training data and the running loss sum. On resume:

* another **stage** or other **training data** (rows or their tokens) cannot be honoured (the data position
  and the optimizer state belong to the old ones): refused, naming the checkpoint;
* another **learning_rate** is honoured (a common rescue): every parameter group's base rate is scaled by
  new / old and the schedule continues from the resumed step with the new peak, with a notice;
* another **max_steps** / ``num_train_epochs`` (schedule length) is honoured: the schedule is recomputed
  for the new total from the resumed step, with a notice;
* ``train_loss`` averages every step of the run, the resumed session's and the earlier ones (the checkpoint
  keeps the running sum and count);
* one notice says the run resumed, from which checkpoint and at which step.

Checkpoints written before these fields existed resume as before (nothing to compare).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from llmtune.errors import LLMTuneError, notice

#: rows sampled (evenly spaced) for the data fingerprint, plus the row count
FINGERPRINT_ROWS = 64


def data_fingerprint(rows: Any) -> str:
    """SHA-256 (first 16 hex digits) of the number of rows and the ``input_ids`` (or the whole row) of up to
    :data:`FINGERPRINT_ROWS` evenly spaced rows: another dataset, or the same one tokenized otherwise, differs."""
    if rows is None:
        return ""
    n = len(rows)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({(n - 1) * k // max(FINGERPRINT_ROWS - 1, 1) for k in range(FINGERPRINT_ROWS)} if n else ()):
        row = rows[i]
        value = row.get("input_ids", row) if isinstance(row, dict) else row
        h.update(json.dumps(value, sort_keys=True, default=lambda x: getattr(x, "tolist", lambda: str(x))())
                 .encode())
    return h.hexdigest()[:16]


def extra_state(trainer: Any) -> dict[str, Any]:
    """The fields this module adds to a checkpoint's trainer state."""
    return {"learning_rate": float(trainer.config.learning_rate),
            "data_fingerprint": data_fingerprint(getattr(trainer, "train_dataset", None)),
            "train_loss_sum": trainer.run_loss[0], "train_loss_steps": trainer.run_loss[1]}


def apply_on_resume(trainer: Any, folder: Path, state: dict[str, Any]) -> None:
    """Check and honour what changed since ``folder`` was saved (module docstring); call after the weights,
    optimizer and scheduler are loaded and ``global_step`` is set.

    Raises:
        LLMTuneError: another stage, or other training data, than the checkpoint's.
    """
    stage = state.get("stage")
    if stage is not None and stage != trainer.stage_name:
        raise LLMTuneError(f"resume_from_checkpoint: {folder} is a checkpoint of stage {stage}, not "
                           f"{trainer.stage_name}; resume with stage {stage}, or start a new run (with "
                           "overwrite_output_dir or another output_dir)")
    old_fp, new_fp = state.get("data_fingerprint"), data_fingerprint(getattr(trainer, "train_dataset", None))
    if trainer.online is None and old_fp and old_fp != new_fp:
        raise LLMTuneError(f"resume_from_checkpoint: the training data differs from the data {folder} was trained "
                           f"on (another dataset, max_samples, cutoff_len, template or an edited file), so its data "
                           "position cannot be carried over; resume with the same data, or start a new run")
    if isinstance(state.get("train_loss_steps"), int) and isinstance(state.get("train_loss_sum"), (int, float)):
        trainer.run_loss = [float(state["train_loss_sum"]), int(state["train_loss_steps"])]
    changed = []
    old_lr, new_lr = state.get("learning_rate"), float(trainer.config.learning_rate)
    sched = trainer.scheduler
    if isinstance(old_lr, (int, float)) and old_lr > 0 and old_lr != new_lr:
        sched.base_lrs = [b * new_lr / old_lr for b in sched.base_lrs]
        changed.append(f"learning_rate {old_lr:g} -> {new_lr:g} (the schedule continues with the new peak)")
    old_total = state.get("total_steps")
    if isinstance(old_total, int) and old_total != trainer.total_steps:
        changed.append(f"steps {old_total} -> {trainer.total_steps} (max_steps / num_train_epochs: the schedule is "
                       f"recomputed for {trainer.total_steps} steps)")
    if changed:
        for group, base, fn in zip(trainer.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]
        notice(f"resume_from_checkpoint: changed since {folder.name}: {'; '.join(changed)}")
    notice(f"resumed from {folder} at step {trainer.global_step} of {trainer.total_steps}")


def best_state_at_resume(trainer: Any, folder: Path) -> Optional[dict[str, Any]]:
    """The best step's trainable weights for ``load_best_model_at_end`` after a resume from ``folder``:
    the weights just loaded when the best step is the resumed one, else those of ``checkpoint-<best>``
    beside it (kept by ``save_total_limit``); None, with a notice, when that checkpoint was never saved."""
    from llmtune.train import checkpoint as ckpt
    from llmtune.train.wrap import unwrap

    if trainer.best_step == trainer.global_step:   # set by Trainer.load_state_dict from the same folder
        return {k: v.clone() for k, v in ckpt.trainable_state_dict(unwrap(trainer.model)).items()}
    best = folder.parent / f"checkpoint-{trainer.best_step}"
    if (best / ckpt.TRAINER_STATE).is_file():
        return ckpt.read_trainable(best, ckpt.read_checkpoint_json(best / ckpt.TRAINER_STATE))
    notice(f"load_best_model_at_end: the best step ({trainer.best_step}) has no checkpoint beside {folder}, so "
           "its weights cannot be loaded at the end of this resumed run (make save_steps a multiple of "
           "eval_steps to keep them)")
    return None


def check_online_resume(trainer: Any, folder: Path) -> None:
    """An online stage resumes only from a checkpoint of the same stage written by as many processes as this
    run has (each rank's pending rollouts are its own: rank r > 0 reads ``rank<r>/``), without fsdp.

    Raises:
        LLMTuneError: another stage, process count, fsdp, a stage object without state, a missing rank part.
    """
    from llmtune.train import checkpoint as ckpt
    from llmtune.train.distributed import rank, world_size
    from llmtune.train.wrap import is_fsdp

    name = trainer.stage_name
    state = ckpt.read_checkpoint_json(folder / ckpt.TRAINER_STATE)
    stage = state.get("stage") if isinstance(state, dict) else None
    if stage != name:
        raise LLMTuneError(f"resume_from_checkpoint: {folder} is a checkpoint of stage {stage}, not {name}; resume "
                           f"from a checkpoint of a {name} run, or start afresh without resume_from_checkpoint")
    saved_world = int(state.get("world_size") or 1)
    if saved_world != world_size():
        raise LLMTuneError(f"resume_from_checkpoint: {folder} was written by {saved_world} process(es), this "
                           f"run has {world_size()}: each process's pending rollouts are its own, so stage "
                           f"{name} resumes only with the same number (torchrun --nproc_per_node "
                           f"{saved_world}), or start afresh without resume_from_checkpoint")
    if world_size() > 1 and (is_fsdp(trainer.model) or state.get("strategy") == "fsdp"):
        raise LLMTuneError(f"resume_from_checkpoint: stage {name} with fsdp does not resume (its "
                           "checkpoints hold rank 0's rollout state only); resume data-parallel runs without "
                           "fsdp, or start afresh without resume_from_checkpoint")
    if not hasattr(trainer.online, "load_state_dict"):
        raise LLMTuneError(f"resume_from_checkpoint: this {name} stage object has no state_dict/"
                           "load_state_dict, so its rollout state cannot be restored; start afresh")
    part = ckpt.rank_part(folder, rank())
    if part != Path(folder) and not (part / ckpt.ONLINE_STATE).is_file():
        raise LLMTuneError(f"resume_from_checkpoint: {folder} has no {part.name}/{ckpt.ONLINE_STATE}, the "
                           f"rollout state of rank {rank()} (a checkpoint saved on Ctrl-C, or by an older "
                           "llmtune, holds rank 0's only); resume from a checkpoint saved by save_steps, or "
                           "start afresh without resume_from_checkpoint")
    if not (part / ckpt.ONLINE_STATE).is_file():
        ckpt.load_online_state(part, trainer.device)  # raises its one-line error


__all__ = ["data_fingerprint", "extra_state", "apply_on_resume", "best_state_at_resume", "check_online_resume"]
