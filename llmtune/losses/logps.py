"""Chunked vocabulary projection: next-token cross entropy, per-token and per-sequence log-probs, entropy.

The model returns final hidden states ``(B, T, H)``; these functions project them to the vocabulary
``rows`` at a time, take a float32 log-softmax per chunk and keep only what is needed (the label's
log-prob and the log-sum-exp per row). A ``(B, T, V)`` float32 logits tensor is never materialised, in
the forward pass or the backward pass: the chunking and both backwards are those of
``llmtune.kernels.cross_entropy`` (one implementation; the chunk's softmax runs in Triton on CUDA and in
PyTorch elsewhere):

- per-token log-probs (any downstream use such as DPO) use its ``linear_label_logps``, whose backward
  recomputes each chunk's logits and accumulates the gradients of the hidden states and of the weight;
- the summed cross entropy of ``causal_lm_loss`` uses its ``linear_cross_entropy_sum``: since the output is
  a plain sum, each chunk's gradients are computed in forward right after its loss (no recomputation) and
  backward only scales them. Not in float16: there it is the sum of the per-token log-probs, whose backward
  applies the incoming (scaled) gradient in float32 before rounding (``GradScaler`` works).

Only rows whose next label is valid are projected, so prompt and padding tokens cost nothing.

Conventions (Hugging Face causal-LM convention): ``labels`` are the input ids with ignored positions set
to ``-100``; the hidden state at position ``t`` predicts ``labels[:, t + 1]`` (the shift is done here).

Dtypes: the projection runs in the autocast dtype when autocast is on for the tensors' device (as
``nn.Linear`` would), else in the promoted dtype of ``hidden`` and ``lm_head_weight`` (so bf16 weights
give a bf16 matmul); the logits are then cast to float32 for the log-softmax (float64 stays float64, for
exact tests). Outputs are float32 (float64 for float64 inputs); gradients come back in the dtypes of
``hidden`` and ``lm_head_weight``.

Source: the cross entropy / log-likelihood of a softmax language model (Bengio et al., 2003; Radford et
al., 2018, eq. 1): ``log p(y_t | y_<t) = z_{t, y_t} - logsumexp_v z_{t, v}``, ``z = h W^T / temperature``;
its gradient wrt the logits is ``onehot(y_t) - softmax(z_t)`` (divided by the temperature).
"""

from __future__ import annotations

from typing import Optional

import torch

