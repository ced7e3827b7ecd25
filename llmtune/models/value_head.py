"""Scalar value head for reward models (stage ``rm``) and PPO critics.

A ``Linear(hidden_size, 1)`` on the final hidden states, saved as ``value_head.safetensors`` with the keys
TRL's ``AutoModelForCausalLMWithValueHead`` and LLaMA-Factory use: ``v_head.summary.weight`` ``(1, hidden)``
and ``v_head.summary.bias`` ``(1,)``. Attached to a model as ``model.v_head``.
Source: Ziegler et al., 2019 (reward model as a scalar head on the LM); TRL's value-head checkpoint layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmtune.errors import LLMTuneError

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """``scores = summary(hidden)``: ``(..., hidden_size)`` -> ``(...)`` float32 values (one per token)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def add_value_head(model: nn.Module, dtype: torch.dtype = torch.float32) -> ValueHead:
    """Attach a fresh trainable :class:`ValueHead` as ``model.v_head`` (float32 by default) and return it."""
    head = ValueHead(model.config.hidden_size).to(device=model.lm_head.weight.device, dtype=dtype)
    model.v_head = head
    return head


def value_head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"v_head.summary.weight", "v_head.summary.bias"}`` tensors of ``model.v_head`` (contiguous, CPU)."""
    head = getattr(model, "v_head", None)
    if head is None:
        raise LLMTuneError("the model has no value head (model.v_head); only rm-stage models have one")
    return {f"v_head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}


def save_value_head(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``value_head.safetensors`` into ``out_dir``; returns its path."""
    from llmtune.fileio import save_tensors

    path = Path(out_dir) / VALUE_HEAD_FILE
    save_tensors(value_head_state_dict(model), str(path), metadata={"format": "pt"})
    return path


def load_value_head(model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> ValueHead:
    """Read ``folder/value_head.safetensors`` into a new ``model.v_head``.

    Raises:
        LLMTuneError: the file is missing, lacks the two keys, or its hidden size differs from the model's.
    """
    from safetensors.torch import load_file

    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise LLMTuneError(f"{path}: no value head here; a reward model must be the output folder of an "
                           "`llmtune train --stage rm` run (it holds value_head.safetensors)")
    tensors = load_file(str(path))
    try:
        weight, bias = tensors["v_head.summary.weight"], tensors["v_head.summary.bias"]
    except KeyError as e:
        raise LLMTuneError(f"{path}: missing key {e.args[0]!r} (expected v_head.summary.weight/bias)") from None
    if weight.shape != (1, model.config.hidden_size):
        raise LLMTuneError(f"{path}: value head weight has shape {tuple(weight.shape)} but the model's hidden "
                           f"size is {model.config.hidden_size}: the reward model was trained on another base")
    head = add_value_head(model, dtype)
    with torch.no_grad():
        head.summary.weight.copy_(weight)
        head.summary.bias.copy_(bias)
    return head
