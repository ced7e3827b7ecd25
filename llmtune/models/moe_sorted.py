"""Frozen SwiGLU experts with one LoRA adapter per projection over rows sorted by expert, one ``torch.mm`` per
expert and projection on views of the grouped weights, forward and backward written out
(:class:`SortedExpertsLora`): the CPU path of :func:`llmtune.models.moe._grouped_frozen`.

For every expert ``e`` and its token rows ``x`` (Hu et al. 2021, LoRA eq. 3, on a SwiGLU expert):

* ``[g | u] = x W_gu[e]^T + s xa [B_g[e] (+) B_u[e]]^T`` with ``xa = x [A_g[e]; A_u[e]]^T`` ``(n_e, 2r)`` and
  ``(+)`` the block-diagonal ``(2I, 2r)`` of the gate and up ``B``;
* ``h = silu(g) * u * w`` (``w`` the token's routing weight, applied on the ``I``-wide rows rather than the
  ``H``-wide output: the down projection and its adapter are linear, so the result is the same);
* ``y = h W_d[e]^T + s (h A_d[e]^T) B_d[e]^T``, added into the token's output row.

The ``N * k`` (token, expert) rows are gathered once into slots sorted by expert (``(S, H)``): each expert's
rows one contiguous block, its length rounded up to 16 slots (:func:`slot_layout`; padding slots read token
row 0 with routing weight 0, so their ``h`` and every gradient they produce are exactly zero). Each expert's
products read its block and its slice of the ``(E, 2I, H)`` / ``(E, H, I)`` weight stacks (a view: no weight is
copied) and write into the block of one preallocated output; the elementwise SwiGLU work and its backward run
once over all slots, and the outputs and input gradients are scattered to / from the ``(N, H)`` token rows with
one ``index_add_``. Measured on this CPU at Qwen3-MoE shapes (one thread, bf16; docs/performance.md): a
``torch.mm`` per expert runs at the speed of one padded ``torch.bmm`` over all experts, so computing about the
rows there are (1.06x on random-init routing, against 1.3-1.5x for the padded ``bmm`` levels, which also copy
the crowded experts' weights) costs 0.75x the CPU time of those levels, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _block_diag_b(b_g: torch.Tensor, b_u: torch.Tensor) -> torch.Tensor:
    """``(E, 2I, 2r)`` with ``b_g`` ``(E, I, r)`` top-left and ``b_u`` bottom-right, zeros elsewhere."""
    e, i, r = b_g.shape
    out = b_g.new_zeros(e, 2 * i, 2 * r)
    out[:, :i, :r] = b_g
    out[:, i:, r:] = b_u
    return out


def _blocks_lora_mm(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, sb: torch.Tensor,
                    spans) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert blocks of sorted rows through their frozen weight plus LoRA: for each ``(e, lo, hi)`` of ``spans``,
    ``y[lo:hi] = x[lo:hi] W_e^T + (x[lo:hi] A_e^T) (s B_e)^T``; x ``(S, in)``, w ``(E, out, in)``, a ``(E, r, in)``,
    sb ``(E, out, r)`` (the scale folded in), all one dtype. Returns ``(y (S, out), x A^T (S, r))``, each product
    a ``torch.mm`` on a view (LoRA, Hu et al. 2021, eq. 3, per expert)."""
    y = x.new_empty(x.shape[0], w.shape[1])
    xa = x.new_empty(x.shape[0], a.shape[1])
    wt, at, sbt = _per_expert(w.transpose(1, 2), a.transpose(1, 2), sb.transpose(1, 2))
    for e, xe, ye, xae in _blocks(spans, x, y, xa):
        torch.mm(xe, wt[e], out=ye)
        torch.mm(xe, at[e], out=xae)
        ye.addmm_(xae, sbt[e])
    return y, xa


