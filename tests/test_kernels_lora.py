"""LoRA fused into the frozen layer's matmul (``llmtune.kernels.lora``) against a float64 reference written
here, forward and backward, and its use by ``LoraLinear``.

The reference is the formula of Hu et al. 2021, eq. 3: ``y = x W^T + b + s (x A^T) B^T``, computed in
float64 from the same (dtype-rounded) inputs and differentiated by autograd. Without a GPU the kernel runs
on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 from the conftest, LLMTUNE_FORCE_TRITON=1
here); with a GPU and TRITON_INTERPRET=0 (``benchmarks/gpu_check.py``) the same tests run compiled on CUDA.
Shapes are small and not multiples of the interpreter's 32-wide tiles; ranks 1, 8, 16 and 70 (70 > the
64-wide rank block: two rank chunks).
"""

import copy
import os

import pytest
from kernel_helpers import assert_close_scaled, interpret_fused_kernels
import torch
from torch import nn

pytest.importorskip("triton")

from llmtune.kernels import dispatch  # noqa: E402
from llmtune.kernels import lora as L  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true") else "cpu"
# bf16 results are compared at a few bf16 ulps of the largest magnitude; fp32 at float32 accumulation error.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# Compiled on a GPU (the prepared GPU check), each new argument specialisation (rank 1, a multiple of 16,
# other) is a compile of a second or more inside the check's time budget: there the ranks are cut to two.
RANKS = [1, 8, 16, 70] if DEV == "cpu" else [16, 70]
RANKS_4BIT = [1, 16, 70] if DEV == "cpu" else [16]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("LLMTUNE_FORCE_TRITON", "1")
    monkeypatch.setenv("LLMTUNE_FUSED_LORA", "1")   # dense bases too (off by default: see test_fused_bases)
    monkeypatch.delenv("LLMTUNE_KERNELS", raising=False)
    dispatch.set_enabled(None)
    interpret_fused_kernels(DEV)
    yield
    dispatch.set_enabled(None)


@pytest.fixture
def count_kernel(monkeypatch):
    """Counts calls of the fused autograd function (the Triton path)."""
    calls = []
    real = L._LoraLinearFunction.apply

    def counted(*a):
        calls.append(tuple(a[0].shape))
        return real(*a)
    monkeypatch.setattr(L._LoraLinearFunction, "apply", counted)
    return calls


def _close(got, want, dtype, what=""):
    assert_close_scaled(got, want, TOL[dtype], what)


def _leaf(t, dtype, grad=True):
    return t.to(device=DEV, dtype=dtype).detach().requires_grad_(grad)


def _d64(t, grad=True):
    return t.detach().double().cpu().requires_grad_(grad)


def _lora64(x, w, b, a, bb, s):
    """Hu et al. 2021, eq. 3 in float64: x W^T + b + s (x A^T) B^T."""
    y = x @ w.t() + s * ((x @ a.t()) @ bb.t())
    return y if b is None else y + b


@pytest.mark.parametrize("lead,n_in,n_out", [((2, 19), 37, 45), ((33,), 70, 29)])  # 3-D and 2-D x
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_linear_forward_backward(lead, n_in, n_out, r, dtype, with_bias, count_kernel):
    s = 2.0 / r ** 0.5
    x = _leaf(torch.randn(*lead, n_in), dtype)
    w = _leaf(torch.randn(n_out, n_in) / n_in ** 0.5, dtype, grad=False)  # frozen
    b = _leaf(torch.randn(n_out) * 0.1, dtype, grad=False) if with_bias else None
    a = _leaf(torch.randn(r, n_in) / n_in ** 0.5, dtype)
    bb = _leaf(torch.randn(n_out, r) / r ** 0.5, dtype)
    y = L.lora_linear(x, w, b, a, bb, s)
    assert count_kernel, "the Triton path did not run"
    assert y.shape == (*lead, n_out) and y.dtype == dtype
    dy = torch.randn(*lead, n_out).to(dtype)
    y.backward(dy.to(DEV))
    x64, a64, bb64 = _d64(x), _d64(a), _d64(bb)
    y64 = _lora64(x64, _d64(w, False), None if b is None else _d64(b, False), a64, bb64, s)
    y64.backward(dy.double())
    _close(y, y64, dtype, "y")
    _close(x.grad, x64.grad, dtype, "dx")
    _close(a.grad, a64.grad, dtype, "dA")
    _close(bb.grad, bb64.grad, dtype, "dB")
    assert w.grad is None


