"""Losses as pure functions on tensors, usable without the trainer (each cites its paper and equation).

- :mod:`.logps`: chunked vocabulary projection: ``causal_lm_loss``, ``token_logps``, ``sequence_logps``,
  ``entropy_from_hidden``, ``token_logps_entropy`` / ``label_logps_entropy`` (log-probs and entropy in one
  pass) (never a full ``(B, T, V)`` float32 logits tensor).
- :mod:`.preference`: ``dpo_loss`` (sigmoid / hinge / ipo / kto_pair), ``orpo_loss``, ``simpo_loss``.
- :mod:`.grpo`: ``group_advantages``, ``grpo_loss`` (grpo / bnpo / dr_grpo / dapo, GSPO sequence ratios),
  ``grpo_num_items``.
- :mod:`.kto`: ``kto_loss``.  :mod:`.reward`: ``reward_loss``, ``value_head_scores``.
- :mod:`.ppo`: ``kl_penalty_rewards``, ``gae_advantages``, ``whiten``, ``ppo_policy_loss``,
  ``ppo_value_loss``, ``AdaptiveKLController``, ``FixedKLController``.

See ``docs/losses.md`` for the equations and when to pick each.
"""

from llmtune.losses.grpo import GRPO_LOSS_TYPES, group_advantages, grpo_loss, grpo_num_items
from llmtune.losses.kto import kto_loss
from llmtune.losses.logps import (IGNORE_INDEX, causal_lm_loss, entropy_from_hidden, label_logps_entropy,
                                  sequence_logps, token_logps, token_logps_entropy)
from llmtune.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    kl_penalty_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from llmtune.losses.preference import DPO_LOSS_TYPES, dpo_loss, orpo_loss, simpo_loss
from llmtune.losses.reward import reward_loss, value_head_scores

__all__ = [
    "IGNORE_INDEX",
    "DPO_LOSS_TYPES",
    "causal_lm_loss",
    "token_logps",
    "token_logps_entropy",
    "label_logps_entropy",
    "sequence_logps",
    "entropy_from_hidden",
    "dpo_loss",
    "orpo_loss",
    "simpo_loss",
    "kto_loss",
    "reward_loss",
    "value_head_scores",
    "gae_advantages",
    "whiten",
    "masked_mean",
    "ppo_policy_loss",
    "ppo_value_loss",
    "kl_penalty_rewards",
    "AdaptiveKLController",
    "FixedKLController",
    "GRPO_LOSS_TYPES",
    "group_advantages",
    "grpo_loss",
    "grpo_num_items",
]
