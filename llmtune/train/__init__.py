"""Training: ``run_train(config)`` (what ``llmtune train`` runs), the :class:`Trainer` loop, stages.

Notebook use::

    import llmtune
    llmtune.train({"stage": "sft", "model_name_or_path": "...", "dataset": "alpaca_en_demo",
                   "template": "chatml", "finetuning_type": "lora", "output_dir": "out", "max_steps": 10})

See docs/training.md.
"""

from __future__ import annotations

from typing import Any

from llmtune.train.setup import run_train
from llmtune.train.stages import ITEM_COUNTERS, STAGES, Stage, StageContext, get_stage
from llmtune.train.trainer import Trainer


def train(config: Any) -> dict[str, Any]:
    """Notebook API: run one training job from a dict of LLaMA-Factory keys, a YAML path or a TrainConfig.

    Same as ``llmtune train`` on the command line (:func:`run_train`); returns the results dict
    (``train_loss``, ``train_runtime``, ``eval_loss``...). Raises ``LLMTuneError`` on user mistakes.
    """
    return run_train(config)


__all__ = ["train", "run_train", "Trainer", "STAGES", "ITEM_COUNTERS", "Stage", "StageContext", "get_stage"]


class _CallableModule(__import__("types").ModuleType):
    """Makes ``llmtune.train(config)`` work even after ``import llmtune.train.x`` has bound the attribute
    ``llmtune.train`` to this package (Python binds a package's submodules as attributes on import)."""

    def __call__(self, config: Any) -> dict[str, Any]:
        return train(config)


__import__("sys").modules[__name__].__class__ = _CallableModule
