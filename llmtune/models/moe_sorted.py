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
copied) and write into the block of one preallocated output; the elementwise SwiGLU work and its backward
run on the same block right after its products (while its rows are in cache), and the outputs and input
gradients are scattered to / from the ``(N, H)`` token rows with one ``index_add_``. Measured on this CPU at
Qwen3-MoE shapes (one thread, bf16; docs/performance.md): a ``torch.mm`` per expert runs at the speed of one
padded ``torch.bmm`` over all experts, so computing about the rows there are (1.06x on random-init routing,
against 1.3-1.5x for the padded ``bmm`` levels, which also copy the crowded experts' weights) costs 0.75x the
CPU time of those levels, forward and backward.
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


def _lora_block(e: int, x: torch.Tensor, y: torch.Tensor, xa: torch.Tensor, wt, at, sbt) -> None:
    """One expert's block of sorted rows through its frozen weight plus LoRA, written into ``y`` and ``xa``:
    ``y = x W_e^T + (x A_e^T) (s B_e)^T``, ``xa = x A_e^T`` (LoRA, Hu et al. 2021, eq. 3); ``wt``, ``at``,
    ``sbt``: per-expert views of ``W^T``, ``A^T`` and ``(s B)^T`` (:func:`_per_expert`), one dtype."""
    torch.mm(x, wt[e], out=y)
    torch.mm(x, at[e], out=xa)
    y.addmm_(xa, sbt[e])


def _lora_block_grad(e: int, gy: torch.Tensor, xa: torch.Tensor, x: torch.Tensor, g_xa: torch.Tensor,
                     g_x: torch.Tensor, w, sb, a, g_b, g_a) -> None:
    """The backward of :func:`_lora_block` for one expert's block: given ``gy = d/dy`` and the forward's ``xa``
    and ``x``, writes ``g_b[e] = gy^T xa`` (the gradient of ``s B``), ``g_xa = gy (s B)``, ``g_a[e] = g_xa^T x``
    and ``g_x = gy W + g_xa A``; ``w``, ``sb``, ``a``, ``g_b``, ``g_a``: per-expert views."""
    torch.mm(gy.t(), xa, out=g_b[e])
    torch.mm(gy, sb[e], out=g_xa)
    torch.mm(g_xa.t(), x, out=g_a[e])
    torch.mm(gy, w[e], out=g_x).addmm_(g_xa, a[e])


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
            slots = xs.shape[0]
            gu, act, h = xs.new_empty(slots, 2 * inter), xs.new_empty(slots, inter), xs.new_empty(slots, inter)
            xa, ha = xs.new_empty(slots, fa_gu.shape[1]), xs.new_empty(slots, fa_d.shape[1])   # (S, 2r), (S, r)
            y = xs.new_empty(slots, w_d.shape[1])                             # (S, H)
            v_gu = _per_expert(w_gu.transpose(1, 2), fa_gu.transpose(1, 2), sb_gu.transpose(1, 2))
            v_d = _per_expert(w_d.transpose(1, 2), fa_d.transpose(1, 2), sb_d.transpose(1, 2))
            # one expert's block at a time: its SwiGLU rows are still in cache for the elementwise work
            for e, xs_e, gu_e, xa_e, act_e, h_e, y_e, ha_e, wc_e in _blocks(
                    spans, xs, gu, xa, act, h, y, ha, w_slot.to(cdt)[:, None]):
                _lora_block(e, xs_e, gu_e, xa_e, *v_gu)
                torch.ops.aten.silu.out(gu_e[:, :inter], out=act_e)          # kept for the backward
                torch.mul(act_e, gu_e[:, inter:], out=h_e).mul_(wc_e)
                _lora_block(e, h_e, y_e, ha_e, *v_d)
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
            g_b_d, g_a_d = torch.zeros_like(sb_d), torch.zeros_like(fa_d)     # (E, H, r) over s, (E, r, I)
            g_b = torch.zeros(sb_gu.shape, dtype=cdt, device=xs.device)      # (E, 2I, 2r) over s: diagonal blocks
            g_a_gu = torch.zeros_like(fa_gu)                                 # (E, 2r, H)
            g_ha, g_h, gu_grad = torch.empty_like(ha), torch.empty_like(act), torch.empty_like(gu)
            g_xa, g_xs, g_w = torch.empty_like(xa), torch.empty_like(xs), xs.new_empty(xs.shape[0])
            v_d = _per_expert(w_d, sb_d, fa_d, g_b_d, g_a_d)
            v_gu = _per_expert(w_gu, sb_gu, fa_gu, g_b, g_a_gu)
            # one expert's block at a time, while its rows are in cache: down, SwiGLU, gate and up
            for e, gy_e, ha_e, h_e, g_ha_e, g_h_e, gu_e, act_e, wc_e, gg_e, g_w_e, xa_e, xs_e, g_xa_e, g_xs_e \
                    in _blocks(spans, gy, ha, h, g_ha, g_h, gu, act, w_slot.to(cdt)[:, None], gu_grad, g_w, xa, xs,
                               g_xa, g_xs):
                _lora_block_grad(e, gy_e, ha_e, h_e, g_ha_e, g_h_e, *v_d)
                t = g_h_e * gu_e[:, inter:]                                   # d h / d silu(g), before w
                torch.ops.aten.silu_backward.grad_input(t * wc_e, gu_e[:, :inter], grad_input=gg_e[:, :inter])
                torch.sum(t.mul_(act_e), -1, out=g_w_e)
                torch.mul(g_h_e.mul_(wc_e), act_e, out=gg_e[:, inter:])
                _lora_block_grad(e, gg_e, xa_e, xs_e, g_xa_e, g_xs_e, *v_gu)
            del gy, g_h, act
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
