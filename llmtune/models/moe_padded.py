"""The padded levels of :func:`llmtune.models.moe._grouped_frozen`'s autograd path (frozen experts without
adapters, or with several adapters or active dropout): how many padded ``torch.bmm`` products and of what
group size (:func:`_plan`)."""

from __future__ import annotations


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
