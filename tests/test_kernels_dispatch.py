"""Dispatch of the training-step kernels: Triton on CUDA, the PyTorch reference on the CPU, the switch
(``set_enabled`` / ``LLMTUNE_KERNELS=0`` / config key ``use_kernels``), and the model and loss wiring.

"CUDA" is a CPU tensor whose ``is_cuda`` says True (the dispatch rule reads only that), with both sides
replaced by spies. The wiring tests run a tiny Qwen3-shaped model (q/k norm, GQA) and the chunked losses
with the kernels forced onto the CPU under Triton's interpreter, against the same model with kernels off
and against float64 formulas written here.
"""

import copy
import os

import pytest
from kernel_helpers import interpret_fused_kernels
import torch

pytest.importorskip("triton")

from llmtune.kernels import cross_entropy as CE  # noqa: E402
from llmtune.kernels import dispatch  # noqa: E402
from llmtune.kernels import rmsnorm as RN  # noqa: E402
from llmtune.kernels import rope as RP  # noqa: E402
from llmtune.kernels import swiglu as SG  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true") else "cpu"


class _FakeCuda(torch.Tensor):
    """A CPU tensor that claims to be on CUDA (enough for the dispatch rule)."""

    @property
    def is_cuda(self):  # noqa: D401
        return True


def _fake(*shape, requires_grad=False):
    return torch.randn(*shape).as_subclass(_FakeCuda).requires_grad_(requires_grad)


@pytest.fixture
def spies(monkeypatch):
    """Replace the Triton side and the reference side of every kernel by recorders."""
    monkeypatch.delenv("LLMTUNE_FORCE_TRITON", raising=False)
    monkeypatch.delenv("LLMTUNE_KERNELS", raising=False)
    dispatch.set_enabled(None)
    calls = []

    def spy(name, result):
        def f(*a, **k):
            calls.append(name)
            return result(*a)
        return f

    from llmtune.kernels import _fused_triton

    monkeypatch.setattr(RN._RMSNormFunction, "apply", spy("rms:triton", lambda x, *a: x))
    monkeypatch.setattr(RN, "rms_norm_ref", spy("rms:ref", lambda x, *a: x))
    monkeypatch.setattr(RP._RoPEFunction, "apply", spy("rope:triton", lambda q, k, *a: (q, k)))
    monkeypatch.setattr(RP, "apply_rope_ref", spy("rope:ref", lambda q, k, *a: (q, k)))
    monkeypatch.setattr(SG._SwiGLUFunction, "apply", spy("swiglu:triton", lambda g, u: g))
    monkeypatch.setattr(SG, "swiglu_ref", spy("swiglu:ref", lambda g, u: g))
    monkeypatch.setattr(_fused_triton, "cross_entropy_chunk_triton", spy("ce:triton", lambda z, *a: (z, z)))
    monkeypatch.setattr(CE, "cross_entropy_chunk_ref", spy("ce:ref", lambda z, *a: (z, z)))
    yield calls
    dispatch.set_enabled(None)


def _call_all(make):
    RN.rms_norm(make(3, 8), torch.ones(8))
    RP.apply_rope(make(1, 2, 3, 4, requires_grad=True), make(1, 1, 3, 4), torch.ones(1, 3, 4), torch.zeros(1, 3, 4))
    SG.swiglu(make(2, 5), make(2, 5))
    CE.cross_entropy_chunk(make(2, 7), torch.tensor([1, 2]))


def test_dispatch_picks_triton_on_cuda_and_reference_on_cpu(spies):
    _call_all(_fake)
    assert spies == ["rms:triton", "rope:triton", "swiglu:triton", "ce:triton"]
    spies.clear()
    _call_all(lambda *s, requires_grad=False: torch.randn(*s).requires_grad_(requires_grad))
    assert spies == ["rms:ref", "rope:ref", "swiglu:ref", "ce:ref"]


def test_switch_turns_kernels_off(spies, monkeypatch):
    dispatch.set_enabled(False)
    _call_all(_fake)
    assert spies == ["rms:ref", "rope:ref", "swiglu:ref", "ce:ref"]
    spies.clear()
    dispatch.set_enabled(None)
    monkeypatch.setenv("LLMTUNE_KERNELS", "0")
    assert not dispatch.is_enabled()
    _call_all(_fake)
    assert spies == ["rms:ref", "rope:ref", "swiglu:ref", "ce:ref"]
    spies.clear()
    monkeypatch.setenv("LLMTUNE_KERNELS", "1")
    monkeypatch.setattr(dispatch, "_TRITON_AVAILABLE", False)  # triton not installed
    _call_all(_fake)
    assert spies == ["rms:ref", "rope:ref", "swiglu:ref", "ce:ref"]


def test_nf4_follows_the_switch(monkeypatch):
    from llmtune.kernels import nf4

    monkeypatch.delenv("LLMTUNE_KERNELS", raising=False)
    x = _fake(2, 4)
    dispatch.set_enabled(False)
    try:
        assert not nf4.use_triton(x)
        dispatch.set_enabled(True)
        assert nf4.use_triton(x)
    finally:
        dispatch.set_enabled(None)


def test_config_key_use_kernels():
    from llmtune.config import parse_config

    base = ["--model_name_or_path", "m", "--output_dir", "o", "--dataset", "d"]
    assert parse_config(base).use_kernels is True
    assert parse_config(base + ["--use_kernels", "false"]).use_kernels is False


