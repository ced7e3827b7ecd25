"""Pairwise preference losses on sequence log-probabilities: DPO (and its variants), ORPO, SimPO.

All inputs are ``(batch,)`` float tensors of sequence log-probs ``log pi(y | x)`` (nats), one entry per
(chosen, rejected) pair, as :func:`llmtune.losses.sequence_logps` returns them. All functions return
``(losses, chosen_rewards, rejected_rewards)``, each ``(batch,)`` in the input dtype; ``losses`` are per
pair (the stage sums them and divides by the pairs of the optimizer step); rewards are detached and
are what TRL / LLaMA-Factory log as ``rewards/chosen`` and ``rewards/rejected``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtune.errors import LLMTuneError, nearest

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "kto_pair")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss and its variants, per pair.

    With ``h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))``:

    - ``"sigmoid"`` (Rafailov et al., 2023, eq. 7): ``-log sigmoid(beta h)``; with ``label_smoothing = eps``
      the conservative DPO of Mitchell (2023) as in TRL:
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    - ``"hinge"`` (SLiC-HF, Zhao et al., 2023, eq. 1 with the DPO log-ratio): ``relu(1 - beta h)``.
    - ``"ipo"`` (Azar et al., 2023, eq. 17, beta = tau): ``(h - 1 / (2 beta))**2``. IPO is defined on
      length-averaged log-probs: the caller passes ``sequence_logps(..., average=True)`` for all four.
    - ``"kto_pair"`` (TRL's paired KTO, Ethayarajh et al., 2024, with the batch KL estimate of the other
      half): ``z_w = clamp(mean(r_w), 0)``, ``z_l = clamp(mean(r_l), 0)`` over the batch,
      ``r = log pi - log pi_ref``; TRL returns the ``2B`` terms ``1 - sigmoid(beta (r_w - z_l))`` and
      ``1 - sigmoid(beta (z_w - r_l))``; here pair ``i`` gets their average, so ``losses.mean()`` equals
      TRL's mean. As in TRL the KL estimates are not detached.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(batch,)``.
        beta: ``pref_beta`` (> 0), the KL-regularisation strength (DPO) / tau (IPO).
        loss_type: one of ``sigmoid, hinge, ipo, kto_pair`` (LLaMA-Factory's ``pref_loss``).
        label_smoothing: ``eps`` in [0, 0.5), only for ``sigmoid``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(batch,)``; rewards are
        ``beta * (policy - ref)`` detached (Rafailov et al., 2023, section 5, implicit reward).

    Raises:
        LLMTuneError: unknown ``loss_type`` (names the valid ones), ``beta <= 0``, or ``label_smoothing``
        outside [0, 0.5).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise LLMTuneError(
            f"unknown DPO loss type (pref_loss) {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)} "
            f"(and the separate losses orpo, simpo).{nearest(str(loss_type), DPO_LOSS_TYPES)}"
        )
    if not beta > 0:
        raise LLMTuneError(f"pref_beta must be > 0 for the DPO loss, got {beta}; a usual value is 0.1.")
    if not 0.0 <= label_smoothing < 0.5:
        raise LLMTuneError(f"dpo_label_smoothing must be in [0, 0.5), got {label_smoothing}.")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # kto_pair
        chosen_kl = chosen_logratios.mean().clamp(min=0)
        rejected_kl = rejected_logratios.mean().clamp(min=0)
        chosen_part = 1.0 - torch.sigmoid(beta * (chosen_logratios - rejected_kl))
        rejected_part = 1.0 - torch.sigmoid(beta * (chosen_kl - rejected_logratios))
        losses = 0.5 * (chosen_part + rejected_part)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The odds-ratio term of ORPO (Hong et al., 2024, eqs. 4-7), per pair; the stage adds the NLL.

    On length-averaged log-probs ``a = log P(y|x)`` (``sequence_logps(..., average=True)``):
    ``log odds(y|x) = a - log(1 - exp(a))`` (computed as ``a - log1p(-exp(a))``) and
    ``losses = -beta * log sigmoid(log odds(y_w|x) - log odds(y_l|x))``, so that the full ORPO objective
    is ``NLL(y_w) + losses`` with ``beta`` = the paper's lambda (LLaMA-Factory's ``pref_beta``; TRL's
    ``beta`` too).

    Args: ``(batch,)`` averaged log-probs (< 0) of chosen and rejected responses; ``beta`` (lambda) >= 0.

    Returns: ``(losses, chosen_rewards, rejected_rewards)``, each ``(batch,)``; rewards are
    ``beta * averaged logps`` detached, as TRL's ORPOTrainer logs them.

    Raises: nothing (log-probs of exactly 0 give an infinite log-odds, as in the paper's definition).
    """
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        torch.log1p(-torch.exp(policy_chosen_logps)) - torch.log1p(-torch.exp(policy_rejected_logps))
    )
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simple Preference Optimization (Meng et al., 2024, eq. 6), per pair, reference-free.

    ``losses = -log sigmoid(beta * (avg_w - avg_l) - gamma)`` on length-averaged log-probs
    ``avg = log pi(y|x) / |y|`` (``sequence_logps(..., average=True)``).

    ``gamma`` is the paper's target reward margin, in reward units (not divided by beta). This is the
    meaning of ``simpo_gamma`` in LLaMA-Factory and in TRL's CPOTrainer (``loss_type="simpo"``), which both
    compute ``beta * (avg_w - avg_l - simpo_gamma / beta)``. The SimPO authors' own trainer takes
    ``gamma_beta_ratio = gamma / beta`` instead: pass ``gamma = beta * gamma_beta_ratio`` to reproduce it.

    Args: ``(batch,)`` averaged log-probs; ``beta`` > 0 (paper: 2.0-2.5); ``gamma`` >= 0 (paper: 0.5-1.6).

    Returns: ``(losses, chosen_rewards, rejected_rewards)``, each ``(batch,)``; rewards are the paper's
    implicit reward ``beta * avg`` (eq. 4), detached.

    Raises: LLMTuneError if ``beta <= 0``.
    """
    if not beta > 0:
        raise LLMTuneError(f"pref_beta must be > 0 for SimPO, got {beta}; the paper uses 2.0-2.5.")
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
