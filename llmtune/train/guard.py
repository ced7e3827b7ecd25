"""The finite-loss guard: a step whose loss or gradient norm is NaN/inf never reaches the weights.

``nonfinite_policy`` (llmtune's own key, default ``stop``):

* ``stop``: the run ends with one :class:`~llmtune.errors.LLMTuneError` naming the step and the last finite
  checkpoint (nothing more is saved, so the final output is never a NaN model);
* ``skip``: the optimizer step is skipped (gradients dropped, the learning-rate schedule still advances, as
  when fp16's ``GradScaler`` skips an overflowing step) and a notice names the step.

With fp16 on CUDA the ``GradScaler`` already skips steps whose gradients overflow (an inf gradient norm is its
normal signal to lower the scale), so there only a non-finite *loss* counts. Checkpoints refuse weights that
hold NaN/inf (:func:`llmtune.train.checkpoint.save_checkpoint`), and :func:`check_weights_finite` guards the
final output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch

from llmtune.errors import LLMTuneError, notice

POLICIES = ("stop", "skip")


def check_policy(policy: Any) -> str:
    """The normalised ``nonfinite_policy``; :class:`LLMTuneError` when it is not ``stop`` or ``skip``."""
    value = str(policy or "stop").strip().lower()
    if value not in POLICIES:
        from llmtune.errors import nearest

        raise LLMTuneError(f"nonfinite_policy: {policy!r} is not one of {', '.join(POLICIES)} (stop ends the run at "
                           "a NaN/inf loss, skip drops that step)." + nearest(value, POLICIES))
    return value


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return True


def nonfinite_step(step: int, loss: Any, grad_norm: Any, output_dir: str | Path, policy: str = "stop",
                   scaler_enabled: bool = False) -> bool:
    """Check one optimizer step (``step`` = the 1-based number it would get). Returns True when the caller
    must skip the optimizer step (policy ``skip``), False for a finite step.

    Args:
        loss: the step's mean loss (float or 0-d tensor); grad_norm: its L2 gradient norm before clipping.
        output_dir: where checkpoints are (named in the message).
        policy: ``stop`` or ``skip``.
        scaler_enabled: fp16 ``GradScaler`` active (a non-finite gradient norm is then the scaler's business).

    Raises:
        LLMTuneError: a non-finite loss/grad norm with policy ``stop``; an unknown policy.
    """
    policy = check_policy(policy)
    bad_loss = not _finite(loss)
    bad_norm = not _finite(grad_norm) and not scaler_enabled
    if not (bad_loss or bad_norm):
        return False
    what = f"loss {float(loss)}" if bad_loss else f"gradient norm {float(grad_norm)}"
    if policy == "skip":
        notice(f"step {step}: {what} is not finite; skipped this optimizer step (nonfinite_policy: skip)")
        return True
    from llmtune.train.checkpoint import last_checkpoint_text

    raise LLMTuneError(f"step {step}: the {what} is not finite, so training stopped before it reached the weights; "
                       f"the last finite checkpoint is {last_checkpoint_text(output_dir)}; lower learning_rate "
                       "(or set max_grad_norm, bf16) and resume from it, or set nonfinite_policy: skip")


def check_weights_finite(named: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise :class:`LLMTuneError` when any floating tensor of ``named`` holds NaN/inf (``what``: e.g.
    ``"the final model"``); the output is then not written."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            raise LLMTuneError(f"{what}: {name} holds NaN/inf, so it is not saved; lower learning_rate (or set "
                               "max_grad_norm) and train again")
