"""The stage table: each ``stage`` name and what the setup path and the trainer need to run it.

One literal table, :data:`STAGES`, one file per stage family: ``causal_lm.py`` (pt, sft), ``rm.py``,
``pref.py`` (dpo and its variants), ``kto.py``, ``ppo.py`` and ``grpo.py`` (online: rollouts, see
``base.OnlineStage``). A new stage is a new file and a new row here. The loss contract is in :mod:`llmtune.train.stages.base`.
"""

from __future__ import annotations

from typing import Callable, Optional

from llmtune.errors import LLMTuneError, nearest
from llmtune.train.stages.base import LossFn, Stage, StageContext
from llmtune.train.stages.causal_lm import causal_lm_stage, count_label_tokens
from llmtune.train.stages.grpo import build_grpo_stage, check_grpo_config
from llmtune.train.stages.kto import count_kto_items, kto_stage
from llmtune.train.stages.ppo import build_ppo_stage, check_ppo_config
from llmtune.train.stages.pref import count_dpo_items, dpo_stage
from llmtune.train.stages.rm import count_pairs, rm_stage

STAGES: dict[str, Stage] = {
    "pt": Stage("pt", loss=causal_lm_stage, count_items=count_label_tokens, collator="pt"),
    "sft": Stage("sft", loss=causal_lm_stage, count_items=count_label_tokens, collator="sft"),
    "rm": Stage("rm", loss=rm_stage, count_items=count_pairs, collator="rm"),
    "dpo": Stage("dpo", loss=dpo_stage, count_items=count_dpo_items, collator="dpo"),
    "kto": Stage("kto", loss=kto_stage, count_items=count_kto_items, collator="kto"),
    "ppo": Stage("ppo", loss=None, count_items=None, collator="ppo", online=True, build=build_ppo_stage,
                 check=check_ppo_config),
    "grpo": Stage("grpo", loss=None, count_items=None, collator="ppo", online=True, build=build_grpo_stage,
                  check=check_grpo_config),
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


__all__ = ["STAGES", "ITEM_COUNTERS", "Stage", "StageContext", "stage_info", "get_stage", "item_counter"]
