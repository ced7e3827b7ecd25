"""Stage ``ppo``'s entry in the stage table: PPO runs its own rollout loop (:mod:`llmtune.train.ppo`)."""

from __future__ import annotations

from typing import Any

from llmtune.errors import LLMTuneError
from llmtune.train.distributed import world_size
from llmtune.train.ppo import run_ppo


def run(config: Any) -> dict[str, Any]:
    """Train ``stage: ppo`` from a validated config; returns the results dict (:func:`llmtune.train.ppo.run_ppo`).

    Raises:
        LLMTuneError: started under ``torchrun`` with several processes (the rollout loop is one process).
    """
    if world_size() > 1:
        raise LLMTuneError("stage ppo runs in one process (its rollout loop is not distributed yet); start it "
                           "with llmtune train (not torchrun), or scale pt/sft/rm/dpo/kto with torchrun")
    return run_ppo(config)
