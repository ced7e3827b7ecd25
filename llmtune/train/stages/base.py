"""What every stage shares: the :class:`Stage` record of the stage table and the :class:`StageContext`.

The contract (docs/internals.md, "Training"): a stage's loss is ``(model, batch, ctx) -> (loss_sum,
num_items, metrics)``:

* ``loss_sum``: a scalar tensor, the stage's loss summed over the items of this micro-batch;
* ``num_items``: how many items that is (tokens for pt/sft, pairs for rm/dpo, examples for kto), int or
  0-d tensor;
* ``metrics``: a dict of scalar floats/tensors already averaged over the micro-batch, named as TRL names
  them (``rewards/chosen``...).

The trainer divides by the items of the WHOLE optimizer step (all micro-batches, all ranks), so gradient
accumulation gives the gradient of one big batch. To divide before ``backward`` it needs the step's item
count up front: a stage's ``count_items(batch) -> int`` computes it from the collated batch alone (no
forward). A stage without one still trains correctly: the trainer then back-propagates the raw sums and
divides the accumulated gradients once the step's count is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

#: ``(model, batch, ctx) -> (loss_sum, num_items, metrics)``
LossFn = Callable[..., tuple[torch.Tensor, Any, dict]]


@dataclass(frozen=True)
class Stage:
    """One row of the stage table (:data:`llmtune.train.stages.STAGES`).

    Attributes:
        name: the ``stage`` key value (``pt``, ``sft``, ``rm``, ``dpo``, ``kto``, ``ppo``).
        loss: the stage's loss function (None for an online stage that runs its own loop, ``run``).
        count_items: ``batch -> int`` items of a collated batch without a forward pass, or None.
        collator: the collator kind for :func:`llmtune.data.collator.get_collator` (``sft``, ``rm``,
            ``dpo``, ``kto``, ``ppo``).
        online: True when the stage makes its batches from rollouts (ppo) instead of a dataset.
        run: an online stage's entry ``config -> results`` (``llmtune train`` hands the run to it).
    """

    name: str
    loss: Optional[LossFn]
    count_items: Optional[Callable[[dict], int]]
    collator: str
    online: bool = False
    run: Optional[Callable[[Any], dict]] = None


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
