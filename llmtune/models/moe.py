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
(:func:`experts_forward`); on CUDA with ``torch._grouped_mm`` and plain bfloat16 experts all experts run as
one grouped matrix product per projection. The results are scattered back weighted by the routing weights.

Sources: Shazeer et al. 2017 (sparsely-gated MoE, top-k gating); Fedus et al. 2021, Switch Transformers,
eq. 4-6 (load-balancing loss); Qwen team, Qwen1.5-MoE / Qwen2 technical report (shared experts, 2024) and
Qwen3 technical report (2025); transformers' ``modeling_qwen2_moe.py`` / ``modeling_qwen3_moe.py``
(``Qwen2MoeSparseMoeBlock``, ``load_balancing_loss_func``) as the reference implementation.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmtune.compat import is_cuda
from llmtune.models.config import ModelConfig


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


def experts_forward(x: torch.Tensor, experts: Sequence[nn.Module], top_experts: torch.Tensor,
                    top_weights: torch.Tensor, grouped: Optional[bool] = None) -> torch.Tensor:
    """``y[n] = sum_j top_weights[n, j] * experts[top_experts[n, j]](x[n])``, grouped by expert.

    The ``N * k`` assignments are sorted by expert id (stable, so each token's contributions are added in
    expert order as the reference does), the rows gathered once, each expert applied to all of its rows in
    one call (with autograd on, experts with no rows are called on an empty batch, so every expert and adapter
    takes part in the graph and gets a (zero) gradient, as DDP requires; without autograd they are skipped),
    and the weighted outputs summed back per token with ``index_add``. With ``grouped`` (default: when :func:`_can_group` holds) the experts run as
    ``torch._grouped_mm`` products instead of the per-expert loop.

    Args:
        x: ``(N, H)`` token rows, any float dtype.
        experts: ``E`` modules mapping ``(M, H) -> (M, H)`` (``ExpertMLP``, possibly with LoRA or 4-bit
            projections).
        top_experts: ``(N, k)`` int64 expert ids.
        top_weights: ``(N, k)`` routing weights (same dtype as ``x`` or castable).
        grouped: force (True) or forbid (False) the ``torch._grouped_mm`` path.

    Returns:
        ``(N, H)`` in ``x``'s dtype.
    """
    global _GROUPED_MM_FAILED
    n, k = top_experts.shape
    num_experts = len(experts)
    flat = top_experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=num_experts)
    rows = x[token]
    if grouped is None:
        grouped = not _GROUPED_MM_FAILED and _can_group(x, experts)
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
