"""Keys that a run would silently ignore: each gets one notice (what is ignored and why) or, where the user
clearly asked for two things that cannot both hold, an error.

Checked once per command, on the keys the user set (``TrainConfig.is_set``), by
:func:`llmtune.config.parse_config`. Sources: LLaMA-Factory's ``hparams`` (which keys each stage reads;
``neat_packing`` implies packing there, so ``packing: false`` with it is a contradiction).
"""

from __future__ import annotations

import os
from typing import Any

from llmtune.errors import LLMTuneError, notice

PREF_STAGES = ("dpo", "kto", "rm")
RL_STAGES = ("ppo", "grpo")
#: keys of the "preference" group that other stages read too
_SHARED_PREF = {"ref_model", "ref_model_adapters"}
#: groups that only ``llmtune train`` reads (chat and export read model, finetuning, data, generation, chat,
#: export keys)
_TRAIN_ONLY_GROUPS = ("training", "preference", "rl", "distributed")
#: training-group keys that chat/export read as well
_SHARED_TRAINING = {"seed", "bf16", "fp16", "use_kernels", "output_dir"}


def check_relevance(cfg: Any, command: Any) -> None:
    """Notices for keys ``command`` does not use, errors for contradictions (see the module docstring).

    Raises:
        LLMTuneError: ``neat_packing: true`` with ``packing: false``; ``packing: true`` for a stage that never
            packs (dpo, kto, rm, ppo, grpo).
    """
    from llmtune.config.keys import KEYS

    given = [k for k in KEYS if cfg.is_set(k)]
    if command in ("chat", "export"):
        ignored = [k for k in given if KEYS[k].metadata["group"] in _TRAIN_ONLY_GROUPS and k not in _SHARED_TRAINING]
        if ignored:
            notice(f"llmtune {command} ignores the training keys {', '.join(ignored)} (they apply to llmtune "
                   "train only)")
        return
    if command != "train":
        return
    stage = cfg.stage
    if stage not in PREF_STAGES:
        ignored = [k for k in given if KEYS[k].metadata["group"] == "preference" and k not in _SHARED_PREF
                   and not (k == "kto_alpha" and stage == "dpo")]
        if stage not in RL_STAGES and any(k in given for k in _SHARED_PREF):
            ignored += [k for k in _SHARED_PREF if k in given]
        if ignored:
            notice(f"stage {stage} ignores {', '.join(ignored)} (preference keys, read by stages dpo, kto and rm)")
    if stage not in RL_STAGES:
        ignored = [k for k in given if KEYS[k].metadata["group"] == "rl"]
        if ignored:
            notice(f"stage {stage} ignores {', '.join(ignored)} (online RL keys, read by stages ppo and grpo); "
                   "reward_funcs and reward_model are neither loaded nor checked")
    if cfg.is_set("neat_packing") and cfg.neat_packing and cfg.is_set("packing") and cfg.packing is False:
        raise LLMTuneError("neat_packing: true packs examples (without attention across them), which packing: "
                           "false forbids; set one of them")
    if cfg.is_set("packing") and cfg.packing and stage not in ("pt", "sft"):
        raise LLMTuneError(f"packing: true: stage {stage} never packs examples into one sequence (its pairs or "
                           "rollouts are batched padding-free instead); remove packing, or use stage pt or sft")
    if ((cfg.eval_dataset or float(cfg.val_size or 0) > 0) and cfg.do_train and not cfg.do_eval
            and cfg.eval_strategy == "no"):
        notice("val_size / eval_dataset set evaluation rows aside but nothing evaluates them; set do_eval: true "
               "(after training) or eval_strategy: steps/epoch (during training)")
    if cfg.fsdp and "WORLD_SIZE" not in os.environ:
        notice(f"fsdp: {cfg.fsdp} shards a model across processes started by torchrun; this is one process, so "
               "nothing is sharded (run: torchrun --nproc_per_node N -m llmtune train ...)")


__all__ = ["check_relevance"]
