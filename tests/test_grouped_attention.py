"""CPU grouped-query causal attention in chunks of positions (llmtune.models.grouped_attention), through
``attend``: output and gradients against a float64 softmax(q k^T / sqrt(D) + causal mask) v written out here
(Vaswani et al., 2017, eq. 1; query head i on key/value head i // (H / H_kv), Ainslie et al., 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from llmtune.models.transformer import attend


def _reference(q, k, v):
    """(B, T, H, D) float64 causal attention, key/value heads repeated per group."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    t = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


# (batch, tokens, query heads, key/value heads): 2 and 3 chunks of positions (g T // 768), and one chunk
@pytest.mark.parametrize("shape", [(2, 200, 8, 1), (1, 300, 16, 2), (2, 64, 6, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_grouped_attention_matches_float64(shape, dtype):
    b, t, h, hk = shape
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(b, n, t, 16, generator=gen) for n in (h, hk, hk))
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = attend(*leaves, None)
    ref_leaves = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_leaves)
    assert out.dtype == dtype and out.shape == (b, t, h, 16)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double(), want.grad, atol=6e-2, rtol=3e-2)
