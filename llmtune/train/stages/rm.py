"""Stage ``rm``: a reward model, a scalar value head on the language model, trained on preference pairs.

Source: Ouyang et al., 2022, eq. 1 (Bradley-Terry loss on the score of the last token; per pair, the
1/C(K,2) factor replaced by the trainer's division by the pairs of the step); Ziegler et al., 2019 (the
value head); checkpoint layout of TRL / LLaMA-Factory (``value_head.safetensors``, keys
``v_head.summary.weight`` ``(1, H)`` and ``v_head.summary.bias`` ``(1,)``).

Batch (``PairwiseCollator``): ``input_ids, attention_mask, position_ids`` ``(2B, T)``, rows ``[:B]`` chosen,
``[B:]`` rejected. Score of a sequence = ``model.v_head`` at its last non-padding token
(:func:`llmtune.losses.value_head_scores`); loss per pair ``-log sigmoid(s_w - s_l)``; items = pairs;
metrics ``accuracy`` (fraction of pairs with ``s_w > s_l``; ``eval_accuracy`` in evaluation),
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (mean scores).

What is trained (:func:`prepare_reward_model`): LoRA adapters + the value head (``finetuning_type lora``),
everything (``full``), the chosen layers + head (``freeze``), or the value head ALONE on the frozen model when
``lora_target`` names only ``value`` (the seed's ``--lora_target value``: no module has that name; a notice
says so). The output folder then holds ``value_head.safetensors`` and no adapter, with ``llmtune.json``
recording ``base_model_name_or_path`` and ``parent_adapters`` (PPO's reward model,
:func:`llmtune.train.ppo.load_reward_model`, rebuilds it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from llmtune.data.collator import num_rows, unpack_rows
from llmtune.data.multimodal import vision_inputs
from llmtune.errors import LLMTuneError, notice
from llmtune.losses import reward_loss, value_head_scores
from llmtune.models.value_head import add_value_head
from llmtune.peft.targets import linear_modules
from llmtune.train.stages.base import StageContext

#: ``lora_target`` names meaning "the value head" (the seed writes ``value``)
VALUE_HEAD_NAMES = ("value", "v_head", "value_head")


def _lora_names(config: Any) -> list[str]:
    return [v.strip() for v in str(config.lora_target or "").split(",") if v.strip()]


def value_head_only(model: torch.nn.Module, config: Any) -> bool:
    """True when a ``stage: rm`` + ``finetuning_type: lora`` run's ``lora_target`` names only the value head
    (``value``, as the seed writes it): then the value head is trained alone on the frozen model.

    Raises:
        LLMTuneError: ``value`` mixed with module names (the value head is always trained in stage rm).
    """
    if config.stage != "rm" or config.finetuning_type != "lora":
        return False
    names = _lora_names(config)
    heads = [n for n in names if n.lower() in VALUE_HEAD_NAMES]
    if not heads:
        return False
    if len(heads) != len(names):
        others = [n for n in names if n.lower() not in VALUE_HEAD_NAMES]
        raise LLMTuneError(f"lora_target: {heads[0]!r} names the value head, which stage rm always trains; remove "
                           f"it and keep the module names ({','.join(others)})")
    return True


def _module_names(model: torch.nn.Module) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in linear_modules(model) if ".layers." in p or p.startswith("layers.")})


def prepare_reward_model(model: torch.nn.Module, config: Any, head_only: bool) -> torch.nn.Module:
    """Attach a fresh trainable float32 ``model.v_head`` (call after the trainable parameters are chosen).

    ``head_only`` (from :func:`value_head_only`): freeze every other parameter, mark
    ``model.value_head_only = True`` (the run then saves the head without an adapter) and print one notice
    naming the model's module names. Returns the value head.
    """
    if head_only:
        for p in model.parameters():
            p.requires_grad_(False)
        names = ", ".join(_module_names(model)) or "none"
        notice(f"lora_target value: no module is named 'value' (this model's modules: {names}); training the "
               "reward model's value head alone on the frozen model (use lora_target all to also train LoRA "
               "adapters)")
    head = add_value_head(model, torch.float32)
    model.value_head_only = bool(head_only)
    return head


def count_pairs(batch: dict) -> int:
    """Items of an rm batch: its pairs (``input_ids.shape[0] // 2``)."""
    return num_rows(batch) // 2


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    position_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                    **vision: torch.Tensor) -> torch.Tensor:
    """Reward ``(N,)`` float32 of each sequence: ``model.v_head`` at its last non-padding token.

    ``cu_seqlens`` ``(N + 1,)``: a padding-free batch (``input_ids (1, total)``), scored at each row's last token.
    ``vision``: a vision-language batch's ``pixel_values`` / ``image_grid_thw`` (each pair's images, twice).

    Raises: LLMTuneError when the model has no value head.
    """
    if getattr(model, "v_head", None) is None:
        raise LLMTuneError("stage rm needs a value head (model.v_head): call "
                           "llmtune.train.stages.rm.prepare_reward_model(model, config, head_only=False)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, **vision)
    if cu_seqlens is not None:   # the last token of each packed row
        return model.v_head(hidden[0, cu_seqlens[1:].to(hidden.device) - 1]).reshape(-1)
    return value_head_scores(model.v_head(hidden), attention_mask)


def rm_stage(model: torch.nn.Module, batch: dict, ctx: StageContext) -> tuple[torch.Tensor, int, dict]:
    """Stage ``rm``: ``(model, batch, ctx) -> (loss_sum, num_items, metrics)``, see the module docstring.

    Returns: ``loss_sum`` float32 (sum of Bradley-Terry losses over the ``B`` pairs), ``B``, metrics.
    """
    scores = sequence_scores(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                             batch.get("cu_seqlens"), **vision_inputs(batch))
    b = scores.shape[0] // 2
    chosen, rejected = scores[:b], scores[b:]
    losses = reward_loss(chosen, rejected)
    c, r = chosen.detach(), rejected.detach()
    metrics = {"accuracy": (c > r).float().mean(), "rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
               "rewards/margins": (c - r).mean()}
    return losses.sum(), b, metrics
