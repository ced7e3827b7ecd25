"""Float16 training with a GradScaler: the chunked and the fused cross entropy are scale-correct.

A confident model gives non-target probabilities far below float16's smallest subnormal (6e-8); autograd
through ``log_softmax`` multiplies them by the incoming gradient (which carries the ``GradScaler``'s scale)
before rounding to float16, so they survive. The reference is float64 autograd of ``-log_softmax(h W^T)[y]``
(the definition), times the scale.
"""

from __future__ import annotations

import pytest
import torch

from llmtune.kernels.cross_entropy import fused_linear_cross_entropy
from llmtune.losses.logps import causal_lm_loss

SCALE = 2.0**24


def _confident(n=6, h=8, v=64, seed=0):
    """Rows whose target (id 0) has logit 0 and every other token about -22 (probability ~3e-10)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * 0.5
    hidden[:, 0] = 1.0
    weight = torch.randn(v, h, generator=g) * 0.5
    weight[:, 0] = -22.0
    weight[0] = 0.0   # the target row: logit exactly 0, and p_target - 1 (lost in float32) meets a zero row
    return hidden.half(), weight.half(), torch.zeros(n, dtype=torch.long)


def _reference(hidden, weight, labels):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = -torch.log_softmax(h @ w.t(), -1).gather(1, labels[:, None]).sum()
    (loss * SCALE).backward()
    return h.grad, w.grad


def _fused(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)[0]


def _chunked(hidden, weight, labels):   # causal_lm_loss shifts: row t predicts labels[t + 1]
    lab = torch.cat([torch.full((1,), -100), labels])[None]
    return causal_lm_loss(torch.cat([hidden, hidden[:1]])[None], weight, lab, chunk_size=4)[0]


@pytest.mark.parametrize("loss_fn", [_fused, _chunked], ids=["fused", "chunked"])
def test_fp16_cross_entropy_gradients_survive_loss_scaling(loss_fn):
    hidden, weight, labels = _confident()
    ref_h, ref_w = _reference(hidden, weight, labels)
    assert 0 < ref_w[1:].abs().max() / SCALE < 6e-8   # the true gradients underflow in float16
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    loss = loss_fn(h, w, labels)
    torch.testing.assert_close(loss.double(), -torch.log_softmax(hidden.double() @ weight.double().t(), -1)[:, 0].sum(),
                               rtol=1e-3, atol=1e-6)
    scaler.scale(loss).backward()
    gw = w.grad.double()[: weight.shape[0]]
    gh = h.grad.double()[: hidden.shape[0]]
    assert torch.isfinite(gw).all() and torch.isfinite(gh).all()
    assert (gw[1:] != 0).any(dim=1).all(), "non-target weight gradients underflowed to zero"
    torch.testing.assert_close(gw[1:], ref_w[1:], rtol=2e-2, atol=ref_w[1:].abs().max().item() * 2e-3)
    torch.testing.assert_close(gh, ref_h, rtol=2e-2, atol=ref_h.abs().max().item() * 2e-3)