# ----------------------------------------------------------------------------------------------------
# The model and the losses use the kernels (forced onto the CPU under the interpreter)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("LLMTUNE_FORCE_TRITON", "1")
    monkeypatch.delenv("LLMTUNE_KERNELS", raising=False)
    dispatch.set_enabled(None)
    interpret_fused_kernels(DEV)
    counts = {}
    for mod, cls in [(RN, "_RMSNormFunction"), (RP, "_RoPEFunction"), (SG, "_SwiGLUFunction"),
                     (CE, "_FusedLinearCE"), (CE, "_FusedLinearLogps")]:
        fn = getattr(mod, cls)
        real = fn.apply

        def counted(*a, _real=real, _name=cls):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a)
        monkeypatch.setattr(fn, "apply", counted)
    yield counts
    dispatch.set_enabled(None)


def _tiny_qwen3():
    from llmtune.models import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, qk_norm=True,
                      tie_word_embeddings=False)
    model = Transformer(cfg).float()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(DEV)


def test_model_uses_kernels_and_matches_reference(forced):
    from llmtune.losses import causal_lm_loss

    model = _tiny_qwen3()
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 67, (2, 9), device=DEV)
    labels = ids.clone()
    labels[0, :3] = -100
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    labels[1, 7:] = -100

    hidden = model(ids, attention_mask=mask)
    loss, n = causal_lm_loss(hidden, model.lm_head.weight, labels)
    loss.backward()
    assert forced == {"_RMSNormFunction": 2 * 2 + 2 * 2 + 1, "_RoPEFunction": 2, "_SwiGLUFunction": 2,
                      "_FusedLinearCE": 1}

    dispatch.set_enabled(False)
    h_ref = ref_model(ids, attention_mask=mask)
    loss_ref, n_ref = causal_lm_loss(h_ref, ref_model.lm_head.weight, labels)
    loss_ref.backward()
    assert int(n) == int(n_ref)
    torch.testing.assert_close(hidden, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_logps_use_fused_kernel_and_match_float64(forced):
    from llmtune.losses import sequence_logps, token_logps

    b, t, hdim, v = 2, 6, 16, 40
    hidden = torch.randn(b, t, hdim, device=DEV, requires_grad=True)
    w = (torch.randn(v, hdim, device=DEV) * 0.5).requires_grad_()
    labels = torch.randint(0, v, (b, t), device=DEV)
    labels[0, :2] = -100
    tok = token_logps(hidden, w, labels, temperature=0.9)
    seq = sequence_logps(hidden, w, labels, average=True)
    (tok.sum() + 2 * seq.sum()).backward()
    assert forced.get("_FusedLinearLogps") == 2

    h64, w64 = hidden.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    lab = labels.cpu()
    lp = torch.log_softmax(h64[:, :-1] @ w64.t() / 0.9, -1)
    lp1 = torch.log_softmax(h64[:, :-1] @ w64.t(), -1)
    valid = lab[:, 1:] != -100
    g = lp.gather(2, lab[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * valid
    g1 = lp1.gather(2, lab[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * valid
    tok64 = torch.cat([torch.zeros(b, 1, dtype=torch.float64), g], 1)
    seq64 = g1.sum(1) / valid.sum(1)
    (tok64.sum() + 2 * seq64.sum()).backward()
    torch.testing.assert_close(tok.detach().double().cpu(), tok64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq.detach().double().cpu(), seq64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double().cpu(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEV != "cpu", reason="checks the CPU path")
def test_cpu_model_never_launches_triton(monkeypatch):
    """Without LLMTUNE_FORCE_TRITON, CPU tensors take today's PyTorch code: no Triton launcher is called."""
    from llmtune.kernels import _fused_triton
    from llmtune.losses import causal_lm_loss

    monkeypatch.delenv("LLMTUNE_FORCE_TRITON", raising=False)
    dispatch.set_enabled(True)

    def boom(*a, **k):
        raise AssertionError("a Triton kernel was launched for CPU tensors")

    for name in ["rms_norm_fwd_triton", "rope_triton", "swiglu_fwd_triton", "cross_entropy_chunk_triton"]:
        monkeypatch.setattr(_fused_triton, name, boom)
    try:
        model = _tiny_qwen3()
        ids = torch.randint(0, 67, (1, 5))
        loss, _ = causal_lm_loss(model(ids), model.lm_head.weight, ids)
        loss.backward()
    finally:
        dispatch.set_enabled(None)


def test_kernels_with_gradient_checkpointing_and_lora(forced):
    """Recomputed layers (non-reentrant checkpointing) and LoRA (frozen norms, q/k without grad in some layers)."""
    from llmtune.losses import causal_lm_loss
    from llmtune.peft import apply_lora

    model = _tiny_qwen3()
    apply_lora(model, lora_rank=4, lora_alpha=8, lora_target="q_proj,v_proj,up_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init would hide errors in the LoRA branch
    ref_model = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 67, (2, 7), device=DEV)
    loss, _ = causal_lm_loss(model(ids), model.lm_head.weight, ids)
    loss.backward()
    assert forced["_RoPEFunction"] >= 2 and forced["_RMSNormFunction"] >= 9
    dispatch.set_enabled(False)
    loss_ref, _ = causal_lm_loss(ref_model(ids), ref_model.lm_head.weight, ids)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    grads = dict(ref_model.named_parameters())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    for name in trained:
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grads[name].grad, rtol=1e-4, atol=1e-5)


def test_generation_with_kernels_matches_reference(forced):
    """Greedy generation with the KV cache: RoPE rotates in place (no grad), RMSNorm/SwiGLU under inference_mode."""
    from llmtune.generation import generate

    model = _tiny_qwen3().eval()
    prompt = torch.randint(1, 67, (2, 4), device=DEV)
    mask = torch.ones_like(prompt)
    mask[1, 0] = 0  # left padding
    out = generate(model, prompt, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert forced.get("_RoPEFunction", 0) == 0  # no grad needed: the in-place path, not the autograd function
    dispatch.set_enabled(False)
    ref = generate(model, prompt, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