from llmtune.constants import IGNORE_INDEX
from llmtune.kernels.cross_entropy import compute_dtype as _compute_dtype, rows_per_chunk as _rows_per_chunk
from llmtune.kernels.cross_entropy import linear_cross_entropy_sum, linear_label_logps


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(n, H) x (V, H) -> (n, V)`` logits of one chunk in float32 (float64 for float64 inputs)."""
    logits = h @ w.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _select_label_rows(hidden, lm_head_weight, labels, chunk_size):
    """Shift and keep the rows of ``hidden`` whose next label is valid.

    Returns ``(h_sel (n, H), targets (n,), rows_per_chunk, valid (B, T) bool aligned with labels)``.
    """
    if not all(isinstance(x, torch.Tensor) for x in (hidden, lm_head_weight, labels)):
        raise ValueError("expected tensors hidden (B, T, H), lm_head_weight (V, H) and labels (B, T); got "
                         f"{type(hidden).__name__}, {type(lm_head_weight).__name__}, {type(labels).__name__}")
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"expected hidden (B, T, H) and labels (B, T), got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"expected lm_head_weight (V, H) with H = {hidden.shape[2]} (hidden's last size), got "
                         f"{tuple(lm_head_weight.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids (int64, -100 ignored), got dtype {labels.dtype}")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float tensor, got dtype {hidden.dtype}")
    b, t, hsize = hidden.shape
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False  # the first token has no prediction
    src = valid[:, 1:]  # rows t of hidden that predict a valid label t+1
    h_sel = hidden[:, :-1][src]  # (n, H)
    targets = labels[:, 1:][src]
    vocab = lm_head_weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"labels must be -100 or token ids in [0, {vocab}); got {int(targets.min())}..{int(targets.max())}")
    return h_sel, targets, _rows_per_chunk(chunk_size, vocab, hidden.device), valid


def _label_logps_flat(hidden, lm_head_weight, labels, chunk_size, temperature):
    """Per-token log-probs of the valid labels: ``(logps (n_valid,), valid (B, T) bool aligned with labels)``."""
    h_sel, targets, rows, valid = _select_label_rows(hidden, lm_head_weight, labels, chunk_size)
    return linear_label_logps(h_sel, lm_head_weight, targets, rows, temperature), valid


def causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy of a causal LM, projected to the vocabulary in chunks.

    ``loss_sum = - sum_{b, t: labels[b, t+1] != -100} log softmax(hidden[b, t] @ W^T)[labels[b, t+1]]``
    (position ``t`` predicts label ``t + 1``). Only rows with a valid next label are projected, so
    prompt and padding tokens cost nothing.

    Args:
        hidden: ``(B, T, H)`` final hidden states, any float dtype.
        lm_head_weight: ``(V, H)`` projection (``model.lm_head.weight``; tied to the embeddings or not),
            any float dtype; bf16 under autocast is fine.
        labels: ``(B, T)`` int64 token ids, ``-100`` where ignored (the usual HF labels).
        chunk_size: rows of ``B*T`` per chunk; ``None`` picks ``2**25 // V`` (a 128 MiB float32 chunk).

    Returns:
        ``(loss_sum, num_tokens)``: a 0-dim float32 tensor (nats, summed, not averaged) and a 0-dim int64
        tensor counting the label tokens. Divide by the token count of the whole optimizer step.
        With no label token (every label -100, or only the first one set), it returns ``(0., 0)``:
        ``loss_sum`` is 0 and still connected to the graph (a zero gradient) and ``num_tokens`` is 0, so a
        caller must not divide by it unguarded: the trainer refuses a training step with no label token and
        evaluation divides by ``max(items, 1)``.

    Raises:
        ValueError: on mismatched shapes (hidden ``(B, T, H)``, weight ``(V, H)``, labels ``(B, T)``),
            non-integer labels, or label ids outside ``[0, V)``.

    Source: maximum-likelihood language modelling (Radford et al., 2018, eq. 1); shift as in Hugging
    Face's ``ForCausalLMLoss``.
    """
    h_sel, targets, rows, valid = _select_label_rows(hidden, lm_head_weight, labels, chunk_size)
    return linear_cross_entropy_sum(h_sel, lm_head_weight, targets, rows), valid.sum()


def token_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: Optional[int] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probabilities of the labels, aligned with ``labels``: ``(B, T)`` float32.

    ``out[b, t] = log softmax(hidden[b, t-1] @ W^T / temperature)[labels[b, t]]`` where
    ``labels[b, t] != -100`` and ``t >= 1``; ``0`` elsewhere (``out[:, 0]`` is always 0). The mask of the
    returned values is therefore ``labels != -100`` with column 0 cleared, aligned with ``labels``.

    Args:
        hidden: ``(B, T, H)`` final hidden states; lm_head_weight ``(V, H)``; labels ``(B, T)`` int64.
        chunk_size: rows per chunk (see :func:`causal_lm_loss`).
        temperature: logits are divided by it (PPO scores samples at the sampling temperature).

    Returns: ``(B, T)`` float32 log-probs (nats, <= 0), differentiable wrt hidden and weight.

    Raises: ValueError on mismatched shapes or out-of-range label ids.

    Source: softmax language model log-likelihood (see module docstring).
    """
    logps, valid = _label_logps_flat(hidden, lm_head_weight, labels, chunk_size, temperature)
    out = logps.new_zeros(labels.shape)
    return out.masked_scatter(valid, logps)


def label_logps_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = True,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of ``targets`` and (``entropy``) the entropy of each row's next-token distribution, for rows
    already selected: ``hidden`` ``(N, H)`` (row ``i`` predicts ``targets[i]``), ``targets`` ``(N,)`` int64.

    ``logps[i] = log softmax(z_i)[targets[i]]``, ``entropy[i] = logsumexp(z_i) - sum_v softmax(z_i)_v z_{i,v}``,
    ``z_i = hidden[i] @ W^T / temperature``. On the CPU, with a frozen head (no gradient wanted for
    ``lm_head_weight``) and a non-float16 projection, both come from one chunked pass that also makes the hidden
    gradient (:func:`llmtune.kernels.logps_entropy.linear_logps_entropy`: 2 vocabulary products instead of 4
    with a backward; its float32 passes run on CPU-cache-sized pieces); otherwise (CUDA: the Triton chunk
    kernels) :func:`llmtune.kernels.cross_entropy.linear_label_logps` and :func:`entropy_from_hidden`.

    Returns: ``(logps (N,) float32, differentiable; entropy (N,) float32 without gradient, or None)``.

    Raises: ValueError on mismatched shapes (from the kernels).

    Source: softmax log-likelihood and Shannon entropy (module docstring).
    """
    from llmtune.kernels.cross_entropy import grads_in_forward
    from llmtune.kernels.logps_entropy import linear_logps_entropy

    rows = _rows_per_chunk(chunk_size, lm_head_weight.shape[0], hidden.device)
    if entropy and hidden.device.type == "cpu" and not lm_head_weight.requires_grad \
            and grads_in_forward(hidden, lm_head_weight):
        return linear_logps_entropy(hidden, lm_head_weight, targets, rows, temperature)
    lp = linear_label_logps(hidden, lm_head_weight, targets, rows, temperature)
    if not entropy:
        return lp, None
    return lp, entropy_from_hidden(hidden.detach()[None], lm_head_weight.detach(), chunk_size=chunk_size,
                                   temperature=temperature)[0]


