"""LoRA on MoE experts as grouped low-rank products: every expert's adapter of one projection in one product.

A MoE layer's experts keep PEFT's per-expert layout (``mlp.experts.{e}.gate_proj`` etc., each a
:class:`~llmtune.peft.layers.LoraLinear` when targeted), so ``lora_target`` names them as LLaMA-Factory and PEFT
users write them (``gate_proj``, ``up_proj``, ``down_proj``, or ``all``), and adapter files keep PEFT's keys
``base_model.model.model.layers.{l}.mlp.experts.{e}.gate_proj.lora_A.weight`` ``(r, hidden)`` /
``lora_B.weight`` ``(width, r)``: the layout PEFT writes for per-expert modules (transformers 4.x Qwen-MoE), and
the one PEFT maps onto transformers 5's fused expert tensors when it loads such a file (tested in
``tests/test_moe.py``). PEFT's own layout for fused 3-D expert parameters (``target_parameters``,
``ParamWrapper``: ``lora_A`` ``(r * E, in)``, ``lora_B`` ``(out, r * E)``, gate and up sharing one A) is not
written: a per-expert file is what both llmtune and PEFT read.

In the forward, the ``E`` adapters of a projection are stacked (``A`` ``(E, r, in)``, ``B`` ``(E, out, r)``:
small, differentiable, so each expert's ``lora_A``/``lora_B`` parameters get their gradients through the
stack) and applied to the token groups with the same grouped product as the base weight
(:func:`grouped_project`): ``y_e = W_e x + s * B_e (A_e x)`` for every expert ``e`` at once, no per-expert
Python loop in the compute.

Sources: Hu et al. 2021 (LoRA, eq. 3: ``h = W0 x + (alpha / r) B A x``); Kalajdzievski 2023 (rsLoRA scale);
PEFT's ``LoraLayer`` / ``ParamWrapper`` (key names and the fused-parameter layout that is not used here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from llmtune.peft.layers import LoraLinear


@dataclass
class LoraTerm:
    """One adapter on one projection of all ``E`` experts.

    ``a`` ``(E, r, in)`` and ``b`` ``(E, out_part, r)`` stacked from the experts' ``lora_A``/``lora_B`` weights
    (adapter dtype, differentiable); ``scale`` alpha/r (or alpha/sqrt(r)); ``dropout`` the adapter's dropout
    module (``nn.Identity`` without dropout); ``start`` the first output row of the (possibly fused) base
    projection that ``b``'s rows add to (0 for ``gate_proj`` and ``down_proj``, ``I`` for ``up_proj`` in the
    fused ``gate_up`` weight ``(E, 2I, H)``).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    dropout: nn.Module
    start: int = 0


def base_linear(module: nn.Module) -> nn.Module:
    """The base layer of a :class:`LoraLinear` (``module.base_layer``), else ``module`` itself."""
    return module.base_layer if isinstance(module, LoraLinear) else module


def _signature(m: LoraLinear) -> tuple:
    names = tuple(n for n in m.active_adapters if n in m.lora_A)
    return (m.adapters_disabled, bool(m.merged_adapters), names,
            tuple((m.r[n], m.scaling[n], m.use_dora[n], getattr(m.lora_dropout[n], "p", 0.0)) for n in names))


def lora_terms(modules: Sequence[nn.Module], start: int = 0) -> Optional[list[LoraTerm]]:
    """The adapters of one projection of all experts (``modules[e]`` is expert ``e``'s ``gate_proj``, ...).

    Returns ``[]`` when no module carries an active adapter (plain layers, or adapters disabled), a list of
    :class:`LoraTerm` (one per active adapter) when every expert has the same active adapters with the same
    rank, scale and dropout, and ``None`` when the experts cannot be grouped: a mix of wrapped and plain
    layers, different adapters per expert, DoRA, or adapters merged into the base weights (the per-expert
    loop of :func:`llmtune.models.moe.experts_forward` handles those).
    """
    wrapped = [isinstance(m, LoraLinear) for m in modules]
    if not any(wrapped):
        return []
    if not all(wrapped):
        return None
    sig = _signature(modules[0])
    if any(_signature(m) != sig for m in modules[1:]):
        return None
    disabled, merged, names, params = sig
    if merged or any(dora for _, _, dora, _ in params):
        return None
    if disabled:
        return []
    m0 = modules[0]
    return [LoraTerm(a=torch.stack([m.lora_A[n].weight for m in modules]),
                     b=torch.stack([m.lora_B[n].weight for m in modules]),
                     scale=m0.scaling[n], dropout=m0.lora_dropout[n], start=start) for n in names]


def grouped_project(inp: torch.Tensor, weight: torch.Tensor, terms: Sequence[LoraTerm],
                    mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """All experts' ``W_e x + sum_terms s B_e A_e dropout(x)`` with one grouped product per factor.

    Args:
        inp: the token rows grouped by expert, in the layout ``mm`` takes (``(E, C, in)`` padded groups for
            ``torch.bmm``, or ``(M, in)`` rows sorted by expert for ``torch._grouped_mm`` with offsets).
        weight: the base weights ``(E, out, in)`` (frozen; a view of the experts' stored weights).
        terms: adapters from :func:`lora_terms` (their ``b`` rows land at ``start:start + out_part``).
        mm: the grouped product ``mm(rows, w_t)`` with ``w_t`` ``(E, in, out)``.

    Returns:
        the projected rows, ``inp``'s layout with ``out`` features, in the base product's dtype. The adapters
        compute in ``inp``'s dtype under autocast (as :class:`LoraLinear` does), else in the adapters' dtype.
    """
    out = mm(inp, weight.transpose(1, 2))
    if not terms:
        return out
    dev = inp.device.type
    cdt = inp.dtype if torch.is_autocast_enabled(dev) else terms[0].a.dtype
    xin = inp.to(cdt)
    if all(isinstance(t.dropout, nn.Identity) or not t.dropout.training for t in terms):
        a = torch.cat([t.a for t in terms], dim=1).to(cdt)                      # (E, R, in)
        xa = mm(xin, a.transpose(1, 2))                                         # (..., R)
    else:   # each adapter sees its own dropout mask of the input, as in LoraLinear
        xa = torch.cat([mm(t.dropout(xin), t.a.to(cdt).transpose(1, 2)) for t in terms], dim=-1)
    col = 0
    for t in terms:   # each adapter's B product added in place into its rows of the base product
        r = t.a.shape[1]
        sl = slice(t.start, t.start + t.b.shape[1])
        delta = mm(xa[..., col:col + r] * t.scale, t.b.to(cdt).transpose(1, 2))
        out[..., sl] += delta.to(out.dtype)
        col += r
    return out
