"""Every 4-bit Triton kernel equals its PyTorch reference, run on the CPU under TRITON_INTERPRET=1.

The reference side is a float64 computation (dequantized weight from a formula written here, float64
matmul); kernels are compared at bfloat16/float32 tolerance. Shapes are small (the interpreter is slow)
and include sizes that are not multiples of the tile or quantization block sizes; data is fresh random
each call (no fixed seed beyond the autouse one, which differs per parametrisation via the shape).
"""

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from llmtune.kernels import nf4 as K  # noqa: E402
from llmtune.quant.nf4 import quantize_4bit  # noqa: E402


def _set_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture(autouse=True, scope="module")
def _force_triton():
    """Run the Triton kernels on CPU tensors under Triton's interpreter for this module, then restore the
    environment (conftest sets TRITON_INTERPRET=1 on machines without a GPU; on a GPU machine it is set here
    and the kernels re-defined for the interpreter, then re-defined again for the GPU afterwards)."""
    old = {k: os.environ.get(k) for k in ("LLMTUNE_FORCE_TRITON", "TRITON_INTERPRET")}
    os.environ["LLMTUNE_FORCE_TRITON"] = "1"
    os.environ["TRITON_INTERPRET"] = "1"
    from llmtune.kernels import _nf4_triton

    # Kernels defined while TRITON_INTERPRET was unset were compiled for a GPU: re-define them.
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_nf4_triton._dequant_kernel, InterpretedFunction):
        importlib.reload(_nf4_triton)
    yield
    for name, value in old.items():
        _set_env(name, value)
    if old["TRITON_INTERPRET"] != "1":
        importlib.reload(_nf4_triton)


def _weight(n, k, quant_type="nf4", double_quant=True):
    w = torch.randn(n, k) * torch.rand(n, 1)  # rows of different scales
    packed, st = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    absmax = st.get_absmax()
    # float64 dequantized weight, written here: code[nibble] * absmax[flat // 64], first value = high nibble
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[: n * k].long()
    w64 = (st.code.double()[codes] * absmax.double().repeat_interleave(64)[: n * k]).view(n, k)
    return packed, absmax, st.code, w64


def _close(got, want, dtype):
    got = got.double()
    scale = want.abs().max().item() + 1e-12
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert (got - want).abs().max().item() <= tol * scale, (got - want).abs().max().item() / scale


@pytest.mark.parametrize("n,k", [(8, 64), (7, 50), (33, 130)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel(n, k, out_dtype):
    packed, absmax, code, w64 = _weight(n, k)
    got = K.dequantize_4bit(packed, absmax, code, n * k, 64, out_dtype)
    ref = K.dequantize_4bit_ref(packed, absmax, code, n * k, 64, out_dtype)
    assert got.dtype == out_dtype and got.shape == (n * k,)
    if out_dtype == torch.float32:
        assert torch.equal(got, ref)  # the same float32 product
    else:  # one rounding to bf16 each (Triton's interpreter truncates, PyTorch rounds to nearest): 1 ulp
        assert torch.all((got.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7)
    _close(got.view(n, k), w64, out_dtype)


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (3, 70, 100), (16, 130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_m_kernel(m, n, k, dtype):
    packed, absmax, code, w64 = _weight(n, k, quant_type="nf4" if k % 2 == 0 else "fp4")
    x = torch.randn(m, k, dtype=dtype)
    got = K.matmul_4bit_small_m(x, packed, absmax, code, n, 64)
    assert got.shape == (m, n) and got.dtype == dtype
    want = x.double() @ w64.t()
    _close(got, want, dtype)
    _close(K.matmul_4bit_small_m_ref(x, packed, absmax, code, n, 64), want, dtype)


@pytest.mark.parametrize("m,n,k", [(64, 64, 64), (70, 50, 100), (17, 129, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_kernel(m, n, k, dtype):
    packed, absmax, code, w64 = _weight(n, k, double_quant=(k != 65))
    x = torch.randn(m, k, dtype=dtype)
    got = K.matmul_4bit_tiled(x, packed, absmax, code, n, 64)
    assert got.shape == (m, n) and got.dtype == dtype
    want = x.double() @ w64.t()
    _close(got, want, dtype)
    _close(K.matmul_4bit_ref(x, packed, absmax, code, n, 64), want, dtype)


@pytest.mark.parametrize("m,n,k", [(64, 64, 64), (70, 50, 100), (5, 129, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_input_kernel(m, n, k, dtype):
    packed, absmax, code, w64 = _weight(n, k)
    g = torch.randn(m, n, dtype=dtype)
    got = K.matmul_4bit_grad_input(g, packed, absmax, code, k, 64)
    assert got.shape == (m, k) and got.dtype == dtype
    want = g.double() @ w64
    _close(got, want, dtype)
    _close(K.matmul_4bit_grad_input_ref(g, packed, absmax, code, k, 64), want, dtype)


def test_dispatch_picks_kernel_by_m(monkeypatch):
    from llmtune.kernels import _nf4_triton

    ran = []
    for name in ("matmul_4bit_small_m_triton", "matmul_4bit_tiled_triton"):
        real = getattr(_nf4_triton, name)
        monkeypatch.setattr(_nf4_triton, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    packed, absmax, code, w64 = _weight(40, 64)
    for m, kernel in ((K.SMALL_M, "matmul_4bit_small_m_triton"), (K.SMALL_M + 1, "matmul_4bit_tiled_triton")):
        ran.clear()
        x = torch.randn(m, 64)
        _close(K.matmul_4bit(x, packed, absmax, code, 40, 64), x.double() @ w64.t(), torch.float32)
        assert ran == [kernel], (m, ran)


def test_linear4bit_through_kernels_forward_backward():
    from llmtune.quant import Linear4bit

    w = torch.randn(48, 80)
    layer = Linear4bit.from_float(w, bias=torch.randn(48), compute_dtype=torch.float32)
    w64 = layer.dequantize().double()
    x = torch.randn(2, 9, 80, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    _close(y.detach(), x.detach().double() @ w64.t() + layer.bias.double(), torch.float32)
    _close(x.grad, gy.double() @ w64, torch.float32)


def test_cpu_without_force_uses_reference(monkeypatch):
    monkeypatch.delenv("LLMTUNE_FORCE_TRITON")
    assert not K.use_triton(torch.zeros(1))


@pytest.mark.parametrize("m,n,k,blocksize", [(2, 40, 192, 64), (1, 33, 384, 128), (3, 17, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_m_kernel_row_blocks(m, n, k, blocksize, dtype):
    """The decode kernel's path for K % blocksize == 0 (one byte load per two columns, one scale per block):
    a K that leaves a partial last K tile (192, 384 over the interpreter's 128-wide tile) and other block
    sizes, against the float64 formula ``code[nibble] * absmax[flat // blocksize]`` written here."""
    w = torch.randn(n, k) * torch.rand(n, 1)
    packed, st = quantize_4bit(w, blocksize=blocksize, quant_type="nf4", double_quant=False)
    absmax = st.get_absmax()
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[: n * k].long()
    w64 = (st.code.double()[codes] * absmax.double().repeat_interleave(blocksize)[: n * k]).view(n, k)
    x = torch.randn(m, k, dtype=dtype)
    got = K.matmul_4bit_small_m(x, packed, absmax, st.code, n, blocksize)
    _close(got, x.double() @ w64.t(), dtype)
