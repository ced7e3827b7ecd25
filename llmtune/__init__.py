"""llmtune: pure-PyTorch training and fine-tuning of Llama and Qwen models.

Public API (imported lazily so ``import llmtune`` stays fast)::

    model = llmtune.load_model("path/or/hub-id-or.gguf", dtype="bfloat16")
    tok = llmtune.load_tokenizer("path/or/hub-id-or.gguf")
    llmtune.apply_lora(model, lora_rank=8, lora_target="all")
    llmtune.train({"stage": "sft", ...})
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Transformer": "llmtune.models.transformer",
    "ModelConfig": "llmtune.models.config",
    "KVCache": "llmtune.models.transformer",
    "load_model": "llmtune.runs",
    "load_tokenizer": "llmtune.tokenizer",
    "Tokenizer": "llmtune.tokenizer",
    "generate": "llmtune.generation",
    "apply_lora": "llmtune.peft",
    "train": "llmtune.train",
    "export": "llmtune.export",
    "LLMTuneError": "llmtune.errors",
    "losses": "llmtune.losses",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        # llmtune.train stays the package (callable: llmtune.train(config) runs a job), so that
        # "import llmtune.train.checkpoint" still resolves after llmtune.train was first reached here
        value = module if name in ("losses", "train") else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmtune' has no attribute {name!r}")