def _blocks_lora_grad(spans, gy: torch.Tensor, xa: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                      sb: torch.Tensor, a: torch.Tensor, g_b: torch.Tensor, g_a: torch.Tensor, g_xa: torch.Tensor,
                      g_x: torch.Tensor) -> None:
    """The backward of :func:`_blocks_lora_mm`, one expert's block at a time while its rows are in cache:
    given ``gy = d/dy`` ``(S, out)`` and the forward's ``xa`` / ``x``, writes ``g_b[e] = gy^T xa`` (the gradient
    of ``s B``), ``g_xa = gy (s B)``, ``g_a[e] = g_xa^T x`` and ``g_x = gy W + g_xa A`` (all in place)."""
    w_e, sb_e, a_e, gb_e, ga_e = _per_expert(w, sb, a, g_b, g_a)
    for e, gy_e, g_xa_e, xa_e, x_e, g_x_e in _blocks(spans, gy, g_xa, xa, x, g_x):
        torch.mm(gy_e.t(), xa_e, out=gb_e[e])
        torch.mm(gy_e, sb_e[e], out=g_xa_e)
        torch.mm(g_xa_e.t(), x_e, out=ga_e[e])
        torch.mm(gy_e, w_e[e], out=g_x_e).addmm_(g_xa_e, a_e[e])


def _per_expert(*stacks: torch.Tensor) -> list:
    """Each ``(E, ...)`` stack as a tuple of its ``E`` expert views (one ``unbind`` call each, instead of an
    indexing call per expert and product in the loops)."""
    return [t.unbind(0) for t in stacks]


def _blocks(spans, *rows: torch.Tensor):
    """``(expert, block of each of rows...)`` for every span: the ``(S, ...)`` slot tensors split into the
    experts' contiguous blocks (one ``split`` call each; the spans cover all ``S`` slots in order)."""
    lens = [hi - lo for _, lo, hi in spans]
    return zip([e for e, _, _ in spans], *(t.split(lens) for t in rows))


