"""Per-row adapters: rows of one batch run with different LoRA adapters (or none) in one forward.

:func:`row_adapters` sets, for the forwards run inside it, one adapter name per batch row (dim 0 of every
layer input). Each :class:`~llmtune.peft.layers.LoraLinear` then computes the base product once for the whole
batch and adds each row's own low-rank delta: the adapters present in the batch are concatenated along the
rank, ``A_cat`` ``(sum r, in)`` and ``B_cat = [s_1 B_1 | s_2 B_2 | ...]`` ``(out, sum r)`` (scales folded in, no
padding to a common rank), and ``y = W0 x + B_cat ((A_cat x) * M)`` where the ``(rows, sum r)`` 0/1 mask ``M``
keeps, per row, the rank block of its adapter (all zero for a row without one). Two dense products whatever the
number of adapters: on the CPU that costs little more than one adapter, where a gather of per-row ``A``/``B``
(Punica's BGMV) would copy ``rows x r x (in + out)`` values per layer and step. DoRA adapters and
``modules_to_save`` copies, which are not low-rank deltas, run per group of rows (one call per adapter present).

A row whose name is None runs "the model as it is": the layer's one active adapter, or the base when none is
active (several active adapters cannot be mixed with named rows: an error). A batch whose rows all name the same
adapter takes the layer's usual single-adapter code (same kernels, same numerics as that adapter alone).

Inference only: nothing here carries gradients to the adapters (the concatenated weights are detached copies,
cached per layer and rebuilt when an adapter's tensors change: their ``_version`` counters are part of the key).

Source: S-LoRA (Sheng et al., 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters") and Punica (Chen
et al., 2023): the base product batched across adapters, each row's ``B A x`` from its own adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from llmtune.errors import LLMTuneError

__all__ = ["RowAdapters", "row_adapters", "current_rows", "has_lora_config"]

_ROWS: contextvars.ContextVar[Optional["RowAdapters"]] = contextvars.ContextVar("llmtune_row_adapters",
                                                                               default=None)


class RowAdapters:
    """The adapter name of each batch row (``names[i]`` for row ``i``; None = the model as it is) and the per-step
    tables derived from it (the rank mask of each layer layout, built once per step and shared by the layers)."""

    def __init__(self, names: Sequence[Optional[str]]) -> None:
        self.names = list(names)
        self.uniform = len(set(self.names)) == 1
        self._masks: dict = {}
        self._plans: dict = {}

    def plan(self, have: Sequence[str], active: Sequence[str]) -> tuple:
        """``(names, present, single)`` for a layer holding adapters ``have`` (in order) with ``active`` active:
        each row's name there (:meth:`local_names`), the adapters of ``have`` that some row uses (in ``have``'s
        order), and whether every row runs the same one. Cached for the step by the layer layout (most layers
        of a model share one), so the per-layer cost is one dictionary lookup. Raises as :meth:`local_names`."""
        key = (tuple(have), tuple(active))
        hit = self._plans.get(key)
        if hit is None:
            names = self.local_names(have, active)
            used = set(names)
            hit = self._plans[key] = (names, [n for n in have if n in used], len(used) == 1)
        return hit

    def local_names(self, have: Sequence[str], active: Sequence[str]) -> list:
        """The name each row runs in a layer holding adapters ``have`` with ``active`` active: a name of
        ``have`` or None (no delta). Raises :class:`LLMTuneError` for unnamed rows beside several active
        adapters."""
        live = [a for a in active if a in have]
        if None in self.names and len(live) > 1:
            raise LLMTuneError(f"a batch mixes rows without an adapter with named ones while {len(live)} adapters "
                               f"are active ({', '.join(live)}): activate at most one, or name every row's adapter")
        default = live[0] if live else None
        return [default if n is None else (n if n in have else None) for n in self.names]

    def mask(self, names: list, spans: dict, total: int, device: torch.device, dtype: torch.dtype,
             ndim: int = 2) -> torch.Tensor:
        """0/1 tensor ``(rows, 1, ..., 1, total)`` of ``ndim`` dims: row ``i`` keeps columns ``spans[names[i]]``
        (``(start, stop)``) of the concatenated rank; cached for the step by the layout."""
        key = (id(names), tuple(spans.values()), total, device, dtype, ndim)
        m = self._masks.get(key)
        if m is None:
            rows = []
            for n in names:
                row = [0.0] * total
                if n is not None:
                    a, b = spans[n]
                    row[a:b] = [1.0] * (b - a)
                rows.append(row)
            m = torch.tensor(rows, dtype=dtype, device=device).view(len(names), *([1] * (ndim - 2)), total)
            self._masks[key] = (names, m)   # names kept alive: its id stays unique while cached
            return m
        return m[1]


def current_rows() -> Optional[RowAdapters]:
    """The :class:`RowAdapters` of the innermost :func:`row_adapters` block of this thread, or None."""
    return _ROWS.get()


def has_lora_config(model: nn.Module) -> bool:
    """True when ``model`` holds named LoRA adapters (``model.lora_config``, filled by
    :func:`llmtune.peft.adapters.inject_lora`) that :func:`row_adapters` can select per row."""
    cfg = getattr(model, "lora_config", None)
    return isinstance(cfg, dict) and bool(cfg)


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[RowAdapters]:
    """Run the forwards inside with adapter ``names[i]`` for batch row ``i`` (see the module docstring).

    Args:
        model: a model with LoRA adapters (:func:`llmtune.peft.apply_lora` / :func:`llmtune.peft.load_adapter`).
        names: one adapter name (str) or None per row of dim 0 of the inputs; a single name covers a batch of
            any size (a packed prefill row).

    Raises:
        LLMTuneError: a name that is not one of ``model``'s adapters (the message lists them); in a layer, an
            input whose dim 0 is not ``len(names)`` when the names differ.
    """
    have = getattr(model, "lora_config", None) or {}
    unknown = [n for n in names if n is not None and n not in have]
    if unknown:
        raise LLMTuneError(f"no adapter named {unknown[0]!r}; the model has: {', '.join(have) or 'none'}")
    rows = RowAdapters(names)
    token = _ROWS.set(rows)
    try:
        yield rows
    finally:
        _ROWS.reset(token)
