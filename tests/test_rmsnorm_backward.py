"""RMSNorm's written-out backward (llmtune.models.norm, used by transformer.RMSNorm in training): the forward
against transformers' LlamaRMSNorm (test-only reference, same dtype), gradients against float64 autograd of
y = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich, 2019)."""

from __future__ import annotations

import pytest
import torch

from llmtune.models.transformer import RMSNorm


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rmsnorm_forward_and_gradients(dtype, tol, train_weight):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 64, generator=gen) * 3
    w0 = torch.rand(64, generator=gen) + 0.5
    g = torch.randn(3, 5, 64, generator=gen)
    norm = RMSNorm(64, eps=1e-6).to(dtype)
    ref = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w0)
        ref.weight.copy_(w0)
    norm.weight.requires_grad_(train_weight)
    x = x0.to(dtype).clone().requires_grad_()
    y = norm(x)
    assert y.dtype == dtype and torch.equal(y, ref(x0.to(dtype)))
    y.backward(g.to(dtype))
    xd = x0.to(dtype).double().requires_grad_()
    wd = w0.to(dtype).double().requires_grad_()
    yd = wd * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    yd.backward(g.to(dtype).double())
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=tol, rtol=tol)
    if train_weight:
        assert norm.weight.grad.dtype == dtype
        torch.testing.assert_close(norm.weight.grad.double(), wd.grad, atol=tol * 15, rtol=tol)
    else:
        assert norm.weight.grad is None
