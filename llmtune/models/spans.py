"""Segment spans: where attention is block-diagonal and causal (packed rows, padded rows, shared prompts).

A packed row of several sequences (padding-free batches), or a padded batch, is described by the runs of equal
segment ids of its ``attention_mask``: each run is one sequence whose tokens attend causally within it. The
attention (:func:`llmtune.models.transformer.attend`) runs per span instead of under a dense ``(B, 1, T, T)``
mask; the shared-prompt layout of :mod:`llmtune.models.shared_prefix` adds a parent span per completion.

Source: causal self-attention (Vaswani et al., 2017) restricted to packed sequences, as in variable-length
("padding-free") attention kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["SegmentSpans", "segment_spans"]


@dataclass
class SegmentSpans:
    """Where attention is block-diagonal and causal: the alternative to a dense ``(B, 1, T, T)`` mask.

    Attributes:
        spans: ``(row, start, end)`` triples, ``end`` exclusive: the tokens ``start..end-1`` of batch row
            ``row`` form one sequence (a padded row's tokens, or one packed segment); a query attends to the
            keys of its own span at or before it (and, with ``window``, fewer than ``window`` positions back).
            Positions in no span (padding) get a zero attention output.
        batch, length: the ``(B, T)`` shape the spans index.
        window: Mistral/Qwen2 sliding window or None.
        cu_seqlens: ``(len(spans) + 1,)`` int32 start offsets in the flattened ``B*T`` token axis when the spans
            tile it exactly (no padding), else None; used by the CUDA variable-length kernel.

    Built by :func:`segment_spans` from an ``attention_mask`` of segment ids; consumed by
    :func:`llmtune.models.transformer.attend`.
    """

    spans: list
    batch: int
    length: int
    window: Optional[int] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_len: int = 0
    parents: Optional[list] = None   # per span: an earlier span whose keys it also sees, or -1 (shared prompts:
    #                                  llmtune.models.shared_prefix; one packed row, no window, no cu_seqlens)


def segment_spans(attention_mask: torch.Tensor, window: Optional[int] = None) -> Optional[SegmentSpans]:
    """The runs of equal nonzero segment ids of ``attention_mask`` ``(B, T)`` (0 = padding) as
    :class:`SegmentSpans`, or None when an id of a row comes back after a gap (``[1, 1, 0, 1]``): that segment
    is not contiguous, and only the dense mask describes it. One host sync."""
    seg = attention_mask.long()
    b, t = seg.shape
    flat = torch.cat([seg, seg.new_zeros(b, 1)], dim=1).reshape(-1)           # a 0 column ends every row
    prev = torch.cat([flat.new_zeros(1), flat[:-1]])
    starts = ((flat != prev) & (flat > 0)).nonzero().flatten()
    keys = (starts // (t + 1)) * (int(seg.max()) + 1) + flat[starts]          # (row, segment id) of each run
    if keys.unique().numel() != keys.numel():
        return None
    ends = ((flat != torch.cat([flat[1:], flat.new_zeros(1)])) & (flat > 0)).nonzero().flatten() + 1
    spans, cu, longest = [], [0], 0
    for st, en in zip(starts.tolist(), ends.tolist()):
        row = st // (t + 1)
        s0, e0 = st - row * (t + 1), en - row * (t + 1)
        spans.append((row, s0, e0))
        cu.append(cu[-1] + e0 - s0)
        longest = max(longest, e0 - s0)
    tiled = cu[-1] == b * t
    cu_t = torch.tensor(cu, dtype=torch.int32, device=seg.device) if tiled else None
    return SegmentSpans(spans, b, t, window, cu_t, longest)
