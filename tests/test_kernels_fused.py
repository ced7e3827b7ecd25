"""The training-step Triton kernels (RMSNorm, RoPE, SwiGLU, softmax cross entropy, fused linear CE/logps)
against float64 references written here, forward and backward.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by the
conftest; LLMTUNE_FORCE_TRITON=1 sends CPU tensors to Triton). With a GPU and TRITON_INTERPRET=0 (the
prepared GPU check, ``benchmarks/gpu_check.py``) the same tests run compiled kernels on CUDA tensors.
Shapes are small (the interpreter is slow) and include sizes that are not multiples of the block sizes.
The float64 references are the formulas (RMSNorm: Zhang & Sennrich 2019 eq. 4; RoPE rotate-half: Su et
al. 2021; SwiGLU: Shazeer 2020; softmax cross entropy), differentiated by autograd in float64.
"""

import os

import pytest
from kernel_helpers import assert_close_scaled, interpret_fused_kernels
import torch

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true") else "cpu"
# bf16 results are compared at a few bf16 ulps of the largest magnitude; fp32 at float32 accumulation error.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True, scope="module")
def _force_triton():
    from llmtune.kernels import dispatch

    old = os.environ.get("LLMTUNE_FORCE_TRITON")
    os.environ["LLMTUNE_FORCE_TRITON"] = "1"
    dispatch.set_enabled(True)
    interpret_fused_kernels(DEV)
    yield
    dispatch.set_enabled(None)
    if old is None:
        os.environ.pop("LLMTUNE_FORCE_TRITON", None)
    else:
        os.environ["LLMTUNE_FORCE_TRITON"] = old


def _close(got, want, dtype, what=""):
    assert_close_scaled(got, want, TOL[dtype], what)


def _leaf(t, dtype):
    return t.to(device=DEV, dtype=dtype).detach().requires_grad_()


def _d64(t):
    return t.detach().double().cpu().requires_grad_()


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------

def _rms64(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 3, 4, 16), (19, 130)])  # decoder, per-head q/k, odd rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_forward_backward(shape, dtype):
    from llmtune.kernels.rmsnorm import rms_norm

    x = _leaf(torch.randn(shape) * 3, dtype)
    w = _leaf(1 + 0.1 * torch.randn(shape[-1]), dtype)
    y = rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn(shape)
    y.backward(dy.to(DEV, dtype))
    x64, w64 = _d64(x), _d64(w)
    y64 = _rms64(x64, w64, 1e-6)
    y64.backward(dy.to(dtype).double())
    _close(y, y64, dtype, "y")
    _close(x.grad, x64.grad, dtype, "dx")
    _close(w.grad, w64.grad, dtype, "dweight")


def test_rms_norm_frozen_weight_fp32_weight_bf16_input():
    """LoRA: the norm weight is frozen (no dweight computed); a float32 weight on bf16 input gives float32."""
    from llmtune.kernels.rmsnorm import rms_norm

    x = _leaf(torch.randn(7, 24), torch.bfloat16)
    w = (1 + 0.1 * torch.randn(24)).to(DEV)
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32
    y.sum().backward()
    x64 = _d64(x)
    y64 = _rms64(x64, w.double().cpu(), 1e-5)
    y64.sum().backward()
    _close(y, y64, torch.bfloat16, "y")
    _close(x.grad, x64.grad, torch.bfloat16, "dx")


# ----------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------

