"""PPO for language models: KL-penalised rewards, GAE, whitening, clipped policy and value losses.

Shapes: every per-token tensor is ``(batch, T)`` over response positions, with ``mask`` ``(batch, T)``
(bool or 0/1) marking the valid response tokens (right padding after the response; leading masked
positions are also fine). Masked means are over all valid tokens of the batch, as TRL's PPOTrainer does.

Sources: Schulman et al., 2017 (PPO, eq. 7 clipped surrogate, eqs. 11-12 GAE); Schulman et al., 2016
(GAE); Ziegler et al., 2019 (KL-penalised reward, adaptive KL controller, eq. 2 and section 2.2);
Ouyang et al., 2022 (InstructGPT, eq. 2).
"""

from __future__ import annotations

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero (0-dim; 0 when the mask is empty)."""
    return _masked_mean(x, mask)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al., 2016, eq. 16).

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, computed backwards;
    ``V`` and ``r`` are zeroed where ``mask`` is 0 and the recursion restarts at masked positions, so the
    value after the last valid token is 0 (the episode ends there) and padding contributes nothing.
    ``returns = A + V``. Masked positions of both outputs are 0.

    Args: ``rewards``, ``values`` ``(batch, T)`` float (detached; values from the old value head),
        ``mask`` ``(batch, T)``, ``gamma`` discount, ``lam`` GAE lambda (both in [0, 1]).
    Returns: ``(advantages, returns)``, each ``(batch, T)`` in the rewards' dtype, no gradient.
    """
    with torch.no_grad():
        m = mask.to(rewards.dtype)
        r = rewards * m
        v = values.to(rewards.dtype) * m
        t_len = r.shape[1]
        adv = torch.zeros_like(r)
        last = torch.zeros_like(r[:, 0])
        for t in reversed(range(t_len)):
            next_v = v[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)
            delta = r[:, t] + gamma * next_v - v[:, t]
            last = (delta + gamma * lam * last) * m[:, t]
            adv[:, t] = last
        returns = (adv + v) * m
    return adv, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked positions (TRL's ``masked_whiten``).

    ``(x - mean) / sqrt(var + eps)`` with the masked mean and the unbiased masked variance (``n / (n-1)``
    correction); with ``shift_mean=False`` the mean is added back (only the scale changes). Masked
    positions of the output are 0. ``x``, ``mask``: ``(batch, T)``; returns ``(batch, T)``.

    Source: advantage normalisation of PPO implementations (Huang et al., 2022, "The 37 implementation
    details of PPO", detail 7); TRL's ``masked_whiten``.
    """
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    var = (((x - mean) ** 2) * m).sum() / n.clamp(min=1)
    if n > 1:
        var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate policy loss (Schulman et al., 2017, eq. 7, negated to minimise).

    ``ratio = exp(logps - old_logps)``; per token ``max(-A ratio, -A clip(ratio, 1-eps, 1+eps))``;
    the loss is its masked mean over all valid tokens of the batch.

    Args: ``logps`` ``(batch, T)`` current per-token log-probs (with gradient); ``old_logps`` the
        rollout's (detached); ``advantages`` ``(batch, T)`` (detached, usually whitened); ``mask``;
        ``clip_ratio`` eps (``ppo_clip_ratio``/``cliprange``, e.g. 0.2).
    Returns: ``(loss, clipfrac)``: 0-dim loss, and the detached fraction of valid tokens where the
        clipped term was the larger one (TRL's ``policy/clipfrac``).
    """
    ratio = torch.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = _masked_mean(torch.maximum(pg1, pg2), mask)
    clipfrac = _masked_mean((pg2 > pg1).to(logps.dtype), mask).detach()
    return loss, clipfrac


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """Clipped value loss: ``0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))``.

    Source: the value clipping of OpenAI baselines' PPO2 (Huang et al., 2022, detail 9), as in TRL's
    PPOTrainer (``cliprange_value``) and LLaMA-Factory.

    Args: ``values`` ``(batch, T)`` current value-head outputs (with gradient), ``old_values`` the
        rollout's, ``returns`` from :func:`gae_advantages`, ``mask``, ``clip_range`` c.
    Returns: 0-dim loss.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    vf1 = (values - returns) ** 2
    vf2 = (clipped - returns) ** 2
    return 0.5 * _masked_mean(torch.maximum(vf1, vf2), mask)


def kl_penalty_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with the KL penalty folded in (Ziegler et al., 2019, eq. 2; Ouyang et al., 2022).

    ``kl_t = logps_t - ref_logps_t`` (the sampled-token estimate of KL(pi || pi_ref)),
    ``rewards_t = -kl_coef * kl_t``, and the reward model's scalar ``score`` is added at the last valid
    response token of each row (as TRL's PPOTrainer and LLaMA-Factory do). Masked positions are 0.

    Args: ``scores`` ``(batch,)``; ``logps``, ``ref_logps`` ``(batch, T)`` per-token log-probs of the
        sampled response under the policy and the reference (pass detached tensors);
        ``mask`` ``(batch, T)``; ``kl_coef`` beta of the KL controller.
    Returns: ``(rewards, kl)``, each ``(batch, T)``. A row with no valid token gets no score.
    """
    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m
    rewards = -kl_coef * kl
    t = mask.shape[1]
    positions = torch.arange(t, device=mask.device).expand(mask.shape)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)
    has = last >= 0
    add = torch.zeros_like(rewards)
    add[has, last[has]] = scores[has].to(rewards.dtype)
    return rewards + add, kl


class FixedKLController:
    """Constant KL coefficient (Ziegler et al., 2019): ``value`` never changes; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for the same interface as :class:`AdaptiveKLController`)."""


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., 2019, section 2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``, where KL is
    the measured mean KL (nats per sequence) and ``n_steps`` the samples since the last update.

    Args: ``init_kl_coef`` initial beta; ``target`` KL target (nats); ``horizon`` (samples, e.g. 10000).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update ``value`` from the measured KL over ``n_steps`` samples."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
