"""The decode step's attention on the CPU: one query per row against a (float32) KV cache.

Source: scaled dot-product attention (Vaswani et al., 2017, eq. 1) with grouped-query heads (Ainslie et al., 2023).
"""

from __future__ import annotations

from typing import Optional

import torch


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`llmtune.models.transformer.attend` for one query per row on the CPU (a decode step):
    ``softmax(q k^T / sqrt(D)) v`` as two batched float32 products, the query heads of each key/value head grouped
    (no repeat of K or V).

    q ``(B, H, 1, D)``, k/v ``(B, H_kv, L, D)``, mask None or boolean ``(B, 1, 1, L)``; returns ``(B, 1, H, D)``
    in ``q``'s dtype. Torch's CPU SDPA kernel tiles for long queries: with one query and a bfloat16 cache it
    took 3-5x the time of these products (docs/performance.md). ``attend`` runs it with CPU autocast off
    (autocast would cast the float32 cache to bfloat16 for each product; it still applies inside
    ``torch.compile``).
    """
    b, h, _, d = q.shape
    hk, length = k.shape[1], k.shape[2]
    s = torch.matmul(q.float().view(b, hk, h // hk, d), k.float().transpose(-1, -2)) * (d ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask.reshape(mask.shape[0], 1, 1, length), float("-inf"))
    return torch.matmul(s.softmax(-1), v.float()).to(q.dtype).view(b, 1, h, d)
