"""Which parameters a run trains: ``finetuning_type`` lora, freeze or full (LLaMA-Factory's keys).

Step 6 of :func:`llmtune.train.setup.run_train` (:func:`prepare_stage`): the trainable parameters, then what the
stage's row asks for (a value head, a reference policy).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from llmtune import peft
from llmtune.errors import LLMTuneError, notice
from llmtune.train.stages import STAGES, stage_info
from llmtune.train.stages.pref import reference_policy


def prepare_stage(model: torch.nn.Module, cfg: Any, head_only: bool,
                  ref: Optional[torch.nn.Module] = None) -> dict:
    """Step 6: choose the trainable parameters (:func:`apply_finetuning_type`, unless ``head_only``), then what
    the stage's row asks for: ``prepare`` (rm: the value head) and ``reference`` (a reference policy: adapters
    disabled, ``ref`` (``ref_model``, loaded in step 3), or a frozen copy;
    :func:`llmtune.train.stages.pref.reference_policy`). Returns the stage context's ``extra`` dict.

    Raises:
        LLMTuneError: the errors of :func:`apply_finetuning_type`.
    """
    stage = stage_info(cfg.stage)
    if not head_only:
        apply_finetuning_type(model, cfg)
    if stage.prepare is not None:
        stage.prepare(model, cfg, head_only)  # rm: model.v_head, trainable
    if stage.reference is None:
        return {}
    return reference_policy(model, cfg, stage.reference(cfg), ref)


def apply_finetuning_type(model: torch.nn.Module, cfg: Any) -> None:
    """Choose the trainable parameters: ``lora`` (``llmtune.peft.apply_lora`` with the ``lora_*`` keys),
    ``freeze`` (``apply_freeze``) or ``full`` (everything, in float32). Trainable parameters end in float32
    whatever the base dtype. Keys that do not apply to the chosen type get one notice. Vision-language models:
    LoRA targets follow LLaMA-Factory's freeze keys (:func:`llmtune.models.qwen_vl.vl_lora_target`: the vision
    blocks too with ``freeze_vision_tower: false``), then :func:`~llmtune.models.qwen_vl.freeze_parts`.

    Raises:
        LLMTuneError: ``full`` on a 4-bit quantized model; the errors of ``apply_lora``/``apply_freeze``.
    """
    if not stage_info(cfg.stage).value_head and cfg.value_head_lr is not None:
        heads = " and ".join(name for name, row in STAGES.items() if row.value_head)
        notice(f"value_head_lr only applies to stages {heads} (the value head's learning rate); stage is "
               f"{cfg.stage}, so it is ignored")
    if cfg.finetuning_type != "lora":
        lora_keys = [k for k in ("lora_target", "lora_rank", "lora_alpha", "use_dora", "use_rslora")
                     if cfg.is_set(k)]
        if lora_keys:
            one = len(lora_keys) == 1
            notice(f"{', '.join(lora_keys)} only appl{'ies' if one else 'y'} to finetuning_type lora; "
                   f"finetuning_type is {cfg.finetuning_type}, so {'it is' if one else 'they are'} ignored")
    vl = getattr(model, "visual", None) is not None
    if cfg.finetuning_type == "lora":
        target, regex = cfg.lora_target, False
        if vl:   # vision-language: LoRA also on the vision blocks when freeze_vision_tower is false
            from llmtune.models.qwen_vl import vl_lora_target

            target, regex = vl_lora_target(model, cfg.lora_target, cfg.freeze_vision_tower,
                                           cfg.freeze_multi_modal_projector, cfg.freeze_language_model), True
        peft.apply_lora(model, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        lora_target=target, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                        additional_target=cfg.additional_target, regex=regex)
    elif cfg.finetuning_type == "freeze":
        peft.apply_freeze(model, freeze_trainable_layers=cfg.freeze_trainable_layers,
                          freeze_trainable_modules=cfg.freeze_trainable_modules,
                          freeze_extra_modules=cfg.freeze_extra_modules)
    else:
        if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
            raise LLMTuneError("finetuning_type: full cannot train 4-bit quantized weights; use finetuning_type: "
                               "lora (QLoRA) or remove quantization_bit")
        for p in model.parameters():
            p.requires_grad_(True)
            if p.dtype != torch.float32:
                p.data = p.data.float()
    if vl:   # vision-language models: LLaMA-Factory's freeze_* keys
        from llmtune.models.qwen_vl import freeze_parts

        freeze_parts(model, cfg.freeze_vision_tower, cfg.freeze_multi_modal_projector, cfg.freeze_language_model)
    for p in model.parameters():  # trainable parameters in float32 whatever the base dtype
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
