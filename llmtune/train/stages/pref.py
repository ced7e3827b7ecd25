"""Stage ``dpo``: pairwise preference optimisation (DPO and its variants, ORPO, SimPO) on the policy.

Batch (``llmtune.data.collator.DPOMixCollator``): ``input_ids, attention_mask, labels, position_ids`` of
shape ``(2B, T)``, rows ``[:B]`` chosen and ``[B:]`` rejected (same prompts), labels ``-100`` on prompt and
padding; with the seed's knowledge mix (``kto_alpha``) also ``sft_input_ids, sft_attention_mask,
sft_labels, sft_position_ids`` ``(S, T_s)`` for the plain SFT rows. Either group may be absent.

Per pair, with ``pref_loss`` (LLaMA-Factory's key; ``pref_beta`` = the seed's ``dpo_beta``):

* ``sigmoid`` / ``hinge`` / ``kto_pair``: :func:`llmtune.losses.dpo_loss` on SUMMED response log-probs
  (Rafailov et al., 2023, eq. 7; SLiC-HF; TRL's paired KTO), ``dpo_label_smoothing`` = conservative DPO;
* ``ipo``: the same on length-AVERAGED log-probs (Azar et al., 2023, eq. 17);
* ``orpo``: ``-avg logp(y_w) + orpo_loss`` (Hong et al., 2024, eq. 6: ``L_SFT + lambda L_OR``, lambda =
  ``pref_beta``), reference-free;
* ``simpo``: :func:`llmtune.losses.simpo_loss` with ``simpo_gamma`` (Meng et al., 2024, eq. 6), reference-free;
* ``pref_ftx > 0`` adds ``pref_ftx * (-avg logp(y_w))``, the chosen NLL averaged per token, as LLaMA-Factory
  (beta-free; not added again for orpo, whose NLL term is already there).

The knowledge mix (the seed's ``--stage dpo --kto_alpha A --dataset pref,knowledge``): each SFT example adds
``A * (-avg logp(y))`` (its mean NLL per token). Items (what the trainer divides by) are ``pairs + SFT
examples`` of the whole optimizer step, so with ``P`` pairs and ``S`` SFT rows the step loss is
``(sum_pairs dpo + A * sum_sft mean NLL) / (P + S)``, the same whatever the gradient accumulation split.

Reference policy (not for orpo/simpo): ``ctx.extra["ref_model"]`` when set (``ref_model`` path, or a frozen
copy for full/freeze fine-tuning, see :func:`reference_extra`), else the policy itself with its LoRA adapters
disabled (:func:`llmtune.peft.disable_adapters`), always under ``torch.no_grad``.

Chosen and rejected go through ONE forward of the stacked ``(2B, T)`` batch (policy and reference each).
Metrics use TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (the log-probs that enter the loss: summed, or averaged for ipo/orpo/simpo),
plus ``sft_loss`` (mean NLL of the SFT rows) when the batch has them.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from llmtune.constants import IGNORE_INDEX
from llmtune.data.collator import num_rows, unpack_rows
from llmtune.data.multimodal import vision_inputs
from llmtune.errors import LLMTuneError, nearest, notice
from llmtune.losses import DPO_LOSS_TYPES, dpo_loss, orpo_loss, sequence_logps, simpo_loss
from llmtune.peft import disable_adapters, lora_layers
from llmtune.runs import load_model
from llmtune.train.stages.base import StageContext, count_input_tokens

#: every ``pref_loss`` value stage dpo accepts
PREF_LOSSES = DPO_LOSS_TYPES + ("orpo", "simpo")
#: losses that need no reference model
REFERENCE_FREE = ("orpo", "simpo")


def check_pref_loss(name: str) -> str:
    """Validate ``pref_loss``; returns it. Raises :class:`LLMTuneError` naming the valid values."""
    if name not in PREF_LOSSES:
        raise LLMTuneError(f"pref_loss: {name!r} is not supported; use one of {', '.join(PREF_LOSSES)}."
                           + nearest(str(name), PREF_LOSSES))
    return name


# -- reference model ---------------------------------------------------------------------------------------
def has_lora(model: torch.nn.Module) -> bool:
    """True when ``model`` holds LoRA layers (then the reference is the model with adapters disabled)."""
    return next(iter(lora_layers(model)), None) is not None


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` in eval mode with ``requires_grad`` off (the reference of full fine-tuning)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    if hasattr(ref, "v_head"):
        del ref.v_head
    return ref


def dpo_needs_reference(config: Any) -> bool:
    """Stage dpo's :attr:`~llmtune.train.stages.base.Stage.reference` rule: a reference policy unless
    ``pref_loss`` is reference-free (orpo, simpo)."""
    return config.pref_loss not in REFERENCE_FREE


def check_dpo_config(config: Any, **_: Any) -> None:
    """Stage dpo's check before any weights load: ``pref_loss`` is one this stage implements.

    Raises: LLMTuneError naming the valid values."""
    check_pref_loss(config.pref_loss)


def count_dpo_tokens(batch: dict) -> int:
    """Tokens a dpo micro-batch feeds the model: its pairs' and its plain SFT rows' (``kto_alpha``)."""
    tokens = count_input_tokens(batch)
    if "sft_attention_mask" in batch:
        tokens += int((batch["sft_attention_mask"] > 0).sum())
    return tokens


def reference_extra(model: torch.nn.Module, config: Any, device: Optional[str] = None,
                    needed: Optional[bool] = None) -> dict:
    """Set up the reference policy of a stage whose row asks for one (dpo, kto, ppo, grpo); returns
    ``{"ref_model": module}`` or ``{}`` (:func:`reference_policy`).

    * ``needed``: the row's ``reference(config)``; None: stage dpo's rule after checking ``pref_loss``
      (:func:`dpo_needs_reference`);
    * ``ref_model`` set and needed (a path, with optional ``ref_model_adapters``): loaded here with
      :func:`llmtune.runs.load_model` on ``device`` (default: the policy's), in the dtype of the policy's frozen
      weights (float32 when none is frozen). A training run loads it in step 3 with the policy instead
      (:func:`llmtune.train.precision.load_base_model`) and passes it to :func:`reference_policy`.
    Call it after the trainable parameters are chosen and before training.

    Raises: LLMTuneError from the loader (bad ``ref_model`` path), or for an unknown ``pref_loss``.
    """
    if needed is None:
        needed = dpo_needs_reference(config) if check_pref_loss(config.pref_loss) else False
    ref = None
    if needed and config.ref_model:
        frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
        dtype = frozen[0] if frozen else torch.float32   # the base's dtype (LoRA/freeze), float32 for full
        ref = load_model(config.ref_model, dtype=dtype, device=device or str(next(model.parameters()).device),
                         adapter_name_or_path=config.ref_model_adapters)
    return reference_policy(model, config, needed, ref)


def reference_policy(model: torch.nn.Module, config: Any, needed: bool, ref: Optional[torch.nn.Module]) -> dict:
    """The reference policy of a run: ``{"ref_model": module}`` or ``{}`` (the stage then uses ``model`` with its
    adapters disabled).

    * not ``needed`` (a reference-free ``pref_loss``, grpo with ``beta`` 0): ``{}``, with a notice when
      ``ref_model`` is set for a reference-free ``pref_loss``;
    * ``ref``: the loaded ``ref_model`` (with its ``ref_model_adapters``), frozen here, in eval mode;
    * otherwise with LoRA: ``{}`` (the stage disables the adapters: no second copy);
    * otherwise (full / freeze fine-tuning): a frozen copy of the initial model, with a notice giving its
      memory in MiB.
    Call it after the trainable parameters are chosen and before training.
    """
    if not needed:
        if config.ref_model and config.pref_loss in REFERENCE_FREE:   # other stages: the config's notice says why
            notice(f"ref_model is ignored: pref_loss {config.pref_loss} needs no reference model")
        return {}
    if ref is None:
        if has_lora(model):
            return {}
        ref = frozen_copy(model)
        mib = sum(p.numel() * p.element_size() for p in ref.parameters()) / 2**20
        notice(f"stage {config.stage} with finetuning_type {config.finetuning_type}: the "
               f"reference model is a frozen copy of the initial model ({mib:.0f} MiB more memory); use "
               "finetuning_type lora to get it for free (adapters disabled) or set ref_model")
        return {"ref_model": ref}
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return {"ref_model": ref}


def reference_model(model: torch.nn.Module, ctx: StageContext) -> Optional[torch.nn.Module]:
    """The separate reference module of this run (``ctx.extra["ref_model"]``), or None when the reference is
    ``model`` with adapters disabled. Without either (a plain model given straight to a Trainer), a frozen
    copy is made on the first call, i.e. of the model before its first optimizer step, and kept in ``ctx``."""
    ref = ctx.extra.get("ref_model")
    if ref is None and not has_lora(model):
        ref = ctx.extra["ref_model"] = frozen_copy(model)
        notice("no reference model given and the model has no LoRA adapters: using a frozen copy of it")
    return ref


def reference_logps(model: torch.nn.Module, ctx: StageContext, input_ids: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                    labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, **vision: torch.Tensor
                    ) -> torch.Tensor:
    """Summed response log-probs ``(N,)`` float32 of the reference policy, without gradient. ``vision``: a
    vision-language batch's ``pixel_values`` / ``image_grid_thw`` (:func:`llmtune.data.multimodal.vision_inputs`).

    With ``cu_seqlens`` (a padding-free batch: ``input_ids (1, total)``) ``labels`` are the right-padded
    ``(N, T)`` rows and the hidden states are unpacked to them (:func:`llmtune.data.collator.unpack_rows`).

    The reference is :func:`reference_model` or, for a LoRA model, ``model`` under
    :func:`llmtune.peft.disable_adapters` (the base weights the adapters were added to).
    """
    ref = reference_model(model, ctx)
    with torch.no_grad():
        if ref is not None:
            hidden = ref(input_ids, attention_mask=attention_mask, position_ids=position_ids, **vision)
            return sequence_logps(unpack_rows(hidden, cu_seqlens), ref.lm_head.weight, labels)
        with disable_adapters(model):
            hidden = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, **vision)
            return sequence_logps(unpack_rows(hidden, cu_seqlens), model.lm_head.weight, labels)


def label_counts(labels: torch.Tensor) -> torch.Tensor:
    """Response tokens per row ``(N,)`` int64: ``(labels[:, 1:] != -100).sum(-1)`` (the shifted targets)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


# -- the stage ---------------------------------------------------------------------------------------------
def count_dpo_items(batch: dict) -> int:
    """Items of a dpo batch without a forward: pairs (``input_ids.shape[0] // 2``) + SFT rows."""
    n = num_rows(batch) // 2 if "input_ids" in batch else 0
    return n + (num_rows(batch, "sft_") if "sft_input_ids" in batch else 0)


def dpo_stage(model: torch.nn.Module, batch: dict, ctx: StageContext) -> tuple[torch.Tensor, int, dict]:
    """Stage ``dpo``: ``(model, batch, ctx) -> (loss_sum, num_items, metrics)``, see the module docstring.

    Returns: ``loss_sum`` float32 scalar (sum over pairs and SFT rows), ``num_items`` = pairs + SFT rows,
    ``metrics`` TRL's names averaged over the pairs (and ``sft_loss`` over the SFT rows).

    Raises: LLMTuneError for an unknown ``pref_loss``, ``pref_beta <= 0`` (sigmoid/hinge/ipo/kto_pair/simpo)
    or ``dpo_label_smoothing`` outside [0, 0.5).
    """
    cfg = ctx.config
    loss_type = check_pref_loss(cfg.pref_loss)
    beta = float(cfg.pref_beta)
    ftx = float(cfg.pref_ftx)
    weight = model.lm_head.weight
    loss_sum = torch.zeros((), dtype=torch.float32, device=weight.device)
    metrics: dict[str, Any] = {}
    items = 0
    if "input_ids" in batch:
        ids, mask, pos, labels = (batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                  batch["labels"])
        b = num_rows(batch) // 2
        cu = batch.get("cu_seqlens")                                        # padding-free: (1, N) packed rows
        vision = vision_inputs(batch)                                       # images: each pair's, twice
        hidden = model(ids, attention_mask=mask, position_ids=pos, **vision)  # ONE forward: chosen + rejected
        hidden, labels = unpack_rows(hidden, cu), unpack_rows(labels, cu, IGNORE_INDEX)
        sums = sequence_logps(hidden, weight, labels)                       # (2B,) summed logps
        avgs = sums / label_counts(labels).clamp(min=1)                     # (2B,) per-token means
        if loss_type == "orpo":
            losses, cr, rr = orpo_loss(avgs[:b], avgs[b:], beta)
            losses = losses - avgs[:b]                                      # L_SFT + lambda L_OR
            used = avgs
        elif loss_type == "simpo":
            losses, cr, rr = simpo_loss(avgs[:b], avgs[b:], beta, float(cfg.simpo_gamma))
            used = avgs
        else:
            ref = reference_logps(model, ctx, ids, mask, pos, labels, cu, **vision)  # ONE reference forward
            if loss_type == "ipo":
                ref = ref / label_counts(labels).clamp(min=1)
                used = avgs
            else:
                used = sums
            losses, cr, rr = dpo_loss(used[:b], used[b:], ref[:b], ref[b:], beta, loss_type,
                                      float(cfg.dpo_label_smoothing))
        if ftx > 0 and loss_type != "orpo":
            losses = losses - ftx * avgs[:b]
        loss_sum = loss_sum + losses.float().sum()
        items += b
        cr, rr = cr.float(), rr.float()
        metrics.update({"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
                        "rewards/accuracies": (cr > rr).float().mean(), "rewards/margins": (cr - rr).mean(),
                        "logps/chosen": used[:b].detach().mean(), "logps/rejected": used[b:].detach().mean()})
    if "sft_input_ids" in batch:
        alpha = float(cfg.kto_alpha or 0.0)
        hidden = model(batch["sft_input_ids"], attention_mask=batch.get("sft_attention_mask"),
                       position_ids=batch.get("sft_position_ids"), **vision_inputs(batch, "sft_"))
        cu = batch.get("sft_cu_seqlens")
        nll = -sequence_logps(unpack_rows(hidden, cu), weight, unpack_rows(batch["sft_labels"], cu, IGNORE_INDEX),
                              average=True)                                        # (S,) mean NLL per example
        loss_sum = loss_sum + alpha * nll.sum()
        items += nll.shape[0]
        metrics["sft_loss"] = nll.detach().mean()
    if items == 0:
        raise LLMTuneError("stage dpo: a batch holds neither chosen/rejected pairs nor SFT rows; check dataset")
    return loss_sum, items, metrics

