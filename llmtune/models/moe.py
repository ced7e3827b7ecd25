"""Sparse mixture-of-experts feed-forward blocks of Qwen2-MoE and Qwen3-MoE, and their load-balancing loss.

A decoder layer of a MoE model replaces the dense SwiGLU MLP by :class:`SparseMoeBlock` (the layer rule is
:meth:`llmtune.models.config.ModelConfig.is_moe_layer`). For each token ``x`` (a row of hidden states):

* router: ``logits = gate(x)`` ``(num_experts,)``; ``p = softmax(logits)`` in float32; the ``top_k``
  (``num_experts_per_tok``) largest ``p_e`` are kept, divided by their sum when ``norm_topk_prob``;
* experts: ``y = sum_{e in top_k} p_e * expert_e(x)``, each expert a SwiGLU MLP of width
  ``moe_intermediate_size``;
* shared expert (Qwen2-MoE, ``shared_expert_intermediate_size > 0``): ``y += sigmoid(shared_expert_gate(x)) *
  shared_expert(x)``, an always-on SwiGLU MLP gated by a scalar per token.

Parameter layout (the names of the checkpoints on the Hugging Face Hub, so they load name for name and LoRA
targets are PEFT's): ``mlp.gate.weight`` ``(num_experts, hidden)`` (the router), per expert
``mlp.experts.{e}.gate_proj / up_proj / down_proj.weight`` as separate ``nn.Linear`` modules,
``mlp.shared_expert.{gate,up,down}_proj.weight`` and ``mlp.shared_expert_gate.weight`` ``(1, hidden)``.
transformers 5 keeps the experts fused in memory (``mlp.experts.gate_up_proj`` ``(E, 2I, H)``, ``down_proj``
``(E, H, I)``) but reads and writes these per-expert names; separate modules let LoRA, QLoRA (``Linear4bit``)
and PEFT adapters address each expert projection by its name.

Expert compute never loops over tokens: the ``N * top_k`` (token, expert) assignments are sorted by expert,
the token rows gathered once, and each expert multiplies all of its rows at once
(:func:`experts_forward`). Frozen experts (LoRA training, evaluation) are stored grouped: on first use their
per-expert weights become views of one ``(E, 2I, H)`` gate+up stack and one ``(E, H, I)`` down stack
(:func:`frozen_groups`), and all experts run as one grouped product per projection (padded ``torch.bmm`` on the
CPU, ``torch._grouped_mm`` on CUDA in bfloat16), their LoRA adapters as grouped low-rank products
(:mod:`llmtune.peft.experts`). Trainable experts (full fine-tuning) run the per-expert loop, or, on CUDA with
``torch._grouped_mm`` and plain bfloat16 experts without autograd, one grouped product per projection over
stacked copies. The results are scattered back weighted by the routing weights.

Sources: Shazeer et al. 2017 (sparsely-gated MoE, top-k gating); Fedus et al. 2021, Switch Transformers,
eq. 4-6 (load-balancing loss); Qwen team, Qwen1.5-MoE / Qwen2 technical report (shared experts, 2024) and
Qwen3 technical report (2025); transformers' ``modeling_qwen2_moe.py`` / ``modeling_qwen3_moe.py``
(``Qwen2MoeSparseMoeBlock``, ``load_balancing_loss_func``) as the reference implementation.
"""

from __future__ import annotations

import os
import re
import weakref
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmtune.compat import is_cuda
from llmtune.models.config import ModelConfig
from llmtune.models.moe_padded import _capacity, _plan  # noqa: F401 (_capacity: tests)
from llmtune.models.moe_sorted import SortedExpertsLora, slot_layout
from llmtune.peft.experts import LoraTerm, base_linear, grouped_project, lora_terms

#: the grouped path for frozen (LoRA-trained, evaluated) experts; ``LLMTUNE_MOE_GROUPED=0`` keeps the per-expert
#: loop (for before/after benchmarks)
GROUPED_FROZEN = os.environ.get("LLMTUNE_MOE_GROUPED", "1") != "0"


