"""Fused linear cross entropy and label log-probs: the ``(N, V)`` logits are never stored.

The vocabulary projection ``z = hidden @ weight.T`` is taken a chunk of rows at a time (cuBLAS); each
chunk's softmax cross entropy runs in one kernel (:func:`cross_entropy_chunk`: log-sum-exp, loss, and,
when asked, the gradient ``d loss / d z`` written over the chunk's logits in place), then the chunk's
gradients wrt ``hidden`` and ``weight`` are two more matrix products. Peak extra memory is one chunk of
logits in the compute dtype.

* :func:`fused_linear_cross_entropy` ``(hidden (N, H), weight (V, H), labels (N,)) -> (loss_sum, count)``:
  the gradients are computed in the forward (the output is a plain sum, so ``d loss / d z`` is known
  there) and the backward only scales them: 3 matrix products per chunk instead of 4. Not in float16: there
  the unscaled gradients would underflow before a ``GradScaler``'s scale reaches them, so float16 takes the
  recomputing backward of :func:`fused_linear_logps` (4 products per chunk, scale-correct).
* :func:`fused_linear_logps` ``-> logps (N,)``: per-row log-probs of the labels (DPO, KTO, PPO, rm ...);
  the incoming gradient differs per row, so the backward recomputes each chunk's logits.

Labels equal to ``ignore_index`` (-100) contribute nothing (loss 0, log-prob 0, gradient 0). Both run the
chunk kernel in Triton on CUDA and in PyTorch elsewhere (:func:`cross_entropy_chunk_ref`, same signature).

Dtypes: the projection runs in the autocast dtype when autocast is on for the device (as ``nn.Linear``
would), else in ``promote(hidden.dtype, weight.dtype)``; softmax arithmetic is float32 (float64 for float64
inputs on the reference path); outputs are float32 (float64 for float64 inputs); gradients come back in
the dtypes of ``hidden`` and ``weight`` (``weight``'s accumulated in float32).

Source: softmax cross entropy ``-log softmax(z)_y = logsumexp(z) - z_y`` and its gradient
``softmax(z) - onehot(y)`` (e.g. Bishop, 2006, eq. 4.109); chunking the projection so the logits are never
materialised is the idea of Wijmans et al., 2025 ("Cut Your Losses in Large-Vocabulary Language Models").
"""

from __future__ import annotations

from typing import Optional

import torch

from llmtune.kernels.dispatch import use_triton

IGNORE_INDEX = -100
# Elements (rows x vocab) of one logits chunk when ``chunk_size`` is None: on a GPU 2**25 (128 MiB float32);
# on the CPU 2**22 (16 MiB), at least 64 rows, so that a chunk's float32 logits stay in the last-level cache
# for the log-softmax and gradient passes (measured: the loss of 665 tokens x 49,152 vocab, forward and
# backward, 390 -> 260 ms on one core; docs/performance.md).
_AUTO_CHUNK_ELEMENTS = 2**25
_AUTO_CHUNK_ELEMENTS_CPU = 2**22
_MIN_CHUNK_ROWS_CPU = 64


