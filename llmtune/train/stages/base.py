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

An online stage (ppo, grpo) makes its batches from rollouts instead of a dataset. Its row in the stage table
has a ``build`` factory returning an object with the :class:`OnlineStage` protocol: the trainer calls
``make_experience(trainer)`` whenever its queue of steps is empty and trains on the returned
:class:`OnlineStep` s with the stage's ``loss`` exactly as it trains an offline stage (same autocast,
gradient scaler, accumulation, clipping, schedule, logging and checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

#: ``(model, batch, ctx) -> (loss_sum, num_items, metrics)``
LossFn = Callable[..., tuple[torch.Tensor, Any, dict]]


def count_input_tokens(batch: dict) -> int:
    """Tokens a micro-batch feeds the model (the trainer's ``tokens_seen``, for throughput): the non-padding
    positions of ``attention_mask`` (a segment id > 0 counts, padding-free batches included), else every
    position of ``input_ids``, else 0. Pairwise batches count chosen and rejected rows (both are forwarded)."""
    if "attention_mask" in batch:
        return int((batch["attention_mask"] > 0).sum())
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return 0


def always(config: Any) -> bool:
    """A :attr:`Stage.reference` rule: the stage always compares against a reference policy (kto, ppo)."""
    return True


@dataclass(frozen=True)
class Stage:
    """One row of the stage table (:data:`llmtune.train.stages.STAGES`): everything the setup path, the data
    layer and the trainer need to know about a stage, so a new stage is a new file and a row (no
    ``if stage == ...`` elsewhere).

    Attributes:
        name: the ``stage`` key value (``pt``, ``sft``, ``rm``, ``dpo``, ``kto``, ``ppo``, ``grpo``).
        loss: the stage's loss function (None for an online stage: its loss comes with the object ``build`` makes).
        count_items: ``batch -> int`` items of a collated batch without a forward pass, or None.
        collator: the collator kind for :func:`llmtune.data.collator.get_collator` (``pt``, ``sft``, ``rm``,
            ``dpo``, ``kto``, ``ppo``).
        data: the data kind for :func:`llmtune.data.get_dataset` (``pt`` text, ``sft`` answers, ``rm``/``dpo``
            pairs, ``kto`` labelled examples, ``ppo`` prompts, ``grpo`` prompts with their columns); a new
            stage on existing data names an existing kind. Default: the ``collator`` kind of the same name.
        online: True when the stage makes its batches from rollouts (ppo, grpo) instead of a dataset.
        build: an online stage's factory ``(model, cfg, tokenizer, template, rows, extra, **options) ->``
            :class:`OnlineStage`, called by the setup path once the model's trainable parameters are chosen.
        check: ``(cfg, **options) -> None``, run before any weights load (a wrong reward model fails fast).
        head_only: ``(model, cfg) -> bool``, run before the data is read: True when the run trains a head
            alone on the frozen model (rm with ``lora_target value``); None: never.
        prepare: ``(model, cfg, head_only) -> Any``, run after the trainable parameters are chosen: adds what
            the stage trains besides them (rm: the value head); None: nothing.
        reference: ``cfg -> bool``, whether the run compares against a reference policy (then
            :func:`llmtune.train.stages.pref.reference_extra` sets one up: adapters disabled, ``ref_model`` or a
            frozen copy); None: the stage never does.
        value_head: the stage trains a value head (rm's reward head, ppo's critic): ``value_head_lr`` applies.
        perplexity: the evaluation loss is a mean token NLL, so ``eval`` also reports ``perplexity``.
        predict: ``do_predict`` with ``predict_with_generate`` writes generated predictions for this stage.
        count_tokens: ``batch -> int`` tokens a micro-batch feeds the model (throughput, ``tokens_seen``).
    """

    name: str
    loss: Optional[LossFn]
    count_items: Optional[Callable[[dict], int]]
    collator: str
    data: Optional[str] = None
    online: bool = False
    build: Optional[Callable[..., "OnlineStage"]] = None
    check: Optional[Callable[..., None]] = None
    head_only: Optional[Callable[[Any, Any], bool]] = None
    prepare: Optional[Callable[[Any, Any, bool], Any]] = None
    reference: Optional[Callable[[Any], bool]] = None
    value_head: bool = False
    perplexity: bool = False
    predict: bool = False
    count_tokens: Callable[[dict], int] = count_input_tokens

    def __post_init__(self) -> None:
        if self.data is None:
            object.__setattr__(self, "data", self.collator)


@dataclass
class OnlineStep:
    """One trainer step of an online stage: what the trainer counts as one ``global_step``.

    Attributes:
        updates: the optimizer updates of the step, each a list of micro-batches (dicts the stage's ``loss``
            reads; tensors already on the model's device). The schedule advances once per step, so a PPO
            iteration (``ppo_epochs`` x backward batches) is one step of several updates, while a GRPO step is
            one update of ``gradient_accumulation_steps`` micro-batches.
        metrics: rollout-level metrics (floats: ``reward``, ``kl``...), merged into the step's log.
    """

    updates: list[list[dict]]
    metrics: dict[str, float] = field(default_factory=dict)


class OnlineStage(Protocol):
    """What the trainer needs of an online stage (built by :attr:`Stage.build`).

    * ``steps_per_epoch``: trainer steps per pass over the prompt set (``num_train_epochs`` x this gives the
      run's length without ``max_steps``);
    * ``make_experience(trainer) -> list[OnlineStep]``: rollouts with the current policy (no gradient) turned
      into the next steps; called when the trainer's queue of steps is empty;
    * ``loss(model, batch, ctx) -> (loss_sum, num_items, metrics)`` and ``count_items(batch) -> int``: the
      contract above, for the micro-batches of those steps;
    * ``before_save(model)``: put the model back into its trained shape before it is saved (e.g. drop a
      reward adapter);
    * optional, for ``resume_from_checkpoint``: ``state_dict() -> dict`` (JSON scalars and lists only: what the
      stage carries between steps, e.g. its prompt cursor, KL controller, running statistics) and
      ``load_state_dict(state)``; a stage without them cannot be resumed (the trainer says so). The trainer
      saves its queue of pending steps itself (:func:`llmtune.train.checkpoint.pack_online_queue`).
    """

    steps_per_epoch: int

    def make_experience(self, trainer: Any) -> list[OnlineStep]: ...

    def loss(self, model: Any, batch: dict, ctx: "StageContext") -> tuple[torch.Tensor, Any, dict]: ...

    def count_items(self, batch: dict) -> int: ...

    def before_save(self, model: Any) -> None: ...


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
