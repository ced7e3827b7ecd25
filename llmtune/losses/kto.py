"""Kahneman-Tversky Optimization (KTO) loss on unpaired desirable / undesirable examples."""

from __future__ import annotations

from typing import Optional, Union

import torch


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: Optional[Union[torch.Tensor, float]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO loss per example (Ethayarajh et al., 2024, eq. 8, as TRL's KTOTrainer implements it).

    With the implied reward ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point
    ``z0 = clamp(mean(log pi(y'|x') - log pi_ref(y'|x')), min=0)`` estimated on mismatched (x, y') pairs
    (the ``kl_*`` inputs) and detached (no gradient flows through it):

    - desirable example: ``desirable_weight * (1 - sigmoid(beta * (r - z0)))``
    - undesirable example: ``undesirable_weight * (1 - sigmoid(beta * (z0 - r)))``

    (the paper's value ``lambda_y - v(x, y)`` minus the constant ``lambda_y``, as in TRL.)

    Args:
        policy_logps, ref_logps: ``(batch,)`` summed log-probs of each example's response (nats).
        policy_kl_logps, ref_kl_logps: ``(batch_kl,)`` log-probs of the mismatched KL completions.
        desirable: ``(batch,)`` bool (or 0/1), True for a desirable example (``kto_tag``).
        beta: ``pref_beta`` (> 0). desirable_weight / undesirable_weight: ``kto_chosen_weight`` /
            ``kto_rejected_weight`` (lambda_D, lambda_U; the paper suggests
            ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3]).
        kl: optional override of the reference point before clamping (e.g. the KL mean all-reduced over
            ranks, as TRL does with ``gather_for_metrics``); the ``kl_*`` inputs are then ignored.

    Returns:
        ``(losses, rewards, kl)``: ``losses`` ``(batch,)`` per example in input order, ``rewards``
        ``beta * r`` detached ``(batch,)``, ``kl`` the 0-dim detached ``z0`` used.

    Raises: ValueError on shape mismatches.
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.shape != desirable.shape:
        raise ValueError(
            f"policy_logps, ref_logps and desirable must share a shape (batch,), got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(desirable.shape)}"
        )
    if kl is None:
        z0 = (policy_kl_logps.detach() - ref_kl_logps.detach()).mean()
    else:
        z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    z0 = z0.clamp(min=0)
    r = policy_logps - ref_logps
    desirable = desirable.bool()
    chosen_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    rejected_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    return losses, beta * r.detach(), z0