def test_trainable_bias_and_no_input_grad(count_kernel):
    """A trainable bias gets sum_rows(g); an input without grad (first layer on frozen embeddings) is fine."""
    x = _leaf(torch.randn(5, 3, 24), torch.float32, grad=False)
    w = _leaf(torch.randn(17, 24) * 0.2, torch.float32, grad=False)
    b = _leaf(torch.randn(17), torch.float32)
    a, bb = _leaf(torch.randn(4, 24) * 0.2, torch.float32), _leaf(torch.randn(17, 4) * 0.2, torch.float32)
    y = L.lora_linear(x, w, b, a, bb, 0.5)
    (y * y).sum().backward()
    assert count_kernel
    b64, a64, bb64 = _d64(b), _d64(a), _d64(bb)
    y64 = _lora64(_d64(x, False), _d64(w, False), b64, a64, bb64, 0.5)
    (y64 * y64).sum().backward()
    _close(b.grad, b64.grad, torch.float32, "dbias")
    _close(a.grad, a64.grad, torch.float32, "dA")
    _close(bb.grad, bb64.grad, torch.float32, "dB")


def test_falls_back_to_reference(count_kernel):
    """A weight that needs a gradient takes the reference (same result); shapes that do not chain raise."""
    x = torch.randn(4, 8, device=DEV)
    a, bb = torch.randn(2, 8, device=DEV), torch.randn(6, 2, device=DEV)
    w = torch.randn(6, 8, device=DEV, requires_grad=True)
    y = L.lora_linear(x, w, None, a, bb, 1.5)
    y.sum().backward()
    assert not count_kernel and w.grad is not None
    with pytest.raises(ValueError, match="shapes do not chain"):
        L.lora_linear(x, w.detach(), None, a, bb.t(), 1.5)
    _close(y, _lora64(x.double(), w.double(), None, a.double(), bb.double(), 1.5), torch.float32, "y")


# ----------------------------------------------------------------------------------------------------
# LoraLinear uses the kernel exactly when it should, and matches its own unfused path
# ----------------------------------------------------------------------------------------------------

def _layer(bias=True, dtype=torch.float32, dropout=0.0, use_dora=False, n_in=40, n_out=27, r=8):
    from llmtune.peft.layers import LoraLinear

    base = nn.Linear(n_in, n_out, bias=bias).to(DEV, dtype)
    base.requires_grad_(False)
    layer = LoraLinear(base)
    layer.update_layer("default", r=r, lora_alpha=16, lora_dropout=dropout, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)  # B = 0 at init would hide errors in the LoRA branch
    return layer


def _run(layer, x, autocast=None):
    x = x.detach().clone().requires_grad_()
    ctx = torch.autocast(DEV, dtype=autocast) if autocast is not None else torch.autocast(DEV, enabled=False)
    with ctx:
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1], device=DEV)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_lora_linear_layer_matches_kernels_off(bias, autocast, count_kernel):
    layer = _layer(bias=bias)
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 11, 40, device=DEV)
    y, dx, grads = _run(layer, x, autocast)
    assert count_kernel == [(3, 11, 40)]
    dispatch.set_enabled(False)
    y_ref, dx_ref, grads_ref = _run(ref, x, autocast)
    assert len(count_kernel) == 1
    dtype = autocast or torch.float32
    assert y.dtype == y_ref.dtype == dtype
    _close(y, y_ref, dtype, "y")
    _close(dx, dx_ref, dtype, "dx")
    assert grads.keys() == grads_ref.keys() == {"lora_A.default.weight", "lora_B.default.weight"}
    for name in grads:
        _close(grads[name], grads_ref[name], dtype, name)


