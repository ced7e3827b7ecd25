"""The MoE grouped path keeps its stacked expert weights between no-grad forwards and rebuilds them when a
weight changes (an optimizer step, an in-place edit). Reference: the per-expert loop (``grouped=False``),
which reads the live weights."""

from __future__ import annotations

import pytest
import torch

import llmtune.models.moe as moe


def grouped_mm_reference(input, mat2, offs=None, bias=None, out_dtype=None):
    """``torch._grouped_mm`` for a 2-D ``input`` and 3-D ``mat2`` from its definition: rows
    ``offs[g-1]:offs[g]`` of ``input`` times ``mat2[g]`` (torch < 2.9 has no CPU kernel)."""
    out = input.new_zeros(input.shape[0], mat2.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = input[start:end] @ mat2[g]
        start = end
    return out


def test_grouped_path_keeps_stacked_weights_until_they_change(monkeypatch):
    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm_reference, raising=False)
    torch.manual_seed(3)
    experts = torch.nn.ModuleList(moe.ExpertMLP(24, 16) for _ in range(5))
    x = torch.randn(29, 24)
    weights, top = torch.topk(torch.softmax(torch.randn(29, 5), -1), 2, dim=-1)
    stacks = []
    real_stack = torch.stack

    def counting_stack(tensors, *args, **kwargs):
        stacks.append(len(tensors))
        return real_stack(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "stack", counting_stack)

    def both():
        with torch.no_grad():
            return (moe.experts_forward(x, experts, top, weights, grouped=True),
                    moe.experts_forward(x, experts, top, weights, grouped=False))

    y1, ref1 = both()
    torch.testing.assert_close(y1, ref1, atol=1e-5, rtol=1e-5)
    built = len(stacks)
    assert built == 3
    y2, _ = both()
    assert len(stacks) == built, "the stacked weights were rebuilt although no weight changed"
    torch.testing.assert_close(y2, y1, atol=0, rtol=0)

    opt = torch.optim.SGD(experts.parameters(), lr=0.5)   # a training step: every expert weight moves in place
    moe.experts_forward(x, experts, top, weights, grouped=False).square().sum().backward()
    opt.step()
    y3, ref3 = both()
    assert len(stacks) == built + 3
    torch.testing.assert_close(y3, ref3, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y3, y1, atol=1e-3)

    with torch.no_grad():
        experts[3].up_proj.weight.mul_(2.0)   # one weight edited in place
    y4, ref4 = both()
    torch.testing.assert_close(y4, ref4, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y4, y3, atol=1e-4)
