"""Reward-model losses: Bradley-Terry pairwise loss and the score read off a value head."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry pairwise ranking loss, per pair: ``-log sigmoid(s_w - s_l)``, shape ``(batch,)``.

    Source: Bradley & Terry (1952); the reward-model loss of Ouyang et al., 2022, eq. 1 (per pair, without
    the 1/C(K,2) factor: the stage sums and divides by the pairs of the step).

    Args: ``chosen_scores``, ``rejected_scores``: ``(batch,)`` float scalar rewards of each pair.
    Returns: ``(batch,)`` losses in nats, in the input dtype.
    """
    return -F.logsigmoid(chosen_scores - rejected_scores)


def value_head_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The value head's output at each sequence's last non-padding token, ``(batch,)``.

    ``values`` ``(batch, T)`` (per-token outputs of the value head, or ``(batch, T, 1)``);
    ``attention_mask`` ``(batch, T)`` with 0 at padding and nonzero (1, or a packed segment id) at tokens.
    The index is the largest ``t`` with ``attention_mask[b, t] != 0``, so left and right padding both
    work. A row with no token gives ``values[b, 0]``.

    Source: the sequence reward of Ouyang et al., 2022 (score at the end-of-sequence token), as TRL's
    ``get_reward`` and LLaMA-Factory read it.
    """
    if values.dim() == 3 and values.shape[-1] == 1:
        values = values.squeeze(-1)
    t = attention_mask.shape[1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask != 0, positions, torch.zeros_like(positions)).amax(dim=1)
    return values.gather(1, last[:, None]).squeeze(1)
