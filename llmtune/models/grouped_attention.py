"""Causal grouped-query self-attention on the CPU in bfloat16/float16, shaped for torch's CPU flash kernel.

Source: scaled dot-product attention (Vaswani et al., 2017, eq. 1) with grouped-query heads (Ainslie et al., 2023).

The ``g = H / H_kv`` query heads that share a key/value head run as one taller query against that head (no
repeat of K or V). Torch's CPU flash kernel picks its query block from the query length (256 rows from 768
query rows, 64 from 192, else 32) and, with an explicit mask, computes every key block of every query block.
So the group's rows are cut into ``n = max(1, g T // 768)`` chunks of positions, each at least 768 rows:
chunk ``c`` (positions ``[s, e)``, their ``g`` heads interleaved, row ``(t - s) g + j`` = position ``t`` of
head ``j``) attends to keys ``[0, e)`` only, under the causal mask of those positions, which skips the keys
above the chunk (about a quarter of the products with two chunks). With one chunk the heads are stacked
instead (row ``j T + t``), the layout measured first. Measured forward + backward on one thread at 512 tokens
(docs/performance.md): 2 x 16/4 heads of 64, 82 -> 67 ms; 4 x 9/3 heads, 95 -> 81 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# query rows from which the CPU flash kernel takes 256-row query blocks
_TALL_ROWS = 768


def _causal(n: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None]


def grouped_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``T`` queries on their own ``T`` keys with grouped key/value heads.

    Args:
        q: ``(B, H, T, D)``; k, v: ``(B, H_kv, T, D)`` with ``H % H_kv == 0`` (same dtype; meant for bf16/fp16
            on the CPU, where it is measured faster than ``enable_gqa``; correct on any device and dtype).

    Returns:
        ``(B, T, H, D)`` in ``q``'s dtype: ``softmax(q k^T / sqrt(D) + causal) v`` per head, query head ``i``
        on key/value head ``i // (H / H_kv)``.
    """
    b, h, t, d = q.shape
    hk = k.shape[1]
    g = h // hk
    chunks = max(1, min(t, g * t // _TALL_ROWS))
    if chunks == 1:
        mask = _causal(t, q.device).repeat(g, 1)
        out = F.scaled_dot_product_attention(q.reshape(b, hk, g * t, d), k, v, attn_mask=mask)
        return out.view(b, h, t, d).transpose(1, 2)
    causal = _causal(t, q.device)
    rows = q.view(b, hk, g, t, d).transpose(2, 3)                   # (B, H_kv, T, g, D): a position's heads together
    bounds = [t * c // chunks for c in range(chunks + 1)]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qc = rows[:, :, s:e].reshape(b, hk, (e - s) * g, d)
        mask = causal[s:e, :e].repeat_interleave(g, 0)
        outs.append(F.scaled_dot_product_attention(qc, k[:, :, :e], v[:, :, :e], attn_mask=mask)
                    .view(b, hk, e - s, g, d))
    return torch.cat(outs, 2).permute(0, 2, 1, 3, 4).reshape(b, t, h, d)
