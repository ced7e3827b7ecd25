"""The switch and the dispatch rule shared by every kernel in ``llmtune.kernels``.

A kernel runs in Triton when all of these hold, else its PyTorch reference runs (same signature, same
result up to rounding):

* kernels are enabled: :func:`set_enabled` (default on; the config key ``use_kernels`` sets it for a run)
  and the environment variable ``LLMTUNE_KERNELS`` is not ``0``/``false``/``no``/``off``;
* the ``triton`` package can be imported (it is optional: ``pip install llmtune[triton]``);
* the tensor is on a CUDA device, or ``LLMTUNE_FORCE_TRITON=1`` (tests: CPU tensors go to Triton's
  interpreter, with ``TRITON_INTERPRET=1`` set before the first kernel is defined).

Triton itself is imported only when a kernel is first launched.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

_ENABLED: Optional[bool] = None  # None: follow LLMTUNE_KERNELS
_TRITON_AVAILABLE: Optional[bool] = None
_OFF = ("0", "false", "no", "off")


def set_enabled(flag: Optional[bool]) -> None:
    """Turn the Triton kernels on (``True``) or off (``False``, every call takes the PyTorch reference);
    ``None`` goes back to the environment (``LLMTUNE_KERNELS=0`` turns them off). Process-wide."""
    global _ENABLED
    _ENABLED = None if flag is None else bool(flag)


def is_enabled() -> bool:
    """Whether kernels are switched on (by :func:`set_enabled`, else by ``LLMTUNE_KERNELS``; default on)."""
    if _ENABLED is not None:
        return _ENABLED
    return os.environ.get("LLMTUNE_KERNELS", "1").strip().lower() not in _OFF


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        _TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_AVAILABLE


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel on tensor ``t`` runs in Triton (see the module docstring for the rule)."""
    if not is_enabled() or not triton_available():
        return False
    return bool(t.is_cuda) or os.environ.get("LLMTUNE_FORCE_TRITON", "") == "1"
