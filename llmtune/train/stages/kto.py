"""Stage ``kto``: Kahneman-Tversky Optimization on examples labelled desirable / undesirable.

Source: Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8, as TRL's
``KTOTrainer`` implements it (:func:`llmtune.losses.kto_loss`).

Batch (``llmtune.data.collator.KTOCollator``): the completions ``input_ids, attention_mask, labels,
position_ids`` ``(B, T)``, the mismatched pairs (prompt ``i`` with completion ``i+1``) ``kl_input_ids,
kl_attention_mask, kl_labels, kl_position_ids`` ``(B, T_kl)``, and ``kto_tags`` bool ``(B,)`` (True =
desirable); a vision-language batch also ``pixel_values`` / ``image_grid_thw`` of each row's prompt images,
fed to the completion, the KL and (twice, stacked) the reference forwards. A paired dataset reaches this
stage already split by the data layer into one desirable and one undesirable example per pair.

Per step: policy log-probs of the completions (with gradient) and of the KL pairs (without: ``z0`` is
detached, as in TRL); reference log-probs of both in ONE stacked no-grad forward (``ctx.extra["ref_model"]``
or the policy with its LoRA adapters disabled, see :mod:`llmtune.train.stages.pref`);
``z0 = clamp(mean_i (logp_pi(y'_i|x_i) - logp_ref(y'_i|x_i)), 0)``. With several processes
(``torch.distributed`` initialised) the mean is over the KL pairs of ALL ranks (sum and count all-reduced,
:func:`global_kl_mean`), as TRL gathers them.

Keys: ``pref_beta`` (beta), ``kto_chosen_weight`` (lambda_D), ``kto_rejected_weight`` (lambda_U).
Items are examples. Metrics (TRL's names): ``rewards/chosen`` / ``rewards/rejected`` (mean ``beta * r`` over the
desirable / undesirable examples present; a key is absent from a micro-batch without such examples),
``kl`` (the ``z0`` used), ``logps/chosen``, ``logps/rejected`` (summed policy log-probs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmtune.constants import IGNORE_INDEX
from llmtune.data.collator import num_rows, unpack_rows
from llmtune.data.multimodal import vision_inputs
from llmtune.losses import kto_loss, sequence_logps
from llmtune.train.stages.base import StageContext
from llmtune.train.stages.pref import reference_logps



def global_kl_mean(diff: torch.Tensor) -> torch.Tensor:
    """Mean of ``diff`` ``(N,)`` over every rank's entries (plain mean in one process); 0-dim float32.

    The distributed hook of KTO's reference point: ``all_reduce`` of ``[sum, count]`` when
    ``torch.distributed`` is initialised, so every rank uses the same ``z0``.
    """
    stats = torch.stack([diff.detach().float().sum(), torch.tensor(float(diff.numel()), device=diff.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    return stats[0] / stats[1].clamp(min=1.0)


def _stack(a: dict, b: dict) -> dict:
    """Stack two right-padded batches ``(B1, T1)``, ``(B2, T2)`` to ``(B1 + B2, max T)`` (pad: id 0, mask 0,
    label -100, position 0); two padding-free ones (with ``cu_seqlens``) are concatenated into one."""
    if a.get("cu_seqlens") is not None:
        n_a = a["input_ids"].shape[1]
        out = {key: torch.cat([a[key], b[key]], dim=1) for key in ("input_ids", "labels", "position_ids")}
        out["attention_mask"] = torch.cat([a["attention_mask"], b["attention_mask"] + a["attention_mask"].max()],
                                          dim=1)
        out["cu_seqlens"] = torch.cat([a["cu_seqlens"], b["cu_seqlens"][1:] + n_a])
        return out
    t = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    pads = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
    out = {}
    for key, val in pads.items():
        if a.get(key) is None or b.get(key) is None:
            continue
        out[key] = torch.cat([F.pad(x[key], (0, t - x[key].shape[1]), value=val) for x in (a, b)])
    return out


def count_kto_items(batch: dict) -> int:
    """Items of a kto batch: its examples (``input_ids.shape[0]``)."""
    return num_rows(batch)


def kto_stage(model: torch.nn.Module, batch: dict, ctx: StageContext) -> tuple[torch.Tensor, int, dict]:
    """Stage ``kto``: ``(model, batch, ctx) -> (loss_sum, num_items, metrics)``, see the module docstring.

    Returns: ``loss_sum`` float32 scalar summed over the ``B`` examples, ``num_items = B``, TRL's metrics.
    Raises: nothing beyond :func:`llmtune.losses.kto_loss` (shape mismatches).
    """
    cfg = ctx.config
    beta = float(cfg.pref_beta)
    weight = model.lm_head.weight
    keys = ("input_ids", "attention_mask", "labels", "position_ids", "cu_seqlens")
    main = {k: batch.get(k) for k in keys}
    kl = {k: batch.get("kl_" + k) for k in keys}
    b = num_rows(batch)
    cu, kl_cu = main["cu_seqlens"], kl["cu_seqlens"]          # padding-free batches: (1, N) packed rows

    vision = vision_inputs(batch)      # images: each row's, shared by its completion and its kl_ completion
    hidden = model(main["input_ids"], attention_mask=main["attention_mask"], position_ids=main["position_ids"],
                   **vision)
    labels = unpack_rows(main["labels"], cu, IGNORE_INDEX)
    policy = sequence_logps(unpack_rows(hidden, cu), weight, labels)                         # (B,) with grad
    with torch.no_grad():
        kl_hidden = model(kl["input_ids"], attention_mask=kl["attention_mask"], position_ids=kl["position_ids"],
                          **vision)
        kl_labels = unpack_rows(kl["labels"], kl_cu, IGNORE_INDEX)
        policy_kl = sequence_logps(unpack_rows(kl_hidden, kl_cu), weight, kl_labels)          # (B,) no grad
    both = _stack(main, kl)
    both_labels = _stack({"input_ids": labels, "labels": labels}, {"input_ids": kl_labels, "labels": kl_labels}
                         )["labels"] if cu is not None else both["labels"]
    ref = reference_logps(model, ctx, both["input_ids"], both.get("attention_mask"), both.get("position_ids"),
                          both_labels, both.get("cu_seqlens"), **{k: torch.cat([v, v]) for k, v in vision.items()})
    ref_main, ref_kl = ref[:b], ref[b:]
    z0 = global_kl_mean(policy_kl - ref_kl)
    tags = batch["kto_tags"].bool()
    losses, rewards, z0 = kto_loss(policy, ref_main, policy_kl, ref_kl, tags, beta,
                                   float(cfg.kto_chosen_weight),
                                   float(cfg.kto_rejected_weight), kl=z0)
    metrics: dict[str, Any] = {"kl": z0.float()}
    if tags.any():
        metrics["rewards/chosen"] = rewards[tags].float().mean()
        metrics["logps/chosen"] = policy[tags].detach().mean()
    if (~tags).any():
        metrics["rewards/rejected"] = rewards[~tags].float().mean()
        metrics["logps/rejected"] = policy[~tags].detach().mean()
    return losses.float().sum(), b, metrics

