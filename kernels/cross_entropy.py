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
These two autograd functions are llmtune's only chunked cross entropy: ``llmtune.losses.logps``
(``causal_lm_loss``, ``token_logps``, ``sequence_logps``) calls :func:`linear_cross_entropy_sum` and
:func:`linear_label_logps` after its own checks, on every device. On the CPU a chunk costs: the projection
(compute dtype), one float32 copy of it (the compute-dtype logits then freed), one softmax pass when the
gradient is wanted (the loss is ``-log`` of the target's probability; the rare row whose target lies over 69
nats below its log-sum-exp takes a log-softmax of that row instead) or one log-softmax pass when it is not
(the recomputing backward reuses the forward's log-sum-exp instead), ``-1`` at the targets, a row scale only
when one is given, and one rounding to the compute dtype into a NEW buffer. When the ``(V, H)`` weight is
large (at least 2**22 elements), the summed loss's products span several chunks (:func:`_rows_per_product`:
each product streams the weight from memory once, so fewer, taller products read it less often) and the
float32 passes run on cache-sized pieces of at most 2**19 logits, each rounding its gradient over its own
logits in the group's buffer.

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
# On the CPU, the products of several chunks run as one when the weight is this large (see _rows_per_product)
_GROUP_MIN_WEIGHT_CPU = 2**22
_GROUP_ELEMENTS_CPU = 2**23
# ... and then their float32 passes run on pieces of this many logits (2 MiB float32, in a core's cache)
_PASS_ELEMENTS_CPU = 2**19


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
    loss, lse, g = _softmax_chunk(logits, targets, temperature, ignore_index, grad_scale=grad_scale,
                                  want_grad=write_grad, has_ignored=True, gdtype=logits.dtype)
    if write_grad:
        logits.copy_(g)
    return loss, lse


def _softmax_chunk(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int,
                   lse: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None,
                   want_grad: bool = False, has_ignored: bool = True, gdtype: Optional[torch.dtype] = None,
                   out: Optional[torch.Tensor] = None
                   ) -> tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """The PyTorch softmax cross entropy of one chunk, with as few full ``(n, V)`` passes and live buffers as
    it can: ``logits`` is cast to float32 once (then dropped by the caller: pass a temporary), and the
    gradient ``(softmax - onehot) / T * grad_scale`` (0 for ignored rows) is made in place over the float32
    buffer and rounded once to ``gdtype`` (into ``out`` when given, which may be ``logits`` itself). With
    ``lse`` (a recomputing backward) the log-softmax pass is skipped and ``loss`` is None. Returns ``(loss (n,),
    lse (n,), grad (n, V) or None)``."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    del logits
    if temperature != 1.0:
        z = z / temperature
    ignored = targets == ignore_index if has_ignored else None
    tgt = (targets.masked_fill(ignored, 0) if has_ignored else targets)[:, None]
    loss = None
    if lse is None and want_grad:
        # one softmax pass (the loss from the target's probability) instead of log-softmax then exp: rows
        # whose target probability is below 2**-100 (a loss over 69 nats, where float32 would lose digits
        # or underflow) take the log-softmax of their row instead
        g = torch.softmax(z, dim=-1)
        lp = g.gather(1, tgt).squeeze(1).log_()
        far = lp < -69.0 if ignored is None else (lp < -69.0) & ~ignored
        if bool(far.any()):
            lp[far] = torch.log_softmax(z[far], dim=-1).gather(1, tgt[far]).squeeze(1)
        lse = z.gather(1, tgt).squeeze(1) - lp
        loss = -lp if ignored is None else (-lp).masked_fill(ignored, 0.0)
        del z
    elif lse is None:
        logp = torch.log_softmax(z, dim=-1)
        lp = logp.gather(1, tgt).squeeze(1)
        lse = z.gather(1, tgt).squeeze(1) - lp
        loss = -lp if ignored is None else (-lp).masked_fill(ignored, 0.0)
        del z, logp   # after the small results: none of them is carved out of this freed block (glibc heap)
        g = None
    else:
        g = z.sub_(lse[:, None]).exp_() if want_grad else None
        del z
    if g is None:
        return loss, lse, None
    g.scatter_add_(1, tgt, torch.full_like(g[:, :1], -1.0))
    if grad_scale is not None or temperature != 1.0:
        scale = torch.full_like(lse, 1.0 / temperature) if grad_scale is None else grad_scale.to(lse.dtype) / temperature
        g.mul_((scale if ignored is None else scale.masked_fill(ignored, 0.0))[:, None])
    elif ignored is not None and bool(ignored.any()):
        g.masked_fill_(ignored[:, None], 0.0)
    return loss, lse, (out.copy_(g) if out is not None else g.to(gdtype or g.dtype))


def _chunk(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int,
           has_ignored: bool, lse: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None,
           want_grad: bool = False) -> tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Logits ``h @ w.T`` of one chunk (compute dtype) and their cross entropy: ``(loss (n,) or None, lse (n,),
    d loss / d logits * grad_scale (n, V) in the compute dtype, or None)``. Triton on CUDA (the gradient
    written over the logits; ``lse`` recomputed there), else :func:`_softmax_chunk`."""
    if use_triton(h) and h.dtype != torch.float64:
        logits = h @ w.t()
        loss, lse = cross_entropy_chunk(logits, targets, grad_scale, temperature, want_grad, ignore_index)
        return loss, lse, (logits if want_grad else None)
    return _softmax_chunk(h @ w.t(), targets, temperature, ignore_index, lse, grad_scale, want_grad, has_ignored,
                          h.dtype)


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