class ExpertMLP(nn.Module):
    """One SwiGLU expert ``down(silu(gate(x)) * up(x))`` of width ``intermediate_size``, no biases.

    Input ``(..., hidden_size)``, output ``(..., hidden_size)`` in the input dtype.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k softmax routing (Shazeer et al. 2017; Qwen2-MoE / Qwen3-MoE).

    Args:
        router_logits: ``(N, num_experts)`` router outputs of N tokens, any float dtype.
        top_k: experts per token.
        norm_topk_prob: divide the kept probabilities by their sum (Qwen3-MoE's setting).

    Returns:
        ``(weights, experts, probs)``: ``weights`` ``(N, top_k)`` in the logits' dtype, ``experts``
        ``(N, top_k)`` int64 expert ids in descending probability, ``probs`` ``(N, num_experts)`` the full
        float32 softmax (for the load-balancing loss).
    """
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts, probs


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.bias is None


def _can_group(x: torch.Tensor, experts: Sequence[ExpertMLP]) -> bool:
    """True when llmtune runs every expert at once with ``torch._grouped_mm``: CUDA, bfloat16, no autograd
    (inference, evaluation, reference-model forwards: in training the stacked weights would be kept for the
    backward, a second copy of every expert), at least as many token rows as experts (decoding a few tokens
    touches only their experts), plain bias-free ``nn.Linear`` projections (no LoRA wrapper, no 4-bit
    layer) and widths that are multiples of 8."""
    if not (is_cuda(x) and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):   # torch >= 2.8
        return False
    if torch.is_grad_enabled() or x.shape[0] < len(experts):
        return False
    for e in experts:
        if not (_plain_linear(e.gate_proj) and _plain_linear(e.up_proj) and _plain_linear(e.down_proj)):
            return False
        if e.gate_proj.weight.dtype != torch.bfloat16:
            return False
    h, i = experts[0].gate_proj.in_features, experts[0].gate_proj.out_features
    return h % 8 == 0 and i % 8 == 0


_GROUPED_MM_FAILED = False


_STACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _stacked_weights(experts: Sequence[ExpertMLP]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' gate, up and down weights stacked to ``(E, in, out)`` (transposed views).

    With autograd on, stacked afresh (the stack is part of the graph, so full fine-tuning trains the experts).
    Without autograd (inference, evaluation, reference forwards) the stack is kept, keyed by the first expert
    module, and rebuilt when any weight changes: a key of each weight's storage address and version counter
    (an optimizer step or ``copy_`` updates weights in place and bumps the version; ``.data =`` or a reload
    changes the address). Costs one stacked copy of the experts per MoE layer while kept."""
    weights = [getattr(e, n).weight for n in ("gate_proj", "up_proj", "down_proj") for e in experts]
    key = None
    if not torch.is_grad_enabled():
        try:
            key = tuple((w.data_ptr(), w._version) for w in weights)
        except RuntimeError:   # inference-mode tensors have no version counter: not kept
            pass
    cache = key is not None
    if cache:
        hit = _STACKED.get(experts[0])
        if hit is not None and hit[0] == key:
            return hit[1]
    e = len(experts)
    stacked = tuple(torch.stack(weights[i * e:(i + 1) * e]).transpose(1, 2) for i in range(3))
    if cache:
        _STACKED[experts[0]] = (key, stacked)
    else:
        _STACKED.pop(experts[0], None)   # training: a kept stack would be stale after the step
    return stacked


def _grouped_swiglu(rows: torch.Tensor, counts: torch.Tensor, experts: Sequence[ExpertMLP]) -> torch.Tensor:
    """All experts' SwiGLU on rows sorted by expert, as three ``torch._grouped_mm`` products.

    ``rows`` ``(M, H)`` bfloat16 sorted by expert, ``counts`` ``(E,)`` rows per expert. The per-expert weights
    are stacked to ``(E, in, out)`` by :func:`_stacked_weights` (kept between no-grad forwards; differentiable
    with autograd on, so full fine-tuning trains them too).
    """
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    w_gate, w_up, w_down = _stacked_weights(experts)
    g = torch._grouped_mm(rows, w_gate, offs=offs)
    u = torch._grouped_mm(rows, w_up, offs=offs)
    return torch._grouped_mm(F.silu(g) * u, w_down, offs=offs)


def _sort_assignments(top_experts: torch.Tensor, num_experts: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, token, counts)``: the ``N * k`` assignments sorted by expert (stable), the token row of each
    sorted assignment, and the rows per expert ``(E,)``."""
    flat = top_experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, order // top_experts.shape[1], torch.bincount(flat, minlength=num_experts)


def _views_of(groups: tuple[torch.Tensor, torch.Tensor], bases: list[list[nn.Module]]) -> bool:
    """True when every expert's gate/up/down weight is still the slice of ``groups`` it was made (a reload,
    ``.to()`` or ``weight.data = ...`` gives a weight its own storage again)."""
    gate_up, down = groups
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        for w, want in ((bases[0][e].weight, gate_up[e, :inter]), (bases[1][e].weight, gate_up[e, inter:]),
                        (bases[2][e].weight, down[e])):
            if w.data_ptr() != want.data_ptr() or w.dtype != want.dtype or w.shape != want.shape \
                    or w.stride() != want.stride():
                return False
    return True


def frozen_groups(experts: Sequence[nn.Module]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The experts' frozen base weights stored grouped: ``gate_up`` ``(E, 2I, H)`` (rows ``[:I]`` gate, ``[I:]``
    up, transformers 5's layout) and ``down`` ``(E, H, I)``, of which each expert's ``weight`` parameters are
    views (the parameters keep their identity and names, so loading, saving, LoRA targets and merging see the
    per-expert layout; the grouped compute reads the stacks without copying them).

    Made once (one copy of the layer's experts while it is made) and kept on ``experts`` as
    ``_llmtune_groups``; made again when a weight stopped being a view. None (the per-expert loop is used) when
    any projection is not a bias-free ``nn.Linear`` (a 4-bit layer), requires grad while autograd is on (full
    fine-tuning: the gradients must reach the per-expert parameters; without autograd they are grouped too, and
    an optimizer's in-place updates of the per-expert parameters write into the stacks), or the experts differ
    in dtype/device.
    """
    names = ("gate_proj", "up_proj", "down_proj")
    bases = [[base_linear(getattr(e, n)) for e in experts] for n in names]
    first = bases[0][0].weight
    grad = torch.is_grad_enabled()
    for group in bases:
        for m in group:
            if type(m) is not nn.Linear or m.bias is not None or (grad and m.weight.requires_grad) \
                    or m.weight.dtype != first.dtype or m.weight.device != first.device or first.is_meta:
                return None
    kept = getattr(experts, "_llmtune_groups", None)
    if kept is not None and _views_of(kept, bases):
        return kept
    num, (inter, hidden) = len(experts), first.shape
    with torch.no_grad():
        gate_up = torch.empty(num, 2 * inter, hidden, dtype=first.dtype, device=first.device)
        down = torch.empty(num, hidden, inter, dtype=first.dtype, device=first.device)
        for e in range(num):
            gate_up[e, :inter].copy_(bases[0][e].weight)
            gate_up[e, inter:].copy_(bases[1][e].weight)
            down[e].copy_(bases[2][e].weight)
            bases[0][e].weight.data = gate_up[e, :inter]
            bases[1][e].weight.data = gate_up[e, inter:]
            bases[2][e].weight.data = down[e]
    object.__setattr__(experts, "_llmtune_groups", (gate_up, down))
    return gate_up, down


def _grouped_frozen(x: torch.Tensor, experts: Sequence[nn.Module], top_experts: torch.Tensor,
                    top_weights: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`experts_forward` for frozen experts (LoRA training, evaluation) as grouped products; None when the
    experts cannot be grouped (see :func:`frozen_groups` and :func:`llmtune.peft.experts.lora_terms`).

    Three layouts of the sorted rows, the same products. On CUDA in bfloat16 with widths that are multiples of
    8: ``torch._grouped_mm`` over the ``(M, H)`` sorted rows. Elsewhere, with one adapter per projection and no
    active dropout (LoRA training): :class:`~llmtune.models.moe_sorted.SortedExpertsLora`, one ``torch.mm`` per
    expert and projection on views of the stacked weights over the expert's block of sorted rows (rounded up
    to 16 rows by :func:`~llmtune.models.moe_sorted.slot_layout`), forward and backward written out, the
    routing weight applied before the down projection (measured on this CPU at Qwen3-MoE shapes, one thread:
    0.75x the CPU time of the padded ``torch.bmm`` levels below, which pad 1.3-1.5x on random-init routing and
    copy the crowded experts' weights; docs/performance.md). Otherwise (no adapters, several adapters, active
    dropout) autograd runs through :func:`grouped_project` on one ``torch.bmm`` over ``(E, C, H)`` groups
    padded with zero rows (:func:`_padded_level`); the levels come from
    :func:`~llmtune.models.moe_padded._plan`: the first over all experts padded to ``C`` rows (the largest
    group when routing is balanced), the rows of crowded experts beyond ``C`` in up to three more padded
    products over those experts alone, their weights gathered.
    """
    groups = frozen_groups(experts)
    if groups is None:
        return None
    gate_up, down = groups
    num, inter = len(experts), gate_up.shape[1] // 2
    terms_gu = lora_terms([e.gate_proj for e in experts], 0)
    terms_up = lora_terms([e.up_proj for e in experts], inter)
    terms_d = lora_terms([e.down_proj for e in experts], 0)
    if terms_gu is None or terms_up is None or terms_d is None:
        return None
    n, k = top_experts.shape
    m, h = n * k, x.shape[1]
    order, token, counts = _sort_assignments(top_experts, num)
    w_sorted = top_weights.reshape(-1)[order]
    ranks = {t.a.shape[1] for t in terms_gu + terms_up + terms_d}
    if is_cuda(x) and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 == gate_up.dtype \
            and h % 8 == 0 and inter % 8 == 0 and all(r % 8 == 0 for r in ranks):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)

        def mm(a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
            return torch._grouped_mm(a, w_t, offs=offs)

        gu = grouped_project(x[token], gate_up, terms_gu + terms_up, mm)
        y = grouped_project(F.silu(gu[:, :inter]) * gu[:, inter:], down, terms_d, mm)
        y = y * w_sorted[:, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))
    sizes = counts.tolist()
    if m == 0:
        return None
    eid = top_experts.reshape(-1)[order]
    pos = torch.arange(m, device=x.device) - (torch.cumsum(counts, 0) - counts)[eid]
    fused = _fused_lora(x, gate_up, terms_gu, terms_up, terms_d)
    if fused is not None:   # padding slots read row 0 with routing weight 0 (exact zeros)
        xc, lora = fused
        slot, spans, total = slot_layout(sizes, eid, pos)
        src = torch.zeros(total, dtype=torch.long, device=x.device).index_put_((slot,), token)
        wslot = w_sorted.new_zeros(total).index_put((slot,), w_sorted)
        return SortedExpertsLora.apply(xc, wslot, src, spans, gate_up, down, *lora).to(x.dtype)
    xz = torch.cat([x, x.new_zeros(1, h)])    # row n: the zero row that padding slots read
    out = x.new_zeros(n + 1, h)
    ids = remap = None                         # level 0: all experts, the stacks themselves (no copy)
    keep = torch.ones(m, dtype=torch.bool, device=x.device)
    plan = _plan(sizes)
    for level, end in enumerate(plan):
        cap = end - (plan[level - 1] if level else 0)
        here = keep & (pos < cap)
        local = eid if remap is None else remap[eid]
        w_gu, w_d = (gate_up, down) if ids is None else (gate_up.index_select(0, ids), down.index_select(0, ids))
        t_gu, t_d = (terms_gu + terms_up, terms_d) if ids is None else (
            _select(terms_gu + terms_up, ids), _select(terms_d, ids))
        num_l = len(sizes)
        slot = local[here] * cap + pos[here]
        out = _padded_level(xz, out, w_sorted, here, slot, token, num_l, cap, n, w_gu, w_d, t_gu, t_d, inter)
        crowded = [i for i, c in enumerate(sizes) if c > cap]
        if not crowded:
            break
        # the experts with rows beyond ``cap``: their remaining rows, a smaller padded product over them alone
        new_ids = torch.tensor(crowded, device=x.device)
        ids = new_ids if ids is None else ids[new_ids]
        remap = torch.full((num,), -1, dtype=torch.long, device=x.device)
        remap[ids] = torch.arange(len(crowded), device=x.device)
        keep = keep & (pos >= cap)
        pos = pos - cap
        sizes = [sizes[i] - cap for i in crowded]
    return out[:n]


def _padded_level(xz: torch.Tensor, out: torch.Tensor, w_sorted: torch.Tensor, here: torch.Tensor,
                  slot: torch.Tensor, token: torch.Tensor, num_l: int, cap: int, n: int, w_gu: torch.Tensor,
                  w_d: torch.Tensor, t_gu: list, t_d: list, inter: int) -> torch.Tensor:
    """One padded level of :func:`_grouped_frozen` with autograd through every op (any number of adapters,
    dropout): ``xz`` ``(n + 1, H)`` the rows and a zero row ``n`` that padding slots read; adds the weighted
    expert outputs into ``out`` ``(n + 1, H)`` and returns it."""
    h = xz.shape[1]
    src = torch.full((num_l * cap,), n, dtype=torch.long, device=xz.device)
    src[slot] = token[here]
    wslot = w_sorted.new_zeros(num_l * cap).index_put((slot,), w_sorted[here])
    xp = xz[src].view(num_l, cap, h)
    gu = grouped_project(xp, w_gu, t_gu, torch.bmm)
    y = grouped_project(F.silu(gu[..., :inter]) * gu[..., inter:], w_d, t_d, torch.bmm)
    return out.index_add_(0, src, (y.reshape(num_l * cap, h) * wslot[:, None].to(y.dtype)).to(xz.dtype))


def _fused_lora(x: torch.Tensor, gate_up: torch.Tensor, terms_gu: list, terms_up: list, terms_d: list
                  ) -> Optional[tuple[torch.Tensor, list]]:
    """``(x in the compute dtype, [a_gu, b_g, b_u, a_d, b_d, scale])`` when the experts can run as
    :class:`~llmtune.models.moe_sorted.SortedExpertsLora`: exactly one adapter on each of gate, up and down
    with one rank and scale, no active dropout, and base weights in the compute dtype (autocast's, else
    ``x``'s); None otherwise (the autograd path :func:`_padded_level`)."""
    if not (len(terms_gu) == len(terms_up) == len(terms_d) == 1):
        return None
    tg, tu, td = terms_gu[0], terms_up[0], terms_d[0]
    if len({tg.scale, tu.scale, td.scale}) != 1 or len({tg.a.shape[1], tu.a.shape[1], td.a.shape[1]}) != 1:
        return None
    if any(not isinstance(t.dropout, nn.Identity) and t.dropout.training for t in (tg, tu, td)):
        return None
    dev = x.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if gate_up.dtype != cdt or not x.is_floating_point():
        return None
    return x.to(cdt), [torch.cat([tg.a, tu.a], dim=1), tg.b, tu.b, td.a, td.b, float(tg.scale)]


def _select(terms: list, ids: torch.Tensor) -> list:
    """The adapters of the experts ``ids`` only (differentiable row selection of the stacked factors)."""
    return [LoraTerm(a=t.a[ids], b=t.b[ids], scale=t.scale, dropout=t.dropout, start=t.start) for t in terms]


def experts_forward(x: torch.Tensor, experts: Sequence[nn.Module], top_experts: torch.Tensor,
                    top_weights: torch.Tensor, grouped: Optional[bool] = None) -> torch.Tensor:
    """``y[n] = sum_j top_weights[n, j] * experts[top_experts[n, j]](x[n])``, grouped by expert.

    The ``N * k`` assignments are sorted by expert id (stable, so each token's contributions are added in
    expert order as the reference does), the rows gathered once, each expert applied to all of its rows in
    one call (with autograd on, experts with no rows are called on an empty batch, so every expert and adapter
    takes part in the graph and gets a (zero) gradient, as DDP requires; without autograd they are skipped),
    and the weighted outputs summed back per token with ``index_add``. With ``grouped`` (default: when
    :func:`_can_group` holds) the experts run as ``torch._grouped_mm`` products instead of the per-expert loop.
    By default, frozen experts (LoRA training, evaluation, on any device), LoRA'd or not, run as grouped
    products with their adapters as grouped low-rank products (:func:`_grouped_frozen`); every expert's
    adapters take part (zero gradients for experts without rows).

    Args:
        x: ``(N, H)`` token rows, any float dtype.
        experts: ``E`` modules mapping ``(M, H) -> (M, H)`` (``ExpertMLP``, possibly with LoRA or 4-bit
            projections).
        top_experts: ``(N, k)`` int64 expert ids.
        top_weights: ``(N, k)`` routing weights (same dtype as ``x`` or castable).
        grouped: force (True) or forbid (False: the per-expert loop) the ``torch._grouped_mm`` path of
            :func:`_grouped_swiglu`.

    Returns:
        ``(N, H)`` in ``x``'s dtype.
    """
    global _GROUPED_MM_FAILED
    num_experts = len(experts)
    if grouped is None:
        grouped = not _GROUPED_MM_FAILED and _can_group(x, experts)
        if not grouped and GROUPED_FROZEN:
            out = _grouped_frozen(x, experts, top_experts, top_weights)
            if out is not None:
                return out
    order, token, counts = _sort_assignments(top_experts, num_experts)
    rows = x[token]
    out_rows = None
    if grouped:
        try:
            out_rows = _grouped_swiglu(rows, counts, experts)
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_FAILED = True  # e.g. an unsupported GPU: use the sorted loop from now on
            out_rows = None
    if out_rows is None:
        sizes = counts.tolist()
        pieces = rows.split(sizes)
        every = torch.is_grad_enabled()
        outs = [experts[e](pieces[e]) for e in range(num_experts) if every or sizes[e]]
        out_rows = torch.cat(outs) if outs else rows
    out_rows = out_rows * top_weights.reshape(-1)[order, None].to(out_rows.dtype)
    out = torch.zeros_like(x)
    return out.index_add_(0, token, out_rows.to(x.dtype))


class SparseMoeBlock(nn.Module):
    """Qwen2-MoE / Qwen3-MoE sparse feed-forward block (``Qwen2MoeSparseMoeBlock`` semantics).

    Modules: ``gate`` (router, ``nn.Linear(hidden, num_experts, bias=False)``), ``experts`` (``ModuleList``
    of :class:`ExpertMLP`), and with ``shared_expert_intermediate_size > 0`` ``shared_expert`` (SwiGLU) and
    ``shared_expert_gate`` (``nn.Linear(hidden, 1, bias=False)``).

    ``forward(x)``: ``(B, T, H) -> (B, T, H)`` in ``x``'s dtype. It keeps the routing of its last call in
    ``self.router_state = (probs (B*T, E) float32, experts (B*T, k))`` for :func:`load_balancing_loss`
    (read and cleared by the model after each forward).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(h, config.num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(h, config.moe_intermediate_size) for _ in range(config.num_experts))
        if config.shared_expert_intermediate_size:
            self.shared_expert = ExpertMLP(h, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.router_state: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[batch, seq, hidden]`` -> the top-k experts' SwiGLU outputs weighted by the router's probabilities,
        same shape and dtype (Qwen2/3-MoE routing, plus the gated shared expert where the model has one); the
        router's ``(probs, top)`` are kept in ``router_state`` for :func:`collect_aux_loss`."""
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        weights, top, probs = route(self.gate(flat), self.top_k, self.norm_topk_prob)
        self.router_state = (probs, top)
        out = experts_forward(flat, self.experts, top, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(b, t, h)


def load_balancing_loss(router_states: Sequence[tuple[torch.Tensor, torch.Tensor]], num_experts: int,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), as transformers computes it.

    ``loss = E * sum_e f_e * P_e`` where, over all MoE layers' token rows together (transformers' Qwen-MoE
    ``load_balancing_loss_func`` pools the layers before taking the product), ``f_e`` = (top-k assignments
    to expert e) / (rows) and ``P_e`` = mean router probability of expert e. A perfectly balanced router
    gives ``top_k``. Padding rows (``attention_mask == 0``) are left out of both sums.

    Args:
        router_states: per MoE layer ``(probs (N, E) float32, experts (N, k) int64)`` with ``N = B * T``.
        num_experts: ``E``.
        attention_mask: ``(B, T)`` with 0 for padding (segment ids > 0 count as tokens), or None.

    Returns:
        a float32 scalar (differentiable through ``probs``).
    """
    device = router_states[0][0].device
    count = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    keep = None if attention_mask is None else (attention_mask.reshape(-1) > 0).to(device=device, dtype=torch.float32)
    for probs, top in router_states:
        w = torch.ones(probs.shape[0], dtype=torch.float32, device=device) if keep is None else keep
        count = count + torch.zeros_like(count).index_add_(0, top.reshape(-1), w.repeat_interleave(top.shape[1]))
        prob_sum = prob_sum + (probs * w[:, None]).sum(0)
        rows = rows + w.sum()
    rows = rows.clamp(min=1.0)
    return num_experts * torch.sum((count / rows) * (prob_sum / rows))


def collect_aux_loss(blocks: Sequence[nn.Module], attention_mask: Optional[torch.Tensor], compute: bool = True
                     ) -> Optional[torch.Tensor]:
    """The load-balancing loss of the last forward of ``blocks`` (the layers' ``mlp`` modules; those that are
    not :class:`SparseMoeBlock` are skipped); None when no MoE block ran or ``compute`` is False.

    Reads and clears every block's ``router_state``. ``attention_mask`` ``(B, T)`` as given to the forward
    (None: every row counts); ``compute=False`` (decoding with a KV cache) only clears.
    """
    states, num_experts = [], 0
    for m in blocks:
        if isinstance(m, SparseMoeBlock) and m.router_state is not None:
            states.append(m.router_state)
            num_experts = m.num_experts
            m.router_state = None
    if not states or not compute:
        return None
    return load_balancing_loss(states, num_experts, attention_mask)


def aux_loss_coef(model: nn.Module, config: Any = None) -> float:
    """The weight of the load-balancing loss: the run's ``moe_aux_loss_coef`` (LLaMA-Factory key) when set,
    else the model's ``router_aux_loss_coef`` (config.json)."""
    coef = getattr(config, "moe_aux_loss_coef", None) if config is not None else None
    if coef is None:
        coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0)
    return float(coef)


def add_aux_loss(model: nn.Module, loss_sum: torch.Tensor, num_items: Any, config: Any = None
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Add ``coef * aux_loss * num_items`` to a stage's summed loss (so that after the trainer's division by
    the step's items, the mean loss gets ``coef * aux_loss`` as in transformers' ``loss += router_aux_loss_coef
    * aux_loss``) and report ``aux_loss`` as a metric. A model without MoE layers is returned unchanged.

    Args:
        model: the (possibly DDP-wrapped) model after its forward; reads ``model.aux_loss``.
        loss_sum: the stage's float scalar summed over ``num_items``.
        num_items: int or 0-d tensor.
        config: the run's config (``moe_aux_loss_coef``) or None.

    Returns:
        ``(loss_sum, metrics)``: metrics ``{"aux_loss": value}`` or ``{}``.
    """
    aux = getattr(model, "aux_loss", None)
    if aux is None:
        return loss_sum, {}
    coef = aux_loss_coef(model, config)
    if coef:
        loss_sum = loss_sum + coef * aux.to(loss_sum.dtype) * num_items
    return loss_sum, {"aux_loss": aux.detach()}


_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def split_fused_experts(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Per-expert tensors from transformers 5's fused in-memory expert layout (a model's ``state_dict()``).

    ``<layer>.mlp.experts.gate_up_proj`` ``(E, 2I, H)`` (rows ``[:I]`` the gate, ``[I:]`` the up projection, as
    transformers' ``Qwen2MoeExperts.forward`` chunks them) becomes ``<layer>.mlp.experts.{e}.gate_proj.weight``
    and ``.up_proj.weight`` ``(I, H)``; ``<layer>.mlp.experts.down_proj`` ``(E, H, I)`` becomes
    ``.{e}.down_proj.weight``. Any other name is returned unchanged as ``[(name, tensor)]``.

    Raises:
        ValueError: a fused name whose tensor is not 3-D (or whose gate_up rows are odd).
    """
    m = _FUSED.match(name)
    if m is None:
        return [(name, tensor)]
    if tensor.ndim != 3 or (m.group("kind") == "gate_up_proj" and tensor.shape[1] % 2):
        raise ValueError(f"{name}: expected a 3-D fused expert tensor, got shape {tuple(tensor.shape)}")
    prefix, out = m.group("prefix"), []
    for e in range(tensor.shape[0]):
        if m.group("kind") == "gate_up_proj":
            gate, up = tensor[e].chunk(2, dim=0)
            out += [(f"{prefix}.{e}.gate_proj.weight", gate), (f"{prefix}.{e}.up_proj.weight", up)]
        else:
            out.append((f"{prefix}.{e}.down_proj.weight", tensor[e]))
    return out
