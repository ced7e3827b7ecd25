"""The optimizer and the learning-rate schedule of the training loop.

Sources: AdamW (Loshchilov & Hutter, 2019); schedules as in Hugging Face ``transformers.optimization``
(linear / cosine with linear warm-up; Loshchilov & Hutter 2017 for cosine); LoRA+ (Hayou et al., 2024).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from llmtune.config.keys import SCHEDULERS  # the allowed names live in the config
from llmtune.errors import LLMTuneError, nearest


def _eager(fn: Callable) -> Callable:
    """``fn`` without torch's dynamo wrapper (``functools.wraps`` keeps the plain function as ``__wrapped__``;
    ``fn`` itself when a torch version has none)."""
    return getattr(fn, "__wrapped__", fn)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (Loshchilov & Hutter, 2019), same update, state and ``state_dict`` format, whose
    methods skip the wrappers that import ``torch._dynamo`` on first call (1.5 s of every training run's
    start-up on a CPU; they only matter when the optimizer itself is compiled, which llmtune never does).

    ``step`` runs under ``torch.no_grad()``, as torch's wrapper does for a non-differentiable optimizer.
    Arguments, tensor shapes and dtypes and errors are those of ``torch.optim.AdamW``.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (torch's ``Optimizer.add_param_group``)."""
        _eager(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (torch's ``Optimizer.zero_grad``)."""
        _eager(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``Optimizer.state_dict``: ``{"state": {index: {...}}, "param_groups": [...]}``."""
        return _eager(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``Optimizer.load_state_dict`` (raises ``ValueError`` on a group or size mismatch)."""
        _eager(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One AdamW update of every parameter with a gradient (torch's ``AdamW.step``)."""
        return _eager(torch.optim.AdamW.step)(self, closure)


def lr_lambda(kind: str, num_warmup_steps: int, num_training_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after ``step`` scheduler steps (torch ``LambdaLR`` form).

    * ``linear``: ``step/warmup`` during warm-up, then ``max(0, (total-step)/(total-warmup))``;
    * ``cosine``: warm-up, then ``max(0, 0.5 * (1 + cos(pi * progress)))``,
      ``progress = (step-warmup)/(total-warmup)`` (half a cosine, as Hugging Face's default);
    * ``constant``: 1; ``constant_with_warmup``: ``step/warmup`` then 1.

    Raises :class:`LLMTuneError` for an unknown ``lr_scheduler_type``.
    """
    w, total = max(int(num_warmup_steps), 0), max(int(num_training_steps), 1)

    def warm(step: int) -> Optional[float]:
        return step / max(1, w) if step < w else None

    if kind == "linear":
        return lambda s: warm(s) if s < w else max(0.0, (total - s) / max(1, total - w))
    if kind == "cosine":
        return lambda s: warm(s) if s < w else max(
            0.0, 0.5 * (1.0 + math.cos(math.pi * (s - w) / max(1, total - w))))
    if kind == "constant":
        return lambda s: 1.0
    if kind == "constant_with_warmup":
        return lambda s: warm(s) if s < w else 1.0
    raise LLMTuneError(f"lr_scheduler_type: {kind!r} is not supported (use one of {', '.join(SCHEDULERS)})."
                       + nearest(kind, SCHEDULERS))


def num_warmup_steps(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """``warmup_steps`` when > 0, else ``ceil(warmup_ratio * total_steps)`` (Hugging Face's rule)."""
    return int(warmup_steps) if warmup_steps and warmup_steps > 0 else math.ceil(float(warmup_ratio or 0) * total_steps)


def build_optimizer(model: torch.nn.Module, config: Any) -> AdamW:
    """:class:`AdamW` over the trainable parameters, grouped by learning rate and weight decay.

    Keys read from ``config`` (an ``llmtune.config.TrainConfig``): ``learning_rate``, ``weight_decay``,
    ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``loraplus_lr_ratio``, ``value_head_lr``.
    Weight decay applies to matrices only (biases and norm weights, ``ndim < 2``, get none, as Hugging
    Face's trainer does). ``loraplus_lr_ratio`` (LoRA+, Hayou et al. 2024): ``lora_B`` matrices get
    ``learning_rate * ratio``. ``value_head_lr`` (stages rm and ppo; llmtune's own key, unset = no change):
    the freshly initialised value head (``v_head.*``) gets this learning rate instead (a new head trained at
    the small rate suited to pretrained weights barely moves in a few hundred steps). The fused
    implementation is used when every parameter is a float tensor on a device that supports it, else the
    foreach one.

    Raises:
        LLMTuneError: no trainable parameters; ``value_head_lr`` not positive.
    """
    lr, wd = float(config.learning_rate), float(config.weight_decay)
    ratio = config.loraplus_lr_ratio
    head_lr = config.value_head_lr
    if head_lr is not None and float(head_lr) <= 0:
        raise LLMTuneError(f"value_head_lr: {head_lr} must be a positive learning rate (or unset to use "
                           f"learning_rate)")
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        g_lr = lr * float(ratio) if ratio and "lora_B" in name else lr
        if head_lr is not None and name.startswith("v_head."):
            g_lr = float(head_lr)
        g_wd = wd if p.ndim >= 2 else 0.0
        groups.setdefault((g_lr, g_wd), []).append(p)
    if not groups:
        raise LLMTuneError("no trainable parameters: check finetuning_type, lora_target and "
                           "freeze_trainable_layers")
    param_groups = [{"params": ps, "lr": g_lr, "weight_decay": g_wd} for (g_lr, g_wd), ps in groups.items()]
    kwargs = dict(lr=lr, betas=(float(config.adam_beta1), float(config.adam_beta2)),
                  eps=float(config.adam_epsilon))
    try:
        return AdamW(param_groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return AdamW(param_groups, foreach=True, **kwargs)
