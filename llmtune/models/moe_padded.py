"""One padded ``torch.bmm`` layout of frozen SwiGLU experts with one LoRA adapter per projection, forward and
backward written out (:class:`PaddedExpertsLora`), for the CPU path of :func:`llmtune.models.moe._grouped_frozen`.

For every expert ``e`` and its token rows ``x`` (Hu et al. 2021, LoRA eq. 3, on a SwiGLU expert):

* ``[g | u] = x W_gu[e]^T + s [xa_g B_g[e]^T | xa_u B_u[e]^T]`` with ``xa = x [A_g[e]; A_u[e]]^T``;
* ``h = silu(g) * u * w`` (``w`` the token's routing weight, applied here on the ``I``-wide rows rather than
  on the ``H``-wide output: the down projection and its adapter are linear, so the result is the same);
* ``y = h W_d[e]^T + s (h A_d[e]^T) B_d[e]^T``, added into the token's output row.

The rows are laid out ``(E, C, .)`` (``C`` rows per expert, padding slots reading token row 0 with routing weight
0, so their ``h`` and every gradient they produce are exactly zero) and gathered from / scattered to the ``(N, H)``
token rows inside the function. Written as one ``autograd.Function`` so that the step does only the products and
elementwise passes the formulas need: no zero row appended to ``x``, no per-slice in-place adds recorded by
autograd (``CopySlices``), no zero-filled gradient buffers of the padded layout, gate and up adapters in one
block-diagonal product, the gradient of the gathered rows scattered back with one ``index_add_``.
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


class PaddedExpertsLora(torch.autograd.Function):
    """``out (N, H) = sum over slots of y[slot]`` scattered to token ``src[slot]`` (see the module docstring).

    forward(x, w_slot, src, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, scale):
        x ``(N, H)`` token rows (compute dtype); w_slot ``(E, C)`` routing weight per slot (0 for padding);
        src ``(E * C,)`` int64 token row per slot; w_gu ``(E, 2I, H)`` and w_d ``(E, H, I)`` frozen base
        weights (compute dtype, no gradient); a_gu ``(E, 2r, H)`` the gate and up adapters' ``A`` stacked along
        the rank; b_g, b_u ``(E, I, r)``; a_d ``(E, r, I)``; b_d ``(E, H, r)`` (any float dtype: cast to the
        compute dtype, gradients returned in their own dtype); scale the LoRA scale (float).
    Returns ``(N, H)`` in ``x``'s dtype. Gradients for x, w_slot and the five adapter factors.
    """

    @staticmethod
    def forward(ctx, x, w_slot, src, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d, scale):
        cdt = x.dtype
        e, c = w_slot.shape
        inter = w_d.shape[2]
        with torch.autocast(x.device.type, enabled=False):
            fa_gu, fb_g, fb_u, fa_d, fb_d = (t.to(cdt) for t in (a_gu, b_g, b_u, a_d, b_d))
            xp = x.index_select(0, src).view(e, c, -1)                       # (E, C, H)
            gu = torch.bmm(xp, w_gu.transpose(1, 2))                          # (E, C, 2I)
            xa = torch.bmm(xp, fa_gu.transpose(1, 2))                         # (E, C, 2r)
            gu.baddbmm_(xa, _block_diag_b(fb_g, fb_u).transpose(1, 2), alpha=scale)
            h = F.silu(gu[..., :inter]).mul_(gu[..., inter:]).mul_(w_slot.to(cdt)[..., None])   # (E, C, I)
            y = torch.bmm(h, w_d.transpose(1, 2))                             # (E, C, H)
            ha = torch.bmm(h, fa_d.transpose(1, 2))                           # (E, C, r)
            y.baddbmm_(ha, fb_d.transpose(1, 2), alpha=scale)
            out = torch.zeros_like(x).index_add_(0, src, y.view(e * c, -1))
        ctx.save_for_backward(xp, gu, xa, h, ha, w_slot, src, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d)
        ctx.scale, ctx.n = scale, x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xp, gu, xa, h, ha, w_slot, src, w_gu, w_d, a_gu, b_g, b_u, a_d, b_d = ctx.saved_tensors
        s = ctx.scale
        cdt = xp.dtype
        e, c, hid = xp.shape
        inter = w_d.shape[2]
        r = b_g.shape[2]
        with torch.autocast(xp.device.type, enabled=False):
            fa_gu, fb_g, fb_u, fa_d, fb_d = (t.to(cdt) for t in (a_gu, b_g, b_u, a_d, b_d))
            gy = grad_out.to(cdt).index_select(0, src).view(e, c, hid)        # (E, C, H)
            g_b_d = torch.bmm(gy.transpose(1, 2), ha).mul_(s)                 # (E, H, r)
            g_ha = torch.bmm(gy, fb_d).mul_(s)                                # (E, C, r)
            g_a_d = torch.bmm(g_ha.transpose(1, 2), h)                        # (E, r, I)
            g_h = torch.bmm(gy, w_d).baddbmm_(g_ha, fa_d)                    # (E, C, I)
            del gy
            g, u = gu[..., :inter], gu[..., inter:]
            act = F.silu(g)
            wc = w_slot.to(cdt)[..., None]
            gu_grad = torch.empty_like(gu)
            t = g_h * u                                                       # d h / d silu(g), before w
            torch.ops.aten.silu_backward.grad_input(t * wc, g, grad_input=gu_grad[..., :inter])
            g_w = (t.mul_(act)).sum(-1)                                       # (E, C)
            torch.mul(g_h.mul_(wc), act, out=gu_grad[..., inter:])
            del t, act, g_h
            g_b = torch.bmm(gu_grad.transpose(1, 2), xa).mul_(s)              # (E, 2I, 2r): diagonal blocks used
            g_xa = torch.bmm(gu_grad, _block_diag_b(fb_g, fb_u)).mul_(s)     # (E, C, 2r)
            g_a_gu = torch.bmm(g_xa.transpose(1, 2), xp)                      # (E, 2r, H)
            g_xp = torch.bmm(gu_grad, w_gu).baddbmm_(g_xa, fa_gu)            # (E, C, H)
            g_x = xp.new_zeros(ctx.n, hid).index_add_(0, src, g_xp.view(e * c, hid))
        return (g_x, g_w.to(w_slot.dtype), None, None, None, g_a_gu.to(a_gu.dtype),
                g_b[:, :inter, :r].to(b_g.dtype), g_b[:, inter:, r:].to(b_u.dtype), g_a_d.to(a_d.dtype),
                g_b_d.to(b_d.dtype), None)


def _plan(sizes: list[int], max_levels: int = 4) -> tuple[int, ...]:
    """The padded levels of :func:`llmtune.models.moe._grouped_frozen` for experts with ``sizes`` rows: thresholds
    ``c_1 < c_2 < ... < c_L = max(sizes)`` (at most ``max_levels``); level ``l`` is one batched product over the
    ``n_l`` experts with more than ``c_{l-1}`` rows (``c_0 = 0``), each padded to ``c_l - c_{l-1}`` rows.

    Chosen (exact dynamic programme over the distinct sizes) to minimise the padded rows ``sum_l n_l (c_l -
    c_{l-1})`` plus, for every level after the first, ``40 n_l + 10`` rows: the cost of gathering those experts'
    weights (measured on this CPU at Qwen3-MoE shapes, one thread: copying one expert's gate, up and down
    weights, about 5 ms, costs as much as 40-75 padded rows' products forward and backward) and of the level's
    fixed work. Balanced routing gives one level, ``(max(sizes),)``."""
    cands = sorted({s for s in sizes if s > 0})
    if not cands:
        return (max(sizes),) if sizes else (0,)
    above = {c: sum(1 for s in sizes if s > c) for c in [0] + cands}
    # best[(c, levels left)] = (cost, thresholds) to cover every row above threshold c
    best: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {(cands[-1], 0): (0.0, ())}
    for left in range(1, max_levels + 1):
        for c in reversed([0] + cands):
            if c == cands[-1]:
                best[(c, left)] = (0.0, ())
                continue
            fixed = 0.0 if c == 0 else 40.0 * above[c] + 10.0
            opts = [(above[c] * (c2 - c) + fixed + best[(c2, left - 1)][0], (c2,) + best[(c2, left - 1)][1])
                    for c2 in cands if c2 > c and (c2, left - 1) in best]
            if opts:
                best[(c, left)] = min(opts)
    return best[(0, max_levels)][1]


def _capacity(sizes: list[int]) -> int:
    """The padded group size ``C`` of the first level of :func:`_plan` (all ``E`` experts in one batched
    product); ``max(sizes)`` when one level is best (balanced routing)."""
    return _plan(sizes)[0]
