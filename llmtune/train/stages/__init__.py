"""The stage table: each ``stage`` name and what the setup path and the trainer need to run it.

One literal table, :data:`STAGES`, one file per stage family: ``causal_lm.py`` (pt, sft), ``rm.py``,
``pref.py`` (dpo and its variants), ``kto.py``, ``ppo.py`` and ``grpo.py`` (online: rollouts, see
``base.OnlineStage``). A new stage is a new file and a new row here: the row's fields
(:class:`~llmtune.train.stages.base.Stage`) say which data kind and collator it takes, whether it trains a
value head, needs a reference policy, reports perplexity or writes predictions, and how its items and
tokens are counted; the setup path, the data layer and the trainer read them and branch on no stage name.
The loss contract is in :mod:`llmtune.train.stages.base`.
"""

from __future__ import annotations

from typing import Callable, Optional

from llmtune.errors import LLMTuneError, nearest
from llmtune.train.stages.base import LossFn, Stage, StageContext, always, count_input_tokens
from llmtune.train.stages.causal_lm import causal_lm_stage, count_label_tokens
from llmtune.train.stages.grpo import build_grpo_stage, check_grpo_config, grpo_needs_reference
from llmtune.train.stages.kto import count_kto_items, kto_stage
from llmtune.train.stages.ppo import build_ppo_stage, check_ppo_config
from llmtune.train.stages.pref import (check_dpo_config, count_dpo_items, count_dpo_tokens, dpo_needs_reference,
                                       dpo_stage)
from llmtune.train.stages.rm import count_pairs, prepare_reward_model, rm_stage, value_head_only

STAGES: dict[str, Stage] = {
    "pt": Stage("pt", loss=causal_lm_stage, count_items=count_label_tokens, collator="pt",
                perplexity=True, predict=True),
    "sft": Stage("sft", loss=causal_lm_stage, count_items=count_label_tokens, collator="sft",
                 perplexity=True, predict=True),
    "rm": Stage("rm", loss=rm_stage, count_items=count_pairs, collator="rm",
                head_only=value_head_only, prepare=prepare_reward_model, value_head=True),
    "dpo": Stage("dpo", loss=dpo_stage, count_items=count_dpo_items, collator="dpo",
                 check=check_dpo_config, reference=dpo_needs_reference, count_tokens=count_dpo_tokens),
    "kto": Stage("kto", loss=kto_stage, count_items=count_kto_items, collator="kto", reference=always),
    "ppo": Stage("ppo", loss=None, count_items=None, collator="ppo", online=True, build=build_ppo_stage,
                 check=check_ppo_config, reference=always, value_head=True),
    "grpo": Stage("grpo", loss=None, count_items=None, collator="ppo", data="grpo", online=True,
                  build=build_grpo_stage, check=check_grpo_config, reference=grpo_needs_reference),
}

#: stage name -> ``batch -> number of items`` (the ``count_items`` column of :data:`STAGES`)
ITEM_COUNTERS: dict[str, Callable[[dict], int]] = {n: s.count_items for n, s in STAGES.items() if s.count_items}


def stage_info(name: str) -> Stage:
    """The :class:`Stage` row of ``name``.

    Raises:
        LLMTuneError: an unknown stage, naming the known ones.
    """
    if name not in STAGES:
        raise LLMTuneError(f"stage: unknown stage {name!r} (known: {', '.join(sorted(STAGES))})."
                           + nearest(name, STAGES))
    return STAGES[name]


def get_stage(name: str) -> LossFn:
    """The loss function of stage ``name`` (``(model, batch, ctx) -> (loss_sum, num_items, metrics)``).

    Raises:
        LLMTuneError: an unknown stage, or an online stage (ppo), whose loss belongs to the object its
            ``build`` makes (give that to ``Trainer(online=...)``).
    """
    stage = stage_info(name)
    if stage.loss is None:
        raise LLMTuneError(f"stage {name} learns from online rollouts; its loss comes with the stage object that "
                           "llmtune.train.setup builds (Trainer(online=...)): run it with llmtune train")
    return stage.loss


def item_counter(name: str) -> Optional[Callable[[dict], int]]:
    """The item counter of stage ``name`` or None."""
    return ITEM_COUNTERS.get(name)


def token_counter(name: str) -> Callable[[dict], int]:
    """``batch -> tokens fed to the model`` of stage ``name`` (the row's ``count_tokens``; the default
    :func:`~llmtune.train.stages.base.count_input_tokens` for a name not in the table)."""
    row = STAGES.get(name)
    return row.count_tokens if row is not None else count_input_tokens


__all__ = ["STAGES", "ITEM_COUNTERS", "Stage", "StageContext", "stage_info", "get_stage", "item_counter",
           "token_counter"]