def cross_entropy_chunk_ref(logits: torch.Tensor, targets: torch.Tensor, grad_scale: Optional[torch.Tensor] = None,
                            temperature: float = 1.0, write_grad: bool = False, ignore_index: int = IGNORE_INDEX
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference softmax cross entropy of one chunk of logits.

    Args:
        logits: ``(n, V)`` float (bf16/fp16/fp32/fp64), unit stride along V; divided by ``temperature``.
        targets: ``(n,)`` int64 in ``[0, V)`` or ``ignore_index``.
        grad_scale: optional ``(n,)`` float: the gradient rows are multiplied by it (default 1).
        write_grad: when True, ``logits`` is overwritten in place by
            ``d loss_i / d logits_i * grad_scale_i = (softmax(z_i) - onehot(y_i)) / temperature * grad_scale_i``
            (0 for ignored rows), rounded to the logits' dtype.

    Returns:
        ``(loss (n,), lse (n,))`` float32 (float64 for float64 logits): ``loss = lse - z_y`` (nats; 0 for
        ignored rows) and the log-sum-exp of ``z = logits / temperature``.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    ignored = targets == ignore_index
    safe = targets.masked_fill(ignored, 0)[:, None]
    loss = (lse - z.gather(1, safe).squeeze(1)).masked_fill(ignored, 0.0)
    if write_grad:
        g = torch.exp(z - lse[:, None])
        g.scatter_add_(1, safe, torch.full_like(g[:, :1], -1.0))
        scale = torch.full_like(lse, 1.0 / temperature) if grad_scale is None else grad_scale.to(lse.dtype) / temperature
        g.mul_(scale.masked_fill(ignored, 0.0)[:, None])
        logits.copy_(g)
    return loss, lse


def cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor, grad_scale: Optional[torch.Tensor] = None,
                        temperature: float = 1.0, write_grad: bool = False, ignore_index: int = IGNORE_INDEX
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_chunk_ref` (same arguments and results), in Triton on CUDA: one program per row,
    an online log-sum-exp pass over the vocabulary and, with ``write_grad``, a second pass that writes the
    gradient over the logits. Float64 logits always take the reference."""
    if use_triton(logits) and logits.dtype != torch.float64:
        from llmtune.kernels import _fused_triton as T

        return T.cross_entropy_chunk_triton(logits, targets, grad_scale, temperature, write_grad, ignore_index)
    return cross_entropy_chunk_ref(logits, targets, grad_scale, temperature, write_grad, ignore_index)


def rows_per_chunk(chunk_size: Optional[int], vocab: int, device: Optional[torch.device] = None) -> int:
    """Rows of one logits chunk: ``chunk_size``, or (None) as many as fit 2**25 float32 logits (128 MiB) on a
    GPU, 2**22 (16 MiB, at least 64 rows) when ``device`` is the CPU.

    Raises: ValueError for a ``chunk_size`` below 1. Used by this module and by ``llmtune.losses.logps``."""
    if chunk_size is None:
        if device is not None and torch.device(device).type == "cpu":
            return max(_MIN_CHUNK_ROWS_CPU, _AUTO_CHUNK_ELEMENTS_CPU // max(1, vocab))
        return max(1, _AUTO_CHUNK_ELEMENTS // max(1, vocab))
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return int(chunk_size)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the vocabulary projection: the autocast dtype when autocast is on for ``hidden``'s device,
    else the promotion of ``hidden`` and ``weight`` dtypes."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def grads_in_forward(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a summed cross entropy may compute its gradients in the forward (unscaled, then rounded to the
    compute dtype): not for float16, whose 5-bit exponent flushes probabilities below 6e-8 to zero before
    the loss scale of a ``GradScaler`` (which only reaches the backward) could lift them. Float16 losses take
    the recomputing path instead, whose backward multiplies by the incoming (scaled) gradient in float32
    before rounding, as autograd through ``log_softmax`` does."""
    return compute_dtype(hidden, weight) != torch.float16


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0] \
            or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H), weight (V, H), labels (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
        raise ValueError(f"labels must be {ignore_index} or ids in [0, {weight.shape[0]}); "
                         f"got {int(valid.min())}..{int(valid.max())}")


def scale_saved_grads(ctx, grad_out: torch.Tensor) -> tuple:
    """The backward of a loss whose gradients were computed in the forward (``ctx.saved_tensors`` =
    ``(grad_hidden, grad_weight)``, ``ctx.need`` = which are wanted, ``ctx.wdtype`` = the weight's dtype): each
    scaled by the incoming scalar ``grad_out``. Returns ``(grad_hidden or None, grad_weight or None)``."""
    grad_h, grad_w = ctx.saved_tensors
    need_h, need_w = ctx.need
    gh = grad_h * grad_out.to(grad_h.dtype) if need_h else None
    gw = (grad_w * grad_out.to(grad_w.dtype)).to(ctx.wdtype) if need_w else None
    return gh, gw


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, rows):  # noqa: D401
        cdtype = compute_dtype(hidden, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.promote_types(cdtype, torch.float32), device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            for s in range(0, hidden.shape[0], rows):
                h = hidden[s : s + rows].to(cdtype)
                logits = h @ w.t()
                loss, _ = cross_entropy_chunk(logits, labels[s : s + rows], write_grad=need_h or need_w,
                                              ignore_index=ignore_index)
                total += loss.sum().to(total.dtype)
                if need_h:
                    grad_h[s : s + rows] = (logits @ w).to(hidden.dtype)
                if need_w:
                    grad_w.add_((logits.t() @ h).to(acc))
                del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.need = (need_h, need_w)
        ctx.wdtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        return scale_saved_grads(ctx, grad_out) + (None, None, None)


class _FusedLinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, rows, temperature):  # noqa: D401
        cdtype = compute_dtype(hidden, weight)
        out = torch.empty(hidden.shape[0], dtype=torch.promote_types(cdtype, torch.float32), device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            for s in range(0, hidden.shape[0], rows):
                logits = hidden[s : s + rows].to(cdtype) @ w.t()
                loss, _ = cross_entropy_chunk(logits, labels[s : s + rows], temperature=temperature,
                                              ignore_index=ignore_index)
                out[s : s + rows] = -loss
                del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.args = (ignore_index, rows, temperature, cdtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        ignore_index, rows, temperature, cdtype = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        neg = -grad_out.to(torch.promote_types(grad_out.dtype, torch.float32))  # d logp = - d loss
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            for s in range(0, hidden.shape[0], rows):
                h = hidden[s : s + rows].to(cdtype)
                logits = h @ w.t()
                cross_entropy_chunk(logits, labels[s : s + rows], grad_scale=neg[s : s + rows],
                                    temperature=temperature, write_grad=True, ignore_index=ignore_index)
                if need_h:
                    grad_h[s : s + rows] = (logits @ w).to(hidden.dtype)
                if need_w:
                    grad_w.add_((logits.t() @ h).to(acc))
                del logits
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, chunk_size: Optional[int] = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed softmax cross entropy of ``hidden @ weight.T`` against ``labels``, logits never stored.

    Args:
        hidden: ``(N, H)`` float (already shifted: row i predicts ``labels[i]``).
        weight: ``(V, H)`` float (the lm_head weight).
        labels: ``(N,)`` int64 ids in ``[0, V)``, or ``ignore_index`` (skipped).
        chunk_size: rows per chunk; None picks ``2**25 // V``.

    Returns:
        ``(loss_sum, count)``: 0-dim float32 (nats, summed over the non-ignored rows; differentiable wrt
        hidden and weight; gradients computed in the forward, except in float16, where the backward
        recomputes the logits so that a ``GradScaler``'s scale applies before rounding: see
        :func:`grads_in_forward`) and 0-dim int64 (non-ignored rows).

    Raises:
        ValueError: on mismatched shapes, labels outside ``[0, V)``, or a chunk_size < 1.
    """
    _check(hidden, weight, labels, ignore_index)
    rows = rows_per_chunk(chunk_size, weight.shape[0], hidden.device)
    if grads_in_forward(hidden, weight):
        loss = _FusedLinearCE.apply(hidden, weight, labels, int(ignore_index), rows)
    else:   # float16: gradients made in the backward, scaled before rounding (loss scaling works)
        loss = -_FusedLinearLogps.apply(hidden, weight, labels, int(ignore_index), rows, 1.0).sum()
    return loss, (labels != ignore_index).sum()


def fused_linear_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       ignore_index: int = IGNORE_INDEX, chunk_size: Optional[int] = None,
                       temperature: float = 1.0) -> torch.Tensor:
    """Per-row log-probabilities of the labels, ``log softmax(hidden @ weight.T / temperature)[labels]``.

    Args: as :func:`fused_linear_cross_entropy`; ``temperature`` divides the logits (PPO scores samples
    at the sampling temperature).

    Returns:
        ``(N,)`` float32 (nats, <= 0; 0 for ignored rows), differentiable wrt hidden and weight (the
        backward recomputes each chunk's logits).

    Raises:
        ValueError: on mismatched shapes, labels outside ``[0, V)``, or a chunk_size < 1.
    """
    _check(hidden, weight, labels, ignore_index)
    rows = rows_per_chunk(chunk_size, weight.shape[0], hidden.device)
    return _FusedLinearLogps.apply(hidden, weight, labels, int(ignore_index), rows, float(temperature))
