"""Stage ``ppo``'s public entry: :func:`train_ppo` (a Python reward function instead of a reward model).

The stage itself is :mod:`llmtune.train.stages.ppo` (rollouts, advantages, loss) on the shared
:class:`~llmtune.train.trainer.Trainer`, and :mod:`llmtune.train.stages.ppo_reward` (reward models); both
are re-exported here. Sources: see those modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from llmtune.train.setup import run_train
from llmtune.train.stages.ppo import PPOStage, build_ppo_stage, policy_forward, response_labels
from llmtune.train.stages.ppo_reward import (RewardFn, RewardModel, RunningMoments, check_reward_folder,
                                             load_reward_model)


def train_ppo(config: Union[dict, str, Path, Any], reward_fn: Optional[RewardFn] = None) -> dict[str, Any]:
    """Run one PPO job (``llmtune train --stage ppo``, seed ``--stage rlhf``) and return its results.

    Args:
        config: a ``TrainConfig``, a dict of LLaMA-Factory keys or a YAML path; ``stage`` is set to ``ppo``.
        reward_fn: optional ``reward_fn(prompts, responses) -> list[float]`` used instead of ``reward_model``:
            ``prompts`` are the decoded chat prompts (template text included), ``responses`` the decoded
            responses without special tokens; one float per response, higher is better.

    Writes to ``output_dir`` what every ``llmtune train`` run writes (:mod:`llmtune.train.setup`): the LoRA
    adapter or the full model, ``value_head.safetensors`` (the critic), ``training_args.yaml``,
    ``llmtune.json``, tokenizer files, ``trainer_log.jsonl``, ``train_results.json``, ``all_results.json``
    and, with ``plot_loss``, ``training_loss.png`` / ``training_reward.png``.

    Raises:
        LLMTuneError: any configuration, data or reward-model mistake (one message naming the key/file).
    """
    from llmtune.config import parse_config

    if isinstance(config, dict):
        config = {**config, "stage": "ppo"}
    cfg = parse_config(config, command="train")
    if cfg.stage != "ppo":
        cfg = cfg.replace(stage="ppo")
    return run_train(cfg, reward_fn=reward_fn)


__all__ = ["RewardFn", "RewardModel", "RunningMoments", "check_reward_folder", "load_reward_model",
           "response_labels", "policy_forward", "PPOStage", "build_ppo_stage", "train_ppo"]