def _rows_per_product(rows: int, w: torch.Tensor, hidden: torch.Tensor) -> int:
    """Rows of one vocabulary-projection product in :func:`_chunked_grads`: ``rows`` (one chunk), or on the
    CPU, when the ``(V, H)`` weight is at least 2**22 elements (8 MiB in bfloat16: larger than a core's share
    of the last-level cache, so each product streams it from memory), as many whole chunks as fit 2**23
    logits (16 MiB in bfloat16; 256 rows at a 32,768 vocabulary). The float32 softmax passes then run on
    pieces of at most 2**19 logits (2 MiB in float32: 16 rows there, in a core's cache; 128-row pieces, 16
    MiB, took 5x as long for the same passes), each writing its gradient over its own logits in the group's
    buffer. Measured at Qwen3-MoE's benchmark shape (vocabulary 32,768 x 1,024, 128-row chunks, one thread):
    docs/performance.md."""
    if use_triton(hidden) or hidden.device.type != "cpu" or w.numel() < _GROUP_MIN_WEIGHT_CPU:
        return rows
    return max(1, _GROUP_ELEMENTS_CPU // (w.shape[0] * rows)) * rows


def _chunked_grads(hidden, weight, labels, rows, ignore_index, need_h, need_w, cdtype, temperature=1.0, lse=None,
                   grad_scale=None):
    """The one chunk loop with gradients: per chunk of ``rows`` rows, the logits, their cross entropy
    (:func:`_chunk`) and the two gradient products. Returns ``(loss_sum or None (lse given), grad_hidden
    (N, H) in hidden's dtype or None, grad_weight (V, H) float32 (float64 for float64) or None)``; ``cdtype``:
    the projection's dtype (:func:`compute_dtype` of the forward: a backward runs outside autocast)."""
    has_ignored = bool((labels == ignore_index).any())
    total = None if lse is not None else torch.zeros((), dtype=torch.promote_types(cdtype, torch.float32),
                                                     device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(cdtype)
        step = _rows_per_product(rows, w, hidden) if need_h or need_w else rows
        for s in range(0, hidden.shape[0], step):
            h = hidden[s : s + step].to(cdtype)
            if step == rows:
                loss, _, g = _chunk(h, w, labels[s : s + rows], temperature, ignore_index, has_ignored,
                                    None if lse is None else lse[s : s + rows],
                                    None if grad_scale is None else grad_scale[s : s + rows], need_h or need_w)
                losses = [loss]
            else:   # one product for the group's logits, each chunk's gradient written over its own logits
                g, losses = h @ w.t(), []
                sub = min(rows, max(1, _PASS_ELEMENTS_CPU // w.shape[0]))
                for c in range(0, h.shape[0], sub):
                    e = slice(s + c, s + c + sub)
                    losses.append(_softmax_chunk(g[c : c + sub], labels[e], temperature, ignore_index,
                                                 None if lse is None else lse[e],
                                                 None if grad_scale is None else grad_scale[e], True, has_ignored,
                                                 out=g[c : c + sub])[0])
            if total is not None:
                for loss in losses:
                    total += loss.sum().to(total.dtype)
            if need_h:
                grad_h[s : s + step] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w.add_((g.t() @ h).to(acc))
            del g
    return total, grad_h, grad_w


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, rows):  # noqa: D401
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, grad_h, grad_w = _chunked_grads(hidden, weight, labels, rows, ignore_index, need_h, need_w,
                                               compute_dtype(hidden, weight))
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
        has_ignored = bool((labels == ignore_index).any())
        out = torch.empty(hidden.shape[0], dtype=torch.promote_types(cdtype, torch.float32), device=hidden.device)
        lse = torch.empty_like(out)   # kept: the PyTorch backward then skips the log-softmax pass
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdtype)
            for s in range(0, hidden.shape[0], rows):
                loss, lse[s : s + rows], _ = _chunk(hidden[s : s + rows].to(cdtype), w, labels[s : s + rows],
                                                    temperature, ignore_index, has_ignored)
                out[s : s + rows] = -loss
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.args = (ignore_index, rows, temperature, cdtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        ignore_index, rows, temperature, cdtype = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        neg = -grad_out.to(torch.promote_types(grad_out.dtype, torch.float32))  # d logp = - d loss
        _, grad_h, grad_w = _chunked_grads(hidden, weight, labels, rows, ignore_index, need_h, need_w, cdtype,
                                           temperature, lse, neg)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int,
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`fused_linear_cross_entropy`'s loss sum (0-dim float32, nats) without its input checks, ``rows``
    per chunk: for callers that validated their inputs (``llmtune.losses.causal_lm_loss``). Gradients are
    computed in the forward, except in float16 (the recomputing, scale-correct backward: see
    :func:`grads_in_forward`). Raises nothing itself; bad shapes fail inside the matrix products."""
    if grads_in_forward(hidden, weight):
        return _FusedLinearCE.apply(hidden, weight, labels, int(ignore_index), rows)
    # float16: gradients made in the backward, scaled before rounding (loss scaling works)
    return -_FusedLinearLogps.apply(hidden, weight, labels, int(ignore_index), rows, 1.0).sum()


def linear_label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int,
                       temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`fused_linear_logps` (``(N,)`` float32 log-probs, nats) without its input checks, ``rows`` per
    chunk: for callers that validated their inputs (``llmtune.losses.token_logps`` / ``sequence_logps``)."""
    return _FusedLinearLogps.apply(hidden, weight, labels, int(ignore_index), rows, float(temperature))


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
    return linear_cross_entropy_sum(hidden, weight, labels, rows, ignore_index), (labels != ignore_index).sum()


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
    return linear_label_logps(hidden, weight, labels, rows_per_chunk(chunk_size, weight.shape[0], hidden.device),
                              temperature, ignore_index)
