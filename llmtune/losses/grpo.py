"""GRPO and its variants as pure functions: group-relative advantages and the clipped policy loss.

Notation (all per-token tensors are ``(N, C)`` over completion positions, ``completion_mask`` 1 on the tokens of
each completion up to and including its stop token, 0 on padding): ``N`` completions, ``G`` of them per prompt
(consecutive rows), ``logps`` the current policy's log-probs of the sampled tokens, ``old_logps`` those of the
policy that sampled them, ``ref_logps`` those of the reference policy.

Sources:
- Shao et al. 2024, "DeepSeekMath" (GRPO): objective eq. 3 (per-sequence mean of the clipped surrogate, then a
  mean over the group), the KL estimator eq. 4 (Schulman 2020, "Approximating KL divergence", k3), and the
  outcome-supervision advantage of sec. 4.1.2, ``A_i = (r_i - mean(r)) / std(r)`` over the group.
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO, sec. 3.2): no
  ``1/|o_i|`` length normalisation (a constant ``max_completion_length`` instead) and no ``std`` division.
- Yu et al. 2025, "DAPO": clip-higher (decoupled ``epsilon_low`` / ``epsilon_high``, sec. 3.1) and the
  token-level loss ``1 / sum_i |o_i|`` over the whole batch (sec. 3.3), both in the DAPO objective eq. 8.
- Zheng et al. 2025, "Group Sequence Policy Optimization" (GSPO): the sequence-level, length-normalised
  importance ratio ``s_i = exp(mean_t log(pi_theta / pi_old))`` (eq. 7) clipped in place of token ratios.
- Metric names and the numerical conventions (``std + 1e-4``, Bessel's correction, ``bnpo``) follow TRL's
  ``GRPOTrainer`` (v0.2x-1.x), used as the test reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from llmtune.errors import LLMTuneError, nearest

__all__ = ["GRPO_LOSS_TYPES", "SCALE_REWARDS", "group_advantages", "grpo_loss", "grpo_num_items"]

#: ``loss_type`` values of :func:`grpo_loss`.
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
#: ``scale_rewards`` values of :func:`group_advantages`.
SCALE_REWARDS = ("group", "batch", "none")
#: ``importance_sampling_level`` values of :func:`grpo_loss`.
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Standard deviation ignoring NaN, with Bessel's correction (NaN when fewer than 2 values)."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim)
    var = torch.nansum((x - mean) ** 2, dim=dim) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of one optimizer step's completions (one value per completion).

    ``A_i = (r_i - mean_group(r)) / (std(r) + eps)`` (DeepSeekMath, sec. 4.1.2, outcome supervision), where the
    mean is over the ``num_generations`` completions of the same prompt and ``std`` is, by ``scale_rewards``:
    ``"group"`` the group's standard deviation, ``"batch"`` the standard deviation of all ``N`` rewards, ``"none"``
    no division at all (Dr. GRPO, Liu et al. 2025, sec. 3.2: ``A_i = r_i - mean_group(r)``). Standard deviations
    use Bessel's correction, as ``torch.std`` and TRL do.

    A NaN reward (every reward function said ``None``, see :func:`llmtune.rewards.compute_rewards`) is left out
    of the group statistics and gets advantage 0, as in TRL; so does a completion whose group has a single
    scored reward when dividing by the group's std.

    Args:
        rewards: ``(N,)`` float rewards, the completions of each prompt consecutive (``N`` a multiple of
            ``num_generations``). For exact statistics under data parallelism, pass the rewards of all ranks.
        num_generations: completions per prompt ``G`` (>= 1).
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"`` (TRL's ``scale_rewards``).
        eps: added to the std (TRL's 1e-4).

    Returns:
        ``(N,)`` advantages in the rewards' float dtype (float32 for integer rewards), no gradient.

    Raises:
        LLMTuneError: unknown ``scale_rewards``, ``num_generations < 1`` or ``N`` not a multiple of it.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise LLMTuneError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (got {scale_rewards!r})."
                           + nearest(str(scale_rewards), SCALE_REWARDS))
    if num_generations < 1 or rewards.numel() % num_generations:
        raise LLMTuneError(f"the {rewards.numel()} completions of a step must be a multiple of num_generations "
                           f"({num_generations} >= 1): set per_device_train_batch_size x gradient_accumulation_steps"
                           " x world size to a multiple of num_generations")
    with torch.no_grad():
        r = rewards.detach().reshape(-1)
        r = r if r.is_floating_point() else r.float()
        grouped = r.view(-1, num_generations)
        mean = torch.nanmean(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
        adv = r - mean
        if scale_rewards == "group":
            std = (_nanstd(grouped, dim=1) if num_generations > 1 else torch.zeros(grouped.shape[0], dtype=r.dtype,
                                                                                    device=r.device))
            adv = adv / (std.repeat_interleave(num_generations) + eps)
        elif scale_rewards == "batch":
            std = _nanstd(r) if r.numel() > 1 else torch.zeros_like(r[:1])
            adv = adv / (std + eps)
        return torch.nan_to_num(adv, nan=0.0)


def grpo_num_items(completion_mask: torch.Tensor, loss_type: str = "dapo") -> int:
    """The ``num_items`` that :func:`grpo_loss` returns for this micro-batch, from the mask alone (no forward).

    ``dapo``: completion tokens; ``grpo`` and ``dr_grpo``: completions ``N``; ``bnpo``: 1.
    """
    if loss_type == "dapo":
        return int(completion_mask.sum())
    if loss_type in ("grpo", "dr_grpo"):
        return int(completion_mask.shape[0])
    if loss_type == "bnpo":
        return 1
    raise LLMTuneError(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)} (got {loss_type!r})."
                       + nearest(str(loss_type), GRPO_LOSS_TYPES))


def grpo_loss(logps: torch.Tensor, old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
              advantages: torch.Tensor, completion_mask: torch.Tensor, *, loss_type: str = "dapo",
              epsilon: float = 0.2, epsilon_high: Optional[float] = None, beta: float = 0.0,
              importance_sampling_level: str = "token", max_completion_length: Optional[int] = None,
              entropies: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """The GRPO clipped-surrogate loss (with optional KL to a reference) of one micro-batch, as ``(sum, items)``.

    Per token ``t`` of completion ``i`` (DeepSeekMath eq. 3 with DAPO's clip-higher, eq. 8)::

        w_it   = exp(logps_it - old_logps_it)                         importance_sampling_level="token"
        w_it   = exp(sum_t m_it (logps_it - old_logps_it) / |o_i|)    "sequence" (GSPO eq. 7), same for all t
        l_it   = -min(w_it A_i, clip(w_it, 1 - epsilon, 1 + epsilon_high) A_i)
        kl_it  = exp(ref_it - logps_it) - (ref_it - logps_it) - 1     (DeepSeekMath eq. 4, k3; only if beta > 0)
        l_it  += beta kl_it

    and the variants differ only in how the masked ``l_it`` are normalised. The trainer's contract is
    ``loss = sum over the step's micro-batches (and ranks) of loss_sum / sum of num_items``; each variant maps
    onto it so that accumulation gives exactly the variant's loss of the whole step:

    - ``grpo`` (DeepSeekMath eq. 3, ``mean_i (sum_t m_it l_it / |o_i|)``): ``loss_sum = sum_i sum_t m l / |o_i|``,
      ``num_items = N`` (completions), so the step's loss is the mean over all its completions;
    - ``bnpo`` (``sum m l / sum m`` over the micro-batch's tokens): ``loss_sum`` = that mean, ``num_items = 1``,
      so the step's loss is the mean of the micro-batch means;
    - ``dr_grpo`` (Dr. GRPO, ``sum m l / (N L_max)``): ``loss_sum = sum m l / L_max``, ``num_items = N``;
    - ``dapo`` (DAPO eq. 8, ``sum m l`` over the tokens of the whole step): ``loss_sum = sum m l``,
      ``num_items = sum m`` (completion tokens).

    ``grpo``, ``bnpo`` and ``dr_grpo`` equal TRL's loss averaged over equal-sized micro-batches (TRL divides each
    by the number of accumulation steps); ``dapo`` equals TRL's ``dapo`` whose normaliser is the step's token count.

    Args:
        logps: ``(N, C)`` float log-probs of the sampled tokens under the current policy (differentiable).
        old_logps: ``(N, C)`` the sampling policy's log-probs, or ``None`` for ``logps.detach()`` (on-policy,
            ``num_iterations = 1``: ratios are 1 and only their gradient acts).
        ref_logps: ``(N, C)`` the reference policy's log-probs; required when ``beta > 0``, ignored otherwise.
        advantages: ``(N,)`` from :func:`group_advantages` (or ``(N, C)`` per-token advantages).
        completion_mask: ``(N, C)`` 1/0 or bool.
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"`` or ``"dapo"``.
        epsilon: lower clip range ``epsilon_low`` (ratios below ``1 - epsilon`` are clipped).
        epsilon_high: upper clip range (DAPO's clip-higher); ``None`` = ``epsilon``.
        beta: KL coefficient; 0 = no KL term and no reference needed.
        importance_sampling_level: ``"token"`` (GRPO) or ``"sequence"`` (GSPO).
        max_completion_length: ``L_max`` of ``dr_grpo`` (the generation's ``max_new_tokens``); required there.
        entropies: optional ``(N, C)`` per-token entropies, only for the ``entropy`` metric.

    Returns:
        ``(loss_sum, num_items, metrics)``: ``loss_sum`` a 0-dim float32 tensor (differentiable through
        ``logps``), ``num_items`` an int (see the list above; :func:`grpo_num_items` gives it from the mask), and
        ``metrics`` 0-dim detached tensors averaged over the micro-batch with TRL's names: ``clip_ratio/low_mean``
        (share of tokens, or sequences for GSPO, with ratio < 1 - epsilon and A < 0), ``clip_ratio/high_mean``
        (ratio > 1 + epsilon_high and A > 0), ``clip_ratio/region_mean`` (either), ``kl`` (masked mean of
        ``kl_it``, when ``beta > 0``), ``entropy`` (masked mean, when ``entropies`` is given).

    Raises:
        LLMTuneError: unknown ``loss_type`` / ``importance_sampling_level``, ``epsilon`` or ``epsilon_high`` < 0,
            ``beta < 0``, ``beta > 0`` without ``ref_logps``, ``dr_grpo`` without ``max_completion_length``.
        ValueError: tensors of mismatched shapes.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise LLMTuneError(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)} for stage grpo (got "
                           f"{loss_type!r})." + nearest(str(loss_type), GRPO_LOSS_TYPES))
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise LLMTuneError(f"importance_sampling_level must be token or sequence (got {importance_sampling_level!r})")
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    if eps_low < 0 or eps_high < 0:
        raise LLMTuneError(f"epsilon and epsilon_high must be >= 0 (got {epsilon}, {epsilon_high})")
    if beta < 0:
        raise LLMTuneError(f"beta (the KL coefficient) must be >= 0 (got {beta})")
    if beta > 0 and ref_logps is None:
        raise LLMTuneError("beta > 0 needs the reference log-probs (ref_logps); set beta: 0 to train without them")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise LLMTuneError("loss_type dr_grpo needs max_completion_length (max_new_tokens of the rollouts)")
    if logps.dim() != 2 or completion_mask.shape != logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and completion_mask {tuple(completion_mask.shape)} must be "
                         "the same (N, C)")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps if beta > 0 else None)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match logps {tuple(logps.shape)}")
    n = logps.shape[0]
    if advantages.shape not in ((n,), tuple(logps.shape)):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (N,) = ({n},) or (N, C)")

    logps = logps.float()
    keep = completion_mask.bool()
    mask = keep.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    adv = advantages.to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    # masked positions may hold anything (even inf/NaN): select, so neither the value nor the gradient sees them
    log_ratio = torch.where(keep, logps - old, 0.0)
    if importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # (N, 1)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    if beta > 0:
        d = torch.where(keep, ref_logps.to(logps.dtype) - logps, 0.0)
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1.0)).detach()
    per_token = torch.where(keep, per_token.expand_as(mask), 0.0)

    if loss_type == "grpo":
        loss_sum = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    elif loss_type == "bnpo":
        loss_sum = per_token.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss_sum = per_token.sum() / float(max_completion_length)
    else:  # dapo
        loss_sum = per_token.sum()
    num_items = grpo_num_items(completion_mask, loss_type)

    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(logps.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(logps.dtype)
        region = torch.maximum(low, high)
        if low.shape[1] == 1 and mask.shape[1] != 1:  # sequence level: one decision per completion
            def avg(x):
                return x.mean()
        else:
            def avg(x):
                return (x * mask).sum() / mask.sum().clamp(min=1.0)
        metrics["clip_ratio/low_mean"] = avg(low)
        metrics["clip_ratio/high_mean"] = avg(high)
        metrics["clip_ratio/region_mean"] = avg(region)
        if entropies is not None:
            metrics["entropy"] = torch.where(keep, entropies.float(), 0.0).sum() / mask.sum().clamp(min=1.0)
    return loss_sum, num_items, metrics