class SortedExpertsLora(torch.autograd.Function):
    """``out (N, H)``: for every slot, ``y[slot]`` added into token row ``src[slot]`` (module docstring).

    forward(x, w_slot, src, spans, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, scale):
        x ``(N, H)`` token rows (compute dtype); w_slot ``(S,)`` routing weight of each slot (0 for padding);
        src ``(S,)`` int64 token row of each slot; spans ``(expert, first slot, end slot)`` of every expert with
        rows (:func:`slot_layout`); w_gu ``(E, 2I, H)`` and w_d ``(E, H, I)`` frozen base weights (compute
        dtype, no gradient); a_gu ``(E, 2r, H)`` the gate and up adapters' ``A`` stacked along the rank;
        b_g, b_u ``(E, I, r)``; a_d ``(E, r, I)``; b_d ``(E, H, r)`` (any float dtype: cast to the compute
        dtype, gradients returned in their own dtype); scale the LoRA scale (float).
    Returns ``(N, H)`` in ``x``'s dtype. Gradients for x, w_slot and the five adapter factors (zero for experts
    without rows).
    """

    @staticmethod
    def forward(ctx, x, w_slot, src, spans, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, scale):
        cdt = x.dtype
        inter = w_d.shape[2]
        with torch.autocast(x.device.type, enabled=False):
            fa_gu, fa_d = a_gu.to(cdt), a_d.to(cdt)
            sb_gu = _block_diag_b(b_g.to(cdt), b_u.to(cdt)).mul_(scale)       # (E, 2I, 2r), times s
            sb_d = b_d.to(cdt) * scale                                        # (E, H, r), times s
            xs = x.index_select(0, src)                                       # (S, H)
            gu, xa = _blocks_lora_mm(xs, w_gu, fa_gu, sb_gu, spans)           # (S, 2I), (S, 2r)
            act = F.silu(gu[:, :inter])                                       # (S, I), kept for the backward
            h = torch.mul(act, gu[:, inter:]).mul_(w_slot.to(cdt)[:, None])   # (S, I)
            y, ha = _blocks_lora_mm(h, w_d, fa_d, sb_d, spans)                # (S, H), (S, r)
            out = torch.zeros_like(x).index_add_(0, src, y)
        ctx.save_for_backward(xs, gu, act, xa, h, ha, w_slot, src, w_gu, w_d, fa_gu, sb_gu, fa_d, sb_d)
        ctx.dtypes = (a_gu.dtype, b_g.dtype, b_u.dtype, a_d.dtype, b_d.dtype)   # of the gradients returned
        ctx.scale, ctx.n, ctx.spans = scale, x.shape[0], spans
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # the factors as the forward cast them, B times s
        xs, gu, act, xa, h, ha, w_slot, src, w_gu, w_d, fa_gu, sb_gu, fa_d, sb_d = ctx.saved_tensors
        s, spans = ctx.scale, ctx.spans
        cdt = xs.dtype
        inter = w_d.shape[2]
        r = fa_d.shape[1]
        with torch.autocast(xs.device.type, enabled=False):
            gy = grad_out.to(cdt).index_select(0, src)                        # (S, H)
            g_b_d = torch.zeros_like(sb_d)                                   # (E, H, r), over s
            g_a_d = torch.zeros_like(fa_d)                                   # (E, r, I)
            g_ha = torch.empty_like(ha)                                      # (S, r)
            g_h = torch.empty_like(h)                                        # (S, I)
            _blocks_lora_grad(spans, gy, ha, h, w_d, sb_d, fa_d, g_b_d, g_a_d, g_ha, g_h)
            del gy
            g, u = gu[:, :inter], gu[:, inter:]
            wc = w_slot.to(cdt)[:, None]
            gu_grad = torch.empty_like(gu)
            t = g_h * u                                                       # d h / d silu(g), before w
            torch.ops.aten.silu_backward.grad_input(t * wc, g, grad_input=gu_grad[:, :inter])
            g_w = t.mul_(act).sum(-1)                                         # (S,)
            torch.mul(g_h.mul_(wc), act, out=gu_grad[:, inter:])
            del t, act, g_h
            g_b = torch.zeros(sb_gu.shape, dtype=cdt, device=xs.device)      # (E, 2I, 2r) over s: diagonal blocks
            g_a_gu = torch.zeros_like(fa_gu)                                 # (E, 2r, H)
            g_xa = torch.empty_like(xa)                                       # (S, 2r)
            g_xs = torch.empty_like(xs)                                       # (S, H)
            _blocks_lora_grad(spans, gu_grad, xa, xs, w_gu, sb_gu, fa_gu, g_b, g_a_gu, g_xa, g_xs)
            g_b.mul_(s)
            g_b_d.mul_(s)
            g_x = xs.new_zeros(ctx.n, xs.shape[1]).index_add_(0, src, g_xs)
        d_agu, d_bg, d_bu, d_ad, d_bd = ctx.dtypes
        return (g_x, g_w.to(w_slot.dtype), None, None, None, None, g_a_gu.to(d_agu), g_b[:, :inter, :r].to(d_bg),
                g_b[:, inter:, r:].to(d_bu), g_a_d.to(d_ad), g_b_d.to(d_bd), None)


def slot_layout(sizes: list[int], eid: torch.Tensor, pos: torch.Tensor, align: int = 16
                ) -> tuple[torch.Tensor, list[tuple[int, int, int]], int]:
    """Where each sorted assignment goes in :class:`SortedExpertsLora`'s row layout: every expert with rows gets
    one contiguous block of slots, its row count rounded up to a multiple of ``align``.

    Args:
        sizes: rows of each of the ``E`` experts (python ints).
        eid: ``(M,)`` int64 expert of each assignment sorted by expert; pos: ``(M,)`` its position among its
            expert's rows.
        align: block granularity in rows.

    Returns:
        ``(slot, spans, total)``: ``slot`` ``(M,)`` int64 slot of each assignment; ``spans`` ``(expert, first
        slot, end slot)`` of every expert with rows; ``total`` the number of slots.

    Why rounded: a bfloat16 ``torch.mm`` of a shape not seen before costs 0.4-0.7 ms on this CPU (oneDNN builds
    a new kernel; the small LoRA products of 64 experts with as many distinct row counts spent 5x their
    arithmetic in it), while rounding to 16 rows keeps the shapes to a few dozen at about 6% more rows.
    """
    spans, start = [], 0
    first = []
    for e, n in enumerate(sizes):
        first.append(start)
        if n:
            span = -(-n // align) * align
            spans.append((e, start, start + span))
            start += span
    base = torch.tensor(first, dtype=torch.long, device=eid.device)
    return base[eid] + pos, spans, start