def test_lora_linear_layer_matches_float64():
    """The layer on the Triton path against the formula (independent of the unfused path)."""
    layer = _layer(bias=True)
    x = torch.randn(2, 9, 40, device=DEV)
    y, dx, grads = _run(layer, x)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a64 = _d64(layer.lora_A["default"].weight)
    bb64 = _d64(layer.lora_B["default"].weight)
    x64 = _d64(x)
    y64 = _lora64(x64, _d64(w, False), _d64(b, False), a64, bb64, layer.scaling["default"])
    (y64 * torch.linspace(-1, 1, y64.shape[-1], dtype=torch.float64)).sum().backward()
    _close(y, y64, torch.float32, "y")
    _close(dx, x64.grad, torch.float32, "dx")
    _close(grads["lora_A.default.weight"], a64.grad, torch.float32, "dA")
    _close(grads["lora_B.default.weight"], bb64.grad, torch.float32, "dB")


class _FakeCuda(torch.Tensor):
    """A CPU tensor that claims to be on CUDA (enough for the dispatch rule)."""

    @property
    def is_cuda(self):  # noqa: D401
        return True


def _fake_x(rows=20, n_in=40):
    return torch.randn(rows, n_in).as_subclass(_FakeCuda)


@pytest.fixture
def spy(monkeypatch):
    """Replace both fused autograd functions (dense and 4-bit base) by recorders returning zeros."""
    monkeypatch.delenv("LLMTUNE_FORCE_TRITON", raising=False)
    calls = []

    def fake(x, w, b, a, bb, s):
        calls.append(s)
        return torch.zeros(*x.shape[:-1], w.shape[0])

    def fake4(x, packed, absmax, code, n_out, blocksize, b, a, bb, s):
        calls.append(("4bit", s))
        return torch.zeros(*x.shape[:-1], n_out, dtype=x.dtype)
    monkeypatch.setattr(L._LoraLinearFunction, "apply", fake)
    monkeypatch.setattr(L._LoraLinear4bitFunction, "apply", fake4)
    return calls


def test_dispatch_calls_the_kernel_on_cuda_only(spy):
    layer = _layer().cpu()
    layer(_fake_x())
    assert spy == [layer.scaling["default"]]
    layer(torch.randn(20, 40))  # a CPU tensor without LLMTUNE_FORCE_TRITON: today's code
    layer(_fake_x(rows=16))  # 16 rows or fewer (decode): the unfused path
    dispatch.set_enabled(False)
    layer(_fake_x())  # the switch turns it off
    dispatch.set_enabled(None)
    assert len(spy) == 1


def test_dispatch_conditions(spy):
    cases = {}
    lay = _layer().cpu()
    lay.adapters_disabled = True
    cases["disabled"] = lay
    lay = _layer().cpu()
    lay.merge()
    cases["merged"] = lay
    cases["dora"] = _layer(use_dora=True).cpu()
    lay = _layer().cpu()
    lay.update_layer("second", r=4, lora_alpha=8)
    lay.active_adapters = ["default", "second"]
    cases["two active adapters"] = lay
    lay = _layer(dropout=0.1).cpu()
    lay.train()
    cases["dropout in training"] = lay
    lay = _layer().cpu()
    lay.base_layer.weight.requires_grad_(True)
    cases["trainable base weight"] = lay
    lay = _layer().cpu()
    lay.lora_A["default"].double()
    lay.lora_B["default"].double()
    cases["adapter dtype differs (no autocast)"] = lay
    for name, layer in cases.items():
        layer(_fake_x())
        assert spy == [], name
    lay = _layer(dropout=0.1).cpu()
    lay.eval()  # dropout inactive in eval: fused
    lay(_fake_x())
    lay = _layer().cpu()
    lay.update_layer("second", r=4, lora_alpha=8)
    lay.active_adapters = ["second"]  # one active of two: fused with that one
    lay(_fake_x())
    assert spy == [16 / 8, 8 / 4]  # the active adapter's scaling


