"""Training stages: each stage is a loss ``(model, batch, ctx) -> (loss_sum, num_items, metrics)``.

The contract (docs/internals.md, "Training"):

* ``loss_sum``: a scalar tensor, the stage's loss summed over the items of this micro-batch;
* ``num_items``: how many items that is (tokens for pt/sft, pairs for rm/dpo, examples for kto), int or
  0-d tensor;
* ``metrics``: a dict of scalar floats/tensors already averaged over the micro-batch, named as TRL names
  them (``rewards/chosen``...).

The trainer divides by the items of the WHOLE optimizer step (all micro-batches, all ranks), so gradient
accumulation gives the gradient of one big batch. To divide before ``backward`` it needs the step's item
count up front: a stage registers in :data:`ITEM_COUNTERS` a function ``batch -> int`` computed from the
collated batch alone (no forward). A stage without one still trains correctly: the trainer then
back-propagates the raw sums and divides the accumulated gradients once the step's count is known.

Register a new stage with ``STAGES["dpo"] = dpo_stage`` (and ``ITEM_COUNTERS["dpo"] = ...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class StageContext:
    """What a stage may need beyond the model and the batch.

    Attributes:
        config: the run's config (LLaMA-Factory key names: ``pref_beta``, ``pref_loss``...).
        global_step: optimizer steps completed so far.
        training: False during evaluation (no gradients).
        tokenizer: the tokenizer or None.
        extra: free-form per-stage objects (a reference model, a reward model...).
    """

    config: Any = None
    global_step: int = 0
    training: bool = True
    tokenizer: Any = None
    extra: dict = field(default_factory=dict)


def _plain_causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback used until ``llmtune.losses.causal_lm_loss`` exists: full logits, float32 cross-entropy sum."""
    logits = F.linear(hidden[:, :-1], lm_head_weight).float()
    target = labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (target != IGNORE_INDEX).sum()


def causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over label tokens: ``sum_t -log p(labels[t+1] | tokens <= t)``.

    Args:
        hidden: ``(B, T, H)`` final hidden states (any float dtype).
        lm_head_weight: ``(V, H)`` output projection.
        labels: ``(B, T)`` int64 aligned with ``input_ids`` (shifted inside), ``-100`` = ignored.

    Returns:
        ``(loss_sum, num_tokens)``: float32 scalar, int64 scalar. Uses ``llmtune.losses.causal_lm_loss``
        (chunked over the vocabulary) when present, else a plain full-logits cross-entropy.
    """
    try:
        from llmtune.losses import causal_lm_loss as chunked
    except ImportError:
        chunked = None
    if chunked is None:
        return _plain_causal_lm_loss(hidden, lm_head_weight, labels)
    return chunked(hidden, lm_head_weight, labels)


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Loss tokens of a pt/sft batch: ``(labels[:, 1:] != -100).sum()`` (the shifted targets)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_stage(model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: StageContext
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """pt and sft: causal language modelling on the model's hidden states.

    Batch: ``input_ids, attention_mask, labels`` ``(B, T)`` (``position_ids`` when packed). Items are the
    label tokens (``labels != -100`` after the shift). Metrics: none beyond the loss.
    Source: the standard autoregressive objective (Radford et al., 2018); sft masks prompt tokens with -100.
    """
    hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"))
    loss_sum, num_tokens = causal_lm_loss(hidden, model.lm_head.weight, batch["labels"])
    # mixture of experts: + moe_aux_loss_coef * load-balancing loss (llmtune.models.moe), logged as aux_loss
    from llmtune.models.moe import add_aux_loss

    loss_sum, metrics = add_aux_loss(model, loss_sum, num_tokens, ctx.config)
    return loss_sum, num_tokens, metrics


#: stage name -> stage function; other stages (rm, dpo, kto, ppo) add themselves here.
STAGES: dict[str, Callable[..., tuple[torch.Tensor, Any, dict]]] = {
    "pt": causal_lm_stage,
    "sft": causal_lm_stage,
}

#: stage name -> ``batch -> number of items`` computed without a forward pass (optional per stage).
ITEM_COUNTERS: dict[str, Callable[[dict], int]] = {
    "pt": count_label_tokens,
    "sft": count_label_tokens,
}


def get_stage(name: str) -> Callable:
    """The stage function registered as ``name``; :class:`LLMTuneError` naming the known stages otherwise."""
    from llmtune.errors import LLMTuneError, nearest

    _import_optional_stages()
    if name not in STAGES:
        raise LLMTuneError(f"stage: unknown stage {name!r} (known: {', '.join(sorted(STAGES))})."
                           + nearest(name, STAGES))
    return STAGES[name]


def _import_optional_stages() -> None:
    """Import the modules of other stages so that they register themselves (if they exist yet)."""
    import importlib

    for mod in ("llmtune.train.stages_pref", "llmtune.train.stages_rm", "llmtune.train.stages_kto",
                "llmtune.train.stages_ppo"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def item_counter(name: str) -> Optional[Callable[[dict], int]]:
    """The registered item counter of stage ``name`` or None."""
    return ITEM_COUNTERS.get(name)
