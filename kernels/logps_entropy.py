"""Label log-probabilities and entropies of ``hidden @ weight.T`` in one chunked pass, the hidden gradient made in
the same pass: what a GRPO/PPO policy forward needs from its output head, with two vocabulary products instead of
four.

An online-RL loss wants, at every scored completion token, ``logp = log softmax(z / T)[label]`` (differentiable)
and the entropy ``H = logsumexp(z / T) - sum_v softmax(z / T)_v z_v / T`` (a metric, no gradient), where
``z = hidden @ weight.T``. Computed separately (:func:`llmtune.kernels.cross_entropy.linear_label_logps` and
:func:`llmtune.losses.entropy_from_hidden`), the logits are made three times (log-probs, their recomputing
backward, the entropy) besides the gradient product. Here each chunk's logits are made once; the float32 passes
(log-sum-exp, softmax, entropy) run on cache-sized pieces of the chunk; and when ``hidden`` needs a gradient,
``G = d logp / d hidden`` is made in the forward from the softmax already at hand,

    d logp_i / d hidden_i = (onehot(y_i) - softmax(z_i / T)) / T @ weight,

so the backward only scales each row of ``G`` by its incoming gradient (``logp_i`` depends on ``hidden_i``
alone: the row scaling is exact, not an approximation). The head's weight gets no gradient here (a frozen or
tied output head, as in LoRA); callers whose head trains use the separate functions. PyTorch only, with float32
passes sized for a CPU core's cache: :func:`llmtune.losses.label_logps_entropy` uses it on the CPU, and keeps the
Triton chunk kernels of :mod:`llmtune.kernels.cross_entropy` on CUDA.

Source: the softmax log-likelihood and its gradient, and the Shannon entropy of a softmax distribution; the
chunking of :mod:`llmtune.kernels.cross_entropy` (logits never stored whole).
"""

from __future__ import annotations

from typing import Optional

import torch

from llmtune.kernels.cross_entropy import IGNORE_INDEX, compute_dtype

__all__ = ["linear_logps_entropy"]

#: float32 passes run on pieces of at most this many logits (2 MiB: in a core's cache), as kernels.cross_entropy
_PASS_ELEMENTS = 2**19


def _pieces(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, want_grad: bool,
            logps: torch.Tensor, ent: torch.Tensor) -> None:
    """Log-probs and entropies of one chunk of logits ``(n, V)`` (written into ``logps`` / ``ent`` ``(n,)``);
    with ``want_grad`` the logits are overwritten by ``softmax - onehot`` (0 for ignored rows) in their dtype."""
    v = logits.shape[1]
    sub = max(1, _PASS_ELEMENTS // v)
    odt = logps.dtype
    for c in range(0, logits.shape[0], sub):
        z = logits[c : c + sub].to(odt)
        if temperature != 1.0:
            z = z / temperature
        tgt = targets[c : c + sub]
        ignored = tgt == ignore_index
        t = tgt.masked_fill(ignored, 0)[:, None]
        zs = z - z.amax(-1, keepdim=True)                               # shifted: <= 0
        p = zs.exp()
        total = p.sum(-1, keepdim=True)
        log_total = total.log()
        p.div_(total)                                                   # softmax(z)
        # H = lse - sum p z = log(total) - sum p zs (sum p = 1): no cancellation of two large terms
        ent[c : c + sub] = log_total[:, 0] - (p[:, None, :] @ zs[:, :, None]).view(-1)
        logps[c : c + sub] = (zs.gather(1, t) - log_total)[:, 0].masked_fill(ignored, 0.0)
        if want_grad:
            p.scatter_add_(1, t, torch.full_like(p[:, :1], -1.0))       # softmax - onehot = -T d logp / d z
            p.masked_fill_(ignored[:, None], 0.0)
            logits[c : c + sub] = p


class _LogpsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, temperature, ignore_index):  # noqa: D401
        cdtype = compute_dtype(hidden, weight)
        need_h = ctx.needs_input_grad[0]
        odt = torch.promote_types(cdtype, torch.float32)
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=odt, device=hidden.device)
        ent = torch.empty(n, dtype=odt, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            for s in range(0, n, rows):
                logits = hidden[s : s + rows].to(cdtype) @ w.t()
                _pieces(logits, labels[s : s + rows], temperature, ignore_index, need_h, logps[s : s + rows],
                        ent[s : s + rows])
                if need_h:
                    grad[s : s + rows] = logits @ w                      # (softmax - onehot) @ W = -T d logp / d h
                del logits
        ctx.save_for_backward(grad)
        ctx.scale = -1.0 / temperature
        ctx.mark_non_differentiable(ent)
        return logps, ent

    @staticmethod
    def backward(ctx, grad_logps, grad_ent):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        scale = (grad_logps.to(torch.promote_types(grad_logps.dtype, torch.float32)) * ctx.scale)[:, None]
        return (grad * scale).to(grad.dtype), None, None, None, None, None


def linear_logps_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int,
                         temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, entropy)`` of ``softmax(hidden @ weight.T / temperature)`` at each row (module docstring).

    Args:
        hidden: ``(N, H)`` float (row ``i`` predicts ``labels[i]``); differentiable.
        weight: ``(V, H)`` float, the output head; it gets NO gradient (a frozen head): raises if it needs one.
        labels: ``(N,)`` int64 ids in ``[0, V)`` or ``ignore_index`` (log-prob 0 and no gradient there; the
            entropy is still computed).
        rows: rows per chunk (:func:`llmtune.kernels.cross_entropy.rows_per_chunk`). temperature: divides the logits.

    Returns:
        ``logps`` ``(N,)`` float32 (float64 for float64 inputs), nats, differentiable wrt ``hidden``; ``entropy``
        ``(N,)`` same dtype, nats, no gradient. The products run in :func:`llmtune.kernels.cross_entropy.compute_dtype`
        (the autocast dtype under autocast), the softmax passes in float32; the hidden gradient is rounded to
        ``hidden``'s dtype in the forward, then scaled in float32 and rounded again in the backward.

    Raises:
        ValueError: ``weight`` requires a gradient, or shapes do not match.
    """
    if weight.requires_grad:
        raise ValueError("linear_logps_entropy: the output head gets no gradient here; use linear_label_logps and "
                         "entropy_from_hidden for a trained head")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H), weight (V, H), labels (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    return _LogpsEntropy.apply(hidden, weight, labels, int(rows), float(temperature), int(ignore_index))
