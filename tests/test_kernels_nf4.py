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

    monkeypatch.setenv("LLMTUNE_NF4_PATH", "tiled")  # above SMALL_M: the tiled kernel when the table says so

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


# ----------------------------------------------------------------------------------------------------
# The decode kernel (kernels/_nf4_decode.py): M = 1..16, split-K, int32 loads, double quantization inside
# ----------------------------------------------------------------------------------------------------

def _nested_weight(n, k, double_quant):
    """(packed, stored absmax, Nested or None, code, float64 W): W written here from the format's formula,
    with the scales de-nested by bitsandbytes' rule ``nested_code[q] * nested_absmax[i // 256] + offset``."""
    w = torch.randn(n, k) * torch.rand(n, 1)
    packed, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=double_quant)
    if double_quant:
        q = st.absmax.long()
        scales = (st.nested_code.double()[q] * st.nested_absmax.double().repeat_interleave(256)[: q.numel()]
                  + float(st.offset))
        nested = K.Nested(st.nested_absmax, st.nested_code, st.offset, st.nested_blocksize)
    else:
        scales, nested = st.absmax.double(), None
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[: n * k].long()
    w64 = (st.code.double()[codes] * scales.repeat_interleave(64)[: n * k]).view(n, k)
    return packed, st.absmax, nested, st.code, w64


@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n,k,dtype,double_quant", [(33, 320, torch.bfloat16, True), (70, 704, torch.float32, False),
                                                    (45, 576, torch.float32, True)])
def test_decode_kernel(m, n, k, dtype, double_quant):
    """Odd N (partial row tile), K a multiple of the block size but not of the 256-wide K tile (partial
    tiles), split-K (a few row tiles on a 132-SM grid), with and without double quantization."""
    from llmtune.kernels import _nf4_decode as D

    packed, absmax, nested, code, w64 = _nested_weight(n, k, double_quant)
    assert D.supports(k, 64, packed) and D.split_k(n, k, 132)[0] > 1
    x = torch.randn(m, k, dtype=dtype)
    got = K.matmul_4bit_small_m(x, packed, absmax, code, n, 64, nested=nested)
    assert got.shape == (m, n) and got.dtype == dtype
    _close(got, x.double() @ w64.t(), dtype)


def test_decode_split_rule():
    """About 4 programs per SM (528 on 132 SMs), in K slices of whole 128-column tiles, hand-computed:
    8B k/v projection (N 1024, K 4096): 32 row tiles, 17 slices wanted, K has 32 tiles: 2 per slice, so
    16 slices of 256; 8B q projection (4096 x 4096): 128 row tiles, 5 slices wanted: ceil(32 / 5) = 7
    tiles per slice, so 5 slices of 896; up projection (14336 x 4096): 448 row tiles, 2 slices."""
    from llmtune.kernels import _nf4_decode as D

    split, per = D.split_k(1024, 4096, 132)
    assert (split, per) == (16, 256)
    assert D.split_k(4096, 4096, 132) == (5, 896)
    assert D.split_k(14336, 4096, 132) == (2, 2048)
    assert D.row_block(1) == 1 and D.row_block(3) == 4 and D.row_block(5) == 16 and D.row_block(16) == 16


def test_decode_falls_back_to_tiled_for_straddling_blocks(monkeypatch):
    """K % 8 != 0 (blocks straddle rows): the tiled kernel computes the decode product."""
    from llmtune.kernels import _nf4_triton

    ran = []
    real = _nf4_triton.matmul_4bit_tiled_triton
    monkeypatch.setattr(_nf4_triton, "matmul_4bit_tiled_triton", lambda *a, **k: ran.append(1) or real(*a, **k))
    packed, absmax, nested, code, w64 = _nested_weight(9, 100, True)
    x = torch.randn(2, 100)
    _close(K.matmul_4bit_small_m(x, packed, absmax, code, 9, 64, nested=nested), x.double() @ w64.t(), torch.float32)
    assert ran == [1]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel_nested(out_dtype):
    packed, absmax, nested, code, w64 = _nested_weight(7, 192, True)
    got = K.dequantize_4bit(packed, absmax, code, 7 * 192, 64, out_dtype, nested=nested)
    _close(got.view(7, 192), w64, out_dtype)


def test_expand_absmax_matches_quant_state():
    """``expand_absmax`` equals ``QuantState.get_absmax`` (bitsandbytes' de-nesting, ``llmtune.quant.nf4``)."""
    w = torch.randn(40, 640)
    _, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    got = K.expand_absmax(st.absmax, K.Nested(st.nested_absmax, st.nested_code, st.offset, st.nested_blocksize))
    assert torch.allclose(got, st.get_absmax(), rtol=1e-6, atol=0)


