"""Stages ``pt`` and ``sft``: causal language modelling on the model's hidden states.

Source: the standard autoregressive objective (Radford et al., 2018); sft masks prompt tokens with -100.
The loss is :func:`llmtune.losses.causal_lm_loss` (chunked over the vocabulary, float32).
"""

from __future__ import annotations

from typing import Any

import torch

from llmtune.constants import IGNORE_INDEX
from llmtune.data.multimodal import vision_inputs
from llmtune.losses import causal_lm_loss
from llmtune.models.moe import add_aux_loss
from llmtune.train.stages.base import StageContext


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Loss tokens of a pt/sft batch: ``(labels[:, 1:] != -100).sum()`` (the shifted targets)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_stage(model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: StageContext
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """pt and sft: ``(model, batch, ctx) -> (loss_sum, num_tokens, {})``.

    Batch: ``input_ids, attention_mask, labels`` ``(B, T)`` (``position_ids`` when packed). Items are the
    label tokens (``labels != -100`` after the shift); ``loss_sum`` is the float32 sum of
    ``-log p(labels[t+1] | tokens <= t)`` over them. Metrics: none beyond the loss.
    """
    hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), **vision_inputs(batch))
    loss_sum, num_tokens = causal_lm_loss(hidden, model.lm_head.weight, batch["labels"])
    # mixture of experts: + moe_aux_loss_coef * load-balancing loss (llmtune.models.moe), logged as aux_loss
    loss_sum, metrics = add_aux_loss(model, loss_sum, num_tokens, ctx.config)
    return loss_sum, num_tokens, metrics
