"""llmtune.kernels.logps_entropy against the softmax formulas computed by hand with torch.log_softmax in float64."""

import pytest
import torch

from llmtune.kernels.logps_entropy import linear_logps_entropy


def _reference(h, w, labels, temperature, grad_out):
    """float64: log p[label] (0 where ignored), entropy -sum p log p, and d(sum grad_out * logp)/dh by autograd."""
    h = h.detach().double().requires_grad_()
    logp = torch.log_softmax((h @ w.double().t()) / temperature, -1)
    ignored = labels == -100
    lp = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0].masked_fill(ignored, 0.0)
    ent = -(logp.exp() * logp).sum(-1)
    (lp * grad_out.double()).sum().backward()
    return lp.detach(), ent.detach(), h.grad


@pytest.mark.parametrize("dtype,temperature,tol", [(torch.float64, 1.0, 1e-12), (torch.float64, 0.7, 1e-12),
                                                   (torch.float32, 0.7, 2e-5), (torch.float32, 1.0, 2e-5)])
@pytest.mark.parametrize("rows", [5, 64])
def test_logps_entropy_and_hidden_gradient_equal_the_float64_formulas(dtype, temperature, tol, rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g, dtype=torch.float64)
    w = torch.randn(3000, 24, generator=g, dtype=torch.float64) * 0.5   # 3000 columns: several float32 pieces
    labels = torch.randint(0, 3000, (37,), generator=g)
    labels[[3, 20]] = -100
    grad_out = torch.randn(37, generator=g, dtype=torch.float64)
    want_lp, want_ent, want_grad = _reference(h, w, labels, temperature, grad_out)
    x = h.to(dtype).requires_grad_()
    lp, ent = linear_logps_entropy(x, w.to(dtype), labels, rows, temperature)
    assert lp.dtype == ent.dtype == torch.promote_types(dtype, torch.float32) and not ent.requires_grad
    (lp * grad_out.to(lp.dtype)).sum().backward()
    scale = max(1.0, float(want_ent.abs().max()))
    assert torch.allclose(lp.double(), want_lp, atol=tol * scale, rtol=0)
    assert torch.allclose(ent.double(), want_ent, atol=tol * scale, rtol=0)
    assert torch.allclose(x.grad.double(), want_grad, atol=tol * 10, rtol=0)
    assert float(lp[3]) == 0.0 and float(x.grad[3].abs().max()) == 0.0 and float(x.grad[20].abs().max()) == 0.0


def test_bf16_autocast_products_stay_near_the_formula_and_no_grad_skips_the_gradient():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 32, generator=g)
    w = torch.randn(500, 32, generator=g) * 0.3
    labels = torch.randint(0, 500, (20,), generator=g)
    want_lp, want_ent, want_grad = _reference(h, w, labels, 1.0, torch.ones(20))
    x = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = linear_logps_entropy(x, w, labels, 8)
    lp.sum().backward()
    assert (lp.double() - want_lp).abs().max() < 0.1 and (ent.double() - want_ent).abs().max() < 0.1
    assert (x.grad.double() - want_grad).abs().max() < 0.05
    with torch.no_grad():
        lp2, _ = linear_logps_entropy(h, w, labels, 8)
    assert torch.allclose(lp2.double(), want_lp, atol=1e-4)


def test_a_trained_head_or_bad_shapes_are_refused():
    h, w, labels = torch.randn(4, 8), torch.randn(10, 8, requires_grad=True), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="no gradient"):
        linear_logps_entropy(h, w, labels, 4)
    with pytest.raises(ValueError, match="expected hidden"):
        linear_logps_entropy(h, w.detach()[:, :5], labels, 4)


@pytest.mark.parametrize("frozen", [True, False])
def test_token_logps_entropy_shifts_like_token_logps_and_matches_the_formulas(frozen):
    """(B, T) log-probs and entropies aligned with the labels (position t - 1 predicts label t), 0 where a label
    is -100 or at column 0; float64 log_softmax by hand as the reference. A trained head (frozen=False) takes the
    separate functions and must give the same values."""
    from llmtune.losses import token_logps_entropy

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    w = (torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.4).requires_grad_(not frozen)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[0, :3] = -100
    labels[1, 4] = -100
    lp, ent = token_logps_entropy(hidden, w, labels, temperature=0.9)
    logp = torch.log_softmax((hidden.detach() @ w.detach().t()) / 0.9, -1)        # (B, T, V): row t-1 -> label t
    want_lp = torch.zeros(2, 6, dtype=torch.float64)
    want_ent = torch.zeros(2, 6, dtype=torch.float64)
    for b in range(2):
        for t in range(1, 6):
            if labels[b, t] != -100:
                want_lp[b, t] = logp[b, t - 1, labels[b, t]]
                want_ent[b, t] = -(logp[b, t - 1].exp() * logp[b, t - 1]).sum()
    assert torch.allclose(lp.detach(), want_lp, atol=1e-12) and torch.allclose(ent, want_ent, atol=1e-12)