def token_logps_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logps` and, at the same positions, the entropy of the distribution that predicts each label
    (``(B, T)`` float32 each, aligned with ``labels``, 0 where there is no label; the entropy has no gradient).
    One pass of the vocabulary projection where :func:`label_logps_entropy` allows it.

    Raises: ValueError as :func:`token_logps`.

    Source: as :func:`label_logps_entropy`.
    """
    h_sel, targets, _, valid = _select_label_rows(hidden, lm_head_weight, labels, chunk_size)
    lp, ent = label_logps_entropy(h_sel, lm_head_weight, targets, temperature, True, chunk_size)
    return lp.new_zeros(labels.shape).masked_scatter(valid, lp), ent.new_zeros(labels.shape).masked_scatter(valid, ent)


def sequence_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    average: bool = False,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Log-probability of each sequence's label tokens, ``(B,)`` float32.

    ``sum_t logp[b, t]`` over label tokens (``labels != -100``, shifted as in :func:`token_logps`), or the
    mean over them when ``average=True`` (IPO, ORPO, SimPO use length-averaged log-probs). A sequence with
    no label token gets 0.

    Args: as :func:`token_logps`; ``average``: divide by the number of label tokens of each sequence.

    Returns: ``(B,)`` float32, differentiable.

    Source: DPO's sequence log-likelihood ``log pi(y | x) = sum_t log pi(y_t | x, y_<t)`` (Rafailov et al.,
    2023, eq. 7); averaged form as in IPO (Azar et al., 2023) / SimPO (Meng et al., 2024, eq. 4).
    """
    logps, valid = _label_logps_flat(hidden, lm_head_weight, labels, chunk_size, 1.0)
    total = logps.new_zeros(labels.shape).masked_scatter(valid, logps).sum(-1)
    if average:
        total = total / valid.sum(-1).clamp(min=1)
    return total


@torch.no_grad()
def entropy_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, ``(B, T)`` float32 nats (no gradient).

    ``H[b, t] = logsumexp(z) - sum_v softmax(z)_v z_v`` with ``z = hidden[b, t] @ W^T / temperature``,
    i.e. the entropy of the distribution that predicts token ``t + 1`` (NOT shifted: aligned with
    ``hidden``). With ``mask`` ``(B, T)`` (bool or 0/1), only positions where it is nonzero are projected;
    others are 0. Meant for logging (PPO's ``policy/entropy``); computed under ``torch.no_grad``.

    Source: Shannon entropy of a softmax distribution.
    """
    b, t, _ = hidden.shape
    sel = torch.ones(b, t, dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    h_sel = hidden[sel]
    rows = _rows_per_chunk(chunk_size, lm_head_weight.shape[0], hidden.device)
    cdtype = _compute_dtype(hidden, lm_head_weight)
    odtype = torch.promote_types(cdtype, torch.float32)
    ent = torch.empty(h_sel.shape[0], dtype=odtype, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = lm_head_weight.to(cdtype)
        for s in range(0, h_sel.shape[0], rows):
            z = _chunk_logits(h_sel[s : s + rows].to(cdtype), w, temperature)
            lse = torch.logsumexp(z, -1)
            p = torch.softmax(z, -1)
            ent[s : s + rows] = lse - (p * z).sum(-1)
    return torch.zeros(b, t, dtype=odtype, device=hidden.device).masked_scatter(sel, ent)