def _cos_sin(b, t, d, offset=0):
    pos = torch.randint(0, 50, (b, t)).double() + offset
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = pos[..., None] * inv
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def _rope64(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos[:, None] + rot * sin[:, None]


@pytest.mark.parametrize("b,hq,hk,t,d", [(2, 4, 2, 5, 12), (1, 3, 3, 7, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_forward_backward(b, hq, hk, t, d, dtype):
    from llmtune.kernels.rope import apply_rope

    cos, sin = _cos_sin(b, t, d)
    # q as the model makes it: a transposed view of (B, T, H, D); k contiguous
    q = torch.randn(b, t, hq, d).to(DEV, dtype).transpose(1, 2).detach().requires_grad_()
    k = _leaf(torch.randn(b, hk, t, d), dtype)
    qo, ko = apply_rope(q, k, cos.float().to(DEV), sin.float().to(DEV))
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    gq, gk = torch.randn(qo.shape), torch.randn(ko.shape)
    ((qo * gq.to(DEV, dtype)).sum() + (ko * gk.to(DEV, dtype)).sum()).backward()
    q64, k64 = _d64(q), _d64(k)
    q64o, k64o = _rope64(q64, cos, sin), _rope64(k64, cos, sin)
    ((q64o * gq.to(dtype).double()).sum() + (k64o * gk.to(dtype).double()).sum()).backward()
    _close(qo, q64o, dtype, "q")
    _close(ko, k64o, dtype, "k")
    _close(q.grad, q64.grad, dtype, "dq")
    _close(k.grad, k64.grad, dtype, "dk")


def test_rope_broadcast_cos_and_in_place_without_grad():
    """cos/sin (1, T, D) broadcast over the batch; with no gradient needed q and k are rotated in place."""
    from llmtune.kernels.rope import apply_rope

    b, h, t, d = 3, 2, 6, 10
    cos, sin = _cos_sin(1, t, d)
    q, k = torch.randn(b, h, t, d), torch.randn(b, 1, t, d)
    q64 = _rope64(q.double(), cos, sin)
    k64 = _rope64(k.double(), cos, sin)
    qd, kd = q.to(DEV), k.to(DEV)
    with torch.no_grad():
        qo, ko = apply_rope(qd, kd, cos.float().to(DEV), sin.float().to(DEV))
    assert qo.data_ptr() == qd.data_ptr() and ko.data_ptr() == kd.data_ptr()
    _close(qo, q64, torch.float32, "q")
    _close(ko, k64, torch.float32, "k")


# ----------------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 33), (2, 3, 1030)])  # 1030: not a multiple of the 1024-element block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_backward(shape, dtype):
    from llmtune.kernels.swiglu import swiglu

    g, u = _leaf(torch.randn(shape) * 3, dtype), _leaf(torch.randn(shape), dtype)
    y = swiglu(g, u)
    assert y.shape == g.shape and y.dtype == dtype
    dy = torch.randn(shape)
    y.backward(dy.to(DEV, dtype))
    g64, u64 = _d64(g), _d64(u)
    y64 = g64 / (1 + torch.exp(-g64)) * u64
    y64.backward(dy.to(dtype).double())
    _close(y, y64, dtype, "y")
    _close(g.grad, g64.grad, dtype, "dgate")
    _close(u.grad, u64.grad, dtype, "dup")


# ----------------------------------------------------------------------------------------------------
# Softmax cross entropy of one chunk (the kernel) and the fused linear CE / logps around it
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("v", [50, 1100])  # 1100 > the interpreter's 1024-wide vocabulary block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_chunk_kernel(v, dtype):
    from llmtune.kernels.cross_entropy import cross_entropy_chunk

    n, temp = 6, 0.7
    z = torch.randn(n, v) * 4
    tgt = torch.randint(0, v, (n,))
    tgt[1] = -100
    scale = torch.randn(n)
    logits = z.to(DEV, dtype).clone()  # overwritten in place by the gradient
    loss, lse = cross_entropy_chunk(logits, tgt.to(DEV), grad_scale=scale.to(DEV), temperature=temp, write_grad=True)
    z64 = z.to(dtype).double() / temp
    lse64 = torch.logsumexp(z64, -1)
    keep = tgt != -100
    loss64 = torch.where(keep, lse64 - z64.gather(1, tgt.clamp(min=0)[:, None]).squeeze(1), 0.0)
    g64 = (torch.softmax(z64, -1) - torch.nn.functional.one_hot(tgt.clamp(min=0), v)) * (scale * keep)[:, None] / temp
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    _close(loss, loss64, torch.float32 if dtype == torch.float32 else dtype, "loss")
    _close(lse, lse64, torch.float32 if dtype == torch.float32 else dtype, "lse")
    _close(logits, g64, dtype, "grad written over the logits")
    assert torch.all(logits[1] == 0)


def _ce64(h, w, labels, temp=1.0):
    lp = torch.log_softmax(h @ w.t() / temp, -1)
    keep = labels != -100
    return torch.where(keep, lp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)


@pytest.mark.parametrize("n,hdim,v,chunk", [(7, 16, 50, 3), (5, 24, 1030, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy(n, hdim, v, chunk, dtype):
    from llmtune.kernels.cross_entropy import fused_linear_cross_entropy

    h, w = _leaf(torch.randn(n, hdim), dtype), _leaf(torch.randn(v, hdim) * 0.5, dtype)
    labels = torch.randint(0, v, (n,))
    labels[0] = labels[n - 2] = -100
    loss, count = fused_linear_cross_entropy(h, w, labels.to(DEV), chunk_size=chunk)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and int(count) == n - 2
    (loss * 0.5).backward()
    h64, w64 = _d64(h), _d64(w)
    ref = -_ce64(h64, w64, labels).sum()
    (ref * 0.5).backward()
    _close(loss, ref, dtype, "loss")
    _close(h.grad, h64.grad, dtype, "dhidden")
    _close(w.grad, w64.grad, dtype, "dweight")
    assert torch.all(h.grad[0] == 0)  # an ignored row gets no gradient


def test_fused_linear_cross_entropy_all_ignored_and_frozen_weight():
    from llmtune.kernels.cross_entropy import fused_linear_cross_entropy

    h = _leaf(torch.randn(4, 8), torch.float32)
    w = torch.randn(30, 8, device=DEV)  # frozen lm_head (LoRA): no weight gradient is computed
    loss, count = fused_linear_cross_entropy(h, w, torch.full((4,), -100, device=DEV))
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(count) == 0 and torch.all(h.grad == 0)
    with pytest.raises(ValueError, match="labels must be"):
        fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 30, -100], device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_grouped_products_cpu(monkeypatch, dtype):
    """The CPU path that runs the vocabulary products of several chunks as one (forced on at a small weight:
    groups of 3 chunks of 4 rows, a ragged last group, the float32 passes on 2-row pieces) against the float64
    log-softmax reference; one row's target sits 200 nats below its row's maximum (a probability under
    float32's range), so its loss must come from the log-softmax fallback, not log(0)."""
    from llmtune.kernels import cross_entropy as ce

    if DEV != "cpu":
        pytest.skip("a CPU path")
    monkeypatch.setattr(ce, "use_triton", lambda t: False)   # this file may force Triton's interpreter on
    monkeypatch.setattr(ce, "_GROUP_MIN_WEIGHT_CPU", 0)
    monkeypatch.setattr(ce, "_GROUP_ELEMENTS_CPU", 3 * 4 * 40)
    monkeypatch.setattr(ce, "_PASS_ELEMENTS_CPU", 2 * 40)    # float32 passes on 2-row pieces (and a 1-row tail)
    n, hdim, v = 17, 8, 40
    h, w = _leaf(torch.randn(n, hdim), dtype), torch.randn(v, hdim) * 0.5
    h5 = h[5].detach().float().cpu()
    w[0] = -h5 * (200.0 / float(h5.norm() ** 2))   # the logit of token 0 in row 5: -200
    w = _leaf(w, dtype)
    labels = torch.randint(1, v, (n,))
    labels[5], labels[2], labels[13] = 0, -100, -100
    assert ce._rows_per_product(4, w, h) == 12
    loss, count = ce.fused_linear_cross_entropy(h, w, labels.to(DEV), chunk_size=4)
    assert int(count) == n - 2 and torch.isfinite(loss)
    (loss * 0.5).backward()
    h64, w64 = _d64(h), _d64(w)
    per_row = -_ce64(h64, w64, labels)
    assert float(per_row[5].detach()) > 150.0   # the case the fallback is for
    ref = per_row.sum()
    (ref * 0.5).backward()
    _close(loss, ref, dtype, "loss")
    _close(h.grad, h64.grad, dtype, "dhidden")
    _close(w.grad, w64.grad, dtype, "dweight")
    assert torch.all(h.grad[2] == 0) and torch.all(h.grad[13] == 0)
    # the label log-probs' recomputing backward goes through the same grouped products (a per-row gradient)
    h.grad = w.grad = h64.grad = w64.grad = None
    lp = ce.fused_linear_logps(h, w, labels.to(DEV), chunk_size=4, temperature=0.7)
    go = torch.randn(n)
    (lp * go.to(DEV)).sum().backward()
    ref = _ce64(h64, w64, labels, 0.7)
    (ref * go.double()).sum().backward()
    _close(lp, ref, dtype, "logps")
    _close(h.grad, h64.grad, dtype, "dhidden (logps)")
    _close(w.grad, w64.grad, dtype, "dweight (logps)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logps(dtype):
    from llmtune.kernels.cross_entropy import fused_linear_logps

    n, hdim, v, temp = 9, 12, 70, 0.8
    h, w = _leaf(torch.randn(n, hdim), dtype), _leaf(torch.randn(v, hdim) * 0.5, dtype)
    labels = torch.randint(0, v, (n,))
    labels[3] = -100
    lp = fused_linear_logps(h, w, labels.to(DEV), chunk_size=4, temperature=temp)
    assert lp.shape == (n,) and lp.dtype == torch.float32 and float(lp[3]) == 0.0
    go = torch.randn(n)  # a different incoming gradient per row, as DPO's
    (lp * go.to(DEV)).sum().backward()
    h64, w64 = _d64(h), _d64(w)
    ref = _ce64(h64, w64, labels, temp)
    (ref * go.double()).sum().backward()
    _close(lp, ref, dtype, "logps")
    _close(h.grad, h64.grad, dtype, "dhidden")
    _close(w.grad, w64.grad, dtype, "dweight")