def test_linear4bit_forward_keeps_scales_nested(monkeypatch):
    """Decode through ``Linear4bit``: the uint8 scales go to the kernel as stored (``get_absmax``, the
    float32 expansion, is never called) and the result equals the float64 formula."""
    from llmtune.quant import Linear4bit
    from llmtune.quant.nf4 import QuantState

    layer = Linear4bit.from_float(torch.randn(24, 128), compute_dtype=torch.float32)
    w64 = layer.dequantize().double()
    monkeypatch.setattr(QuantState, "get_absmax", lambda self: (_ for _ in ()).throw(AssertionError("expanded")))
    x = torch.randn(3, 128)
    _close(layer(x), x.double() @ w64.t(), torch.float32)


# ----------------------------------------------------------------------------------------------------
# Training shapes: tiled kernel or dequantize + matmul, from the measured table
# ----------------------------------------------------------------------------------------------------

def test_training_path_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMTUNE_NF4_PATH", raising=False)
    shipped = K.load_path_table()
    assert shipped["measured"] is False and shipped["default"] == "dequant" and shipped["entries"] == []
    assert K.training_path(4096, 4096, 4096) == "dequant"
    entries = [{"op": "forward", "m": 2048, "n": 4096, "k": 4096, "tiled_ms": 1.0, "dequant_ms": 2.0},
               {"op": "forward", "m": 8192, "n": 4096, "k": 4096, "tiled_ms": 3.0, "dequant_ms": 2.5},
               {"op": "grad_input", "m": 2048, "n": 4096, "k": 4096, "tiled_ms": 2.0, "dequant_ms": 1.0}]
    path = K.write_path_table(entries, "test GPU", tmp_path / "paths.json")
    table = K.load_path_table(path)
    assert table["measured"] and [e["path"] for e in table["entries"]] == ["tiled", "dequant", "dequant"]
    assert K.training_path(2048, 4096, 4096, "forward", table) == "tiled"
    assert K.training_path(1500, 4096, 4096, "forward", table) == "tiled"  # bucket 2048
    assert K.training_path(3000, 4096, 4096, "forward", table) == "tiled"  # bucket 4096: 2048 and 8192 tie, first
    assert K.training_path(6000, 4096, 4096, "forward", table) == "dequant"  # bucket 8192
    assert K.training_path(2048, 4096, 4096, "grad_input", table) == "dequant"
    assert K.training_path(2048, 1024, 4096, "forward", table) == "dequant"  # unmeasured shape: the default
    monkeypatch.setenv("LLMTUNE_NF4_PATH", "tiled")
    assert K.training_path(2048, 4096, 4096, "grad_input", table) == "tiled"
    bad = tmp_path / "bad.json"
    bad.write_text('{"default": "fast", "entries": []}')
    with pytest.raises(ValueError, match="bad.json"):
        K.load_path_table(bad)
    with pytest.raises(ValueError, match="tiled_ms"):
        K.write_path_table([{"op": "forward", "m": 1, "n": 1, "k": 1}], "x", tmp_path / "t.json")


@pytest.mark.parametrize("path", ["tiled", "dequant"])
def test_matmul_4bit_follows_training_path(monkeypatch, path):
    """M > 16: ``matmul_4bit`` and ``matmul_4bit_grad_input`` run the path ``training_path`` names, and
    both paths give the float64 product."""
    from llmtune.kernels import _nf4_triton

    ran = []
    for name in ("matmul_4bit_tiled_triton", "matmul_4bit_grad_input_triton", "dequantize_4bit_triton"):
        real = getattr(_nf4_triton, name)
        monkeypatch.setattr(_nf4_triton, name,
                            lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    monkeypatch.setattr(K, "training_path", lambda m, n, k, op="forward", table=None: path)
    packed, absmax, nested, code, w64 = _nested_weight(40, 128, True)
    x = torch.randn(20, 128)
    _close(K.matmul_4bit(x, packed, absmax, code, 40, 64, nested=nested), x.double() @ w64.t(), torch.float32)
    g = torch.randn(20, 40)
    _close(K.matmul_4bit_grad_input(g, packed, absmax, code, 128, 64, nested=nested), g.double() @ w64,
           torch.float32)
    want = (["matmul_4bit_tiled_triton", "matmul_4bit_grad_input_triton"] if path == "tiled"
            else ["dequantize_4bit_triton", "dequantize_4bit_triton"])
    assert ran == want