@pytest.mark.parametrize("quant", [False, True])
def test_model_with_lora_uses_fused_kernel_and_matches_kernels_off(quant, monkeypatch):
    """A tiny Llama-shaped model with LoRA on every decoder linear (QLoRA: the linears in NF4), gradient
    checkpointing on, 2 x 12 tokens: every LoRA layer takes the fused kernel (also when recomputed), and
    the loss and the adapter gradients equal those with the kernels off (the unfused LoRA layers)."""
    from llmtune.losses import causal_lm_loss
    from llmtune.models import ModelConfig, Transformer
    from llmtune.peft import apply_lora

    fn = L._LoraLinear4bitFunction if quant else L._LoraLinearFunction
    calls = []
    real = fn.apply
    monkeypatch.setattr(fn, "apply", lambda *a: (calls.append(1), real(*a))[1])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = Transformer(cfg).float()
    if quant:
        from llmtune.quant import Linear4bit

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, mod in list(parent.named_children()):
                    if isinstance(mod, nn.Linear):
                        setattr(parent, name, Linear4bit.from_float(mod.weight.data, None,
                                                                     compute_dtype=torch.float32))
    model = model.to(DEV)
    apply_lora(model, lora_rank=4, lora_alpha=8, lora_target="all")
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.1)  # B = 0 at init would hide errors in the LoRA branch
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 61, (2, 12), device=DEV)
    loss, _ = causal_lm_loss(model(ids), model.lm_head.weight, ids)
    loss.backward()
    assert len(calls) == 2 * 7 * 2  # 2 layers x 7 linears, forward and the recomputation
    dispatch.set_enabled(False)
    loss_ref, _ = causal_lm_loss(ref(ids), ref.lm_head.weight, ids)
    loss_ref.backward()
    assert len(calls) == 28
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    grads = dict(ref.named_parameters())
    trained = [(n, prm) for n, prm in model.named_parameters() if prm.requires_grad]
    assert len(trained) == 2 * 7 * 2
    for name, prm in trained:
        torch.testing.assert_close(prm.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------
# QLoRA: 4-bit base weight
# ----------------------------------------------------------------------------------------------------

def _q4(n_out, n_in, dtype=torch.float32):
    """A Linear4bit layer (NF4, double quantization) and its dequantized weight in float64, written here:
    ``code[nibble] * absmax[flat // 64]``, first value of a byte in the high nibble (bitsandbytes' layout)."""
    from llmtune.quant import Linear4bit

    q = Linear4bit.from_float(torch.randn(n_out, n_in) * torch.rand(n_out, 1), None, compute_dtype=dtype)
    packed, absmax, code = q.weight, q.absmax_float(), q.quant_map
    nib = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[: n_out * n_in].long()
    w64 = (code.double()[nib] * absmax.double().repeat_interleave(64)[: n_out * n_in]).view(n_out, n_in)
    return q.to(DEV), w64


@pytest.mark.parametrize("lead,n_in,n_out", [((2, 19), 70, 45), ((33,), 100, 29)])  # 100: blocks straddle rows
@pytest.mark.parametrize("r", RANKS_4BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_4bit_forward_backward(lead, n_in, n_out, r, dtype):
    calls = []
    real = L._LoraLinear4bitFunction.apply
    q, w64 = _q4(n_out, n_in)
    s = 16 / r
    x = _leaf(torch.randn(*lead, n_in), dtype)
    b = _leaf(torch.randn(n_out) * 0.1, dtype) if r != 16 else None  # trainable bias, or none
    a = _leaf(torch.randn(r, n_in) / n_in ** 0.5, dtype)
    bb = _leaf(torch.randn(n_out, r) / r ** 0.5, dtype)
    L._LoraLinear4bitFunction.apply = lambda *args: (calls.append(1), real(*args))[1]
    try:
        y = L.lora_linear_4bit(x, q.weight, q.absmax_float(), q.quant_map, n_out, 64, b, a, bb, s)
    finally:
        L._LoraLinear4bitFunction.apply = real
    assert calls and y.shape == (*lead, n_out) and y.dtype == dtype
    dy = torch.randn(*lead, n_out).to(dtype)
    y.backward(dy.to(DEV))
    x64, a64, bb64 = _d64(x), _d64(a), _d64(bb)
    b64 = None if b is None else _d64(b)
    w64 = w64.to(dtype).double()  # the kernel dequantizes to the compute dtype
    y64 = _lora64(x64, w64, b64, a64, bb64, s)
    y64.backward(dy.double())
    _close(y, y64, dtype, "y")
    _close(x.grad, x64.grad, dtype, "dx")
    _close(a.grad, a64.grad, dtype, "dA")
    _close(bb.grad, bb64.grad, dtype, "dB")
    if b is not None:
        _close(b.grad, b64.grad, dtype, "dbias")


def _qlayer(dtype=torch.float32, adapter_dtype=torch.float32):
    from llmtune.peft.layers import LoraLinear

    q, _ = _q4(27, 72, dtype)
    layer = LoraLinear(q)
    layer.update_layer("default", r=8, lora_alpha=16, dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)
    return layer


@pytest.mark.parametrize("compute,autocast", [(torch.float32, None), (torch.bfloat16, torch.bfloat16)])
def test_qlora_layer_matches_kernels_off(compute, autocast, monkeypatch):
    calls = []
    real = L._LoraLinear4bitFunction.apply
    monkeypatch.setattr(L._LoraLinear4bitFunction, "apply", lambda *a: (calls.append(1), real(*a))[1])
    layer = _qlayer(compute)  # float32 adapters on a bf16 base under autocast: QLoRA as trained
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 7, 72, device=DEV)
    y, dx, grads = _run(layer, x, autocast)
    assert calls == [1]
    dispatch.set_enabled(False)
    y_ref, dx_ref, grads_ref = _run(ref, x, autocast)
    assert calls == [1] and y.dtype == y_ref.dtype == torch.float32  # Linear4bit returns x's dtype
    _close(y, y_ref, compute, "y")
    _close(dx, dx_ref, compute, "dx")
    assert grads.keys() == grads_ref.keys() == {"lora_A.default.weight", "lora_B.default.weight"}
    for name in grads:
        _close(grads[name], grads_ref[name], compute, name)


def test_dispatch_quantized_base(spy):
    layer = _qlayer().cpu()
    layer(_fake_x(n_in=72))
    assert spy == [("4bit", 2.0)]
    layer = _qlayer(torch.bfloat16).cpu()  # float32 adapters, bf16 compute, no autocast: unfused
    assert L.fused_lora_forward(layer, _fake_x(n_in=72)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(_fake_x(n_in=72))  # under autocast to the compute dtype: fused
    assert spy == [("4bit", 2.0), ("4bit", 2.0)]


# The kernels' compilation for Hopper (sm_90) and Ampere (sm_80), every variant and config, registers,
# spills and shared memory: tests/test_kernels_compile.py (it replaces the sm_90 fixed-config check here).


def test_autotune_quick_bench_format(monkeypatch):
    """The autotuner's timing function returns what ``triton.testing.do_bench`` returns (a list of the asked
    quantiles, else the median) and allocates nothing; CUDA events are faked here (no GPU needed)."""
    from llmtune.kernels import _autotune as A

    clock = iter(range(1000))

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = next(clock)

        def elapsed_time(self, other):
            return float(other.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []
    got = A.quick_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8), reps=5)
    assert len(calls) == 6 and got == [1.0, 1.0, 1.0]  # each call spans one tick between its two events
    assert A.quick_bench(lambda: None, reps=3) == 1.0


def test_no_fused_path_inside_torch_compile(spy, monkeypatch):
    """Under torch.compile (``torch_compile: true``) the LoRA layer keeps its unfused code."""
    layer = _layer().cpu()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert L.fused_lora_forward(layer, _fake_x()) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    layer(_fake_x())
    assert spy == [2.0]


def test_fused_bases_default_is_4bit_only(spy, monkeypatch):
    """Unset LLMTUNE_FUSED_LORA: a dense nn.Linear base keeps cuBLAS + the separate adapter (the fused dense
    kernel must first beat it on a GPU); 0 turns the 4-bit fusion off too; 1 fuses both."""
    monkeypatch.delenv("LLMTUNE_FUSED_LORA")
    assert L.fused_bases() == ("4bit",)
    _layer().cpu()(_fake_x())
    assert spy == []
    monkeypatch.setenv("LLMTUNE_FUSED_LORA", "0")
    assert L.fused_bases() == ()
    monkeypatch.setenv("LLMTUNE_FUSED_LORA", "1")
    assert L.fused_bases() == ("4bit", "dense")
    _layer().cpu()(_fake_x())
    assert len(spy) == 1
