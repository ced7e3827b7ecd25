"""NF4/FP4 block-wise quantization against the QLoRA paper's values and float64 computations in this file."""

import math

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.quant import nf4
from llmtune.quant.nf4 import (QuantState, create_dynamic_map, dequantize_4bit, get_4bit_code, quantize_4bit,
                               quantize_nf4)

# QLoRA (Dettmers et al., 2023), Appendix E: the NF4 data type's 16 values.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
# bitsandbytes FP4 (e2m1, bias 2) in bit-pattern order, divided by 12.
BNB_FP4 = [v / 12 for v in [0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]]


def test_codebooks_are_the_published_values():
    assert get_4bit_code("nf4").tolist() == torch.tensor(PAPER_NF4, dtype=torch.float32).tolist()
    assert get_4bit_code("fp4").tolist() == torch.tensor(BNB_FP4, dtype=torch.float32).tolist()
    with pytest.raises(LLMTuneError, match="quantization_type"):
        get_4bit_code("int4")


def test_nf4_codebook_follows_the_paper_quantile_construction():
    # QLoRA eq. 4 with bitsandbytes' offset 0.9677: 8 positive quantiles and 7 negative ones of N(0,1),
    # normalised to [-1, 1], plus an exact zero. Inverse normal CDF via erfinv (float64).
    def ppf(p):
        return math.sqrt(2) * torch.special.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()

    offset = 0.9677083
    pos = [ppf(offset + (0.5 - offset) * i / 8) for i in range(9)][:-1]       # linspace(offset, 0.5, 9)[:-1]
    neg = [-ppf(offset + (0.5 - offset) * i / 7) for i in range(8)][:-1]      # linspace(offset, 0.5, 8)[:-1]
    vals = sorted(pos + [0.0] + neg)
    vals = [v / max(abs(x) for x in vals) for v in vals]
    assert torch.allclose(torch.tensor(vals, dtype=torch.float64), torch.tensor(PAPER_NF4, dtype=torch.float64), atol=2e-6)


def _dynamic_map_formula():
    # Dettmers 2016 dynamic type as bitsandbytes builds it (signed, 7 exponent bits, 8 bits), written out
    # here independently: per decade i the fraction midpoints of linspace(0.1, 1, 2**i + 1), scaled by 10**(i-6).
    vals = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        vals += (10.0 ** (i - 6) * mids).tolist() + (-(10.0 ** (i - 6)) * mids).tolist()
    vals += [0.0, 1.0]
    vals += [0.0] * (256 - len(vals))
    return torch.tensor(sorted(vals), dtype=torch.float32)


def test_dynamic_map():
    m = create_dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    assert torch.equal(m, _dynamic_map_formula())
    # most negative: -(1 - 0.9 / 64 / 2), the last midpoint of linspace(0.1, 1, 65)
    assert m.min().item() == pytest.approx(-0.99296875, abs=1e-7) and m.max().item() == 1.0
    assert torch.all(m[1:] >= m[:-1])


def _nearest_codes_f64(w, code, blocksize):
    """Reference quantization: float64 nearest code of w/absmax per block; returns (codes, absmax, ambiguous)."""
    flat = w.reshape(-1).double()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.cat([flat, flat.new_zeros(nb * blocksize - n)]).view(nb, blocksize)
    absmax = padded.abs().amax(1)
    scaled = (padded / absmax[:, None]).reshape(-1)[:n]
    dist = (scaled[:, None] - code.double()[None, :]).abs()
    codes = dist.argmin(1)
    two = dist.topk(2, dim=1, largest=False).values
    ambiguous = (two[:, 1] - two[:, 0]) < 1e-6  # within float32 rounding of a midpoint
    return codes, absmax, ambiguous


@pytest.mark.parametrize("shape", [(64, 128), (37, 100), (5, 7)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_matches_float64_nearest_code(shape, quant_type):
    w = torch.randn(*shape) * 0.02
    packed, st = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=False)
    n = w.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    code = torch.tensor(PAPER_NF4 if quant_type == "nf4" else BNB_FP4)
    ref_codes, ref_absmax, ambiguous = _nearest_codes_f64(w, code, 64)
    got = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n].long()
    ok = ambiguous | (code[got] == code[ref_codes])  # FP4 has +0 and -0: compare values
    assert ok.all()
    assert torch.equal(st.absmax, ref_absmax.float())
    ref_values = (code.double()[ref_codes].view(-1)
                  * ref_absmax.repeat_interleave(64)[:n]).view(shape)
    out = dequantize_4bit(packed, st, torch.float64)
    assert out.shape == w.shape
    assert torch.allclose(out[~ambiguous.view(shape)], ref_values[~ambiguous.view(shape)], rtol=1e-6, atol=0)


def test_dequantize_returns_shape_and_dtype():
    w = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    packed, st = quantize_nf4(w)
    out = nf4.dequantize_nf4(packed, st)
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    # block absmax values are exact code points (+-1 times absmax)
    blocks = w.float().view(-1, 64)
    idx = blocks.abs().argmax(1)
    got = out.float().view(-1, 64).gather(1, idx[:, None]).squeeze(1)
    want = blocks.gather(1, idx[:, None]).squeeze(1)
    assert torch.allclose(got, want, rtol=1e-2)


def test_packing_byte_for_byte():
    # one block of 64: absmax = 2.0; values chosen to hit known NF4 codes.
    # first pair (2.0, -2.0) -> codes (15, 0) -> byte 0xF0; next pair (0, 0.5*... ) etc.
    vals = [2.0, -2.0, 0.0, 2 * 0.33791524171829224, 2 * -0.5250730514526367, 2 * 0.07958029955625534]
    w = torch.tensor(vals + [0.0] * 58)
    packed, st = quantize_4bit(w, double_quant=False)
    assert st.absmax.tolist() == [2.0]
    # codes: 15, 0, 7, 11, 2, 8, then 7 (zero) for the rest
    assert packed[:4].tolist() == [0xF0, 0x7B, 0x28, 0x77]
    assert packed.numel() == 32 and all(b == 0x77 for b in packed[3:].tolist())
    # an odd count: the last byte's low nibble is the code of 0.0 (7 in NF4)
    packed, _ = quantize_4bit(torch.tensor([1.0, -1.0, 1.0]), double_quant=False)
    assert packed.tolist() == [0xF0, 0xF7]


def test_partial_last_block_uses_its_own_absmax():
    w = torch.cat([torch.full((64,), 4.0), torch.tensor([0.5, -0.25])])
    packed, st = quantize_4bit(w, double_quant=False)
    assert st.absmax.tolist() == [4.0, 0.5]
    out = dequantize_4bit(packed, st)
    assert out[64].item() == 0.5
    assert out[65].item() == pytest.approx(0.5 * -0.5250730514526367)  # -0.5 is nearest to -0.525


@pytest.mark.parametrize("n", [64 * 300, 64 * 256 * 2 + 64 * 3])
def test_double_quant_round_trips_scales_within_8bit_error(n):
    w = torch.randn(n) * torch.rand(n // 64).repeat_interleave(64)[:n]  # varied block scales
    _, plain = quantize_4bit(w, double_quant=False)
    packed, st = quantize_4bit(w, double_quant=True)
    assert st.nested and st.absmax.dtype == torch.uint8
    nb = plain.absmax.numel()
    assert st.nested_absmax.numel() == -(-nb // 256) and st.nested_code.numel() == 256
    offset = plain.absmax.double().mean()
    assert st.offset.item() == pytest.approx(offset.item(), rel=1e-6)
    centred = plain.absmax.double() - offset
    nested_absmax = torch.cat([centred, centred.new_zeros(-nb % 256)]).view(-1, 256).abs().amax(1)
    assert torch.allclose(st.nested_absmax.double(), nested_absmax, rtol=1e-6)
    # 8-bit dynamic code: the largest gap between neighbouring codes in [-1, 1] bounds the error
    code = _dynamic_map_formula().double()
    max_gap = (code[1:] - code[:-1]).max().item()
    err = (st.get_absmax().double() - plain.absmax.double()).abs()
    bound = nested_absmax.repeat_interleave(256)[:nb] * max_gap / 2 + 1e-6
    assert torch.all(err <= bound)
    # and the codes are the nearest dynamic-map values of centred/nested_absmax
    scaled = centred / nested_absmax.repeat_interleave(256)[:nb]
    dist = (scaled[:, None] - code[None, :]).abs()
    assert torch.all(dist.gather(1, st.absmax.long()[:, None]).squeeze(1) <= dist.min(1).values + 1e-6)


def test_memory_is_4_127_bits_per_param():
    w = torch.randn(4096, 4096)
    packed, st = quantize_4bit(w)
    bits = 8 * (packed.numel() + st.absmax.numel() * 1 + st.nested_absmax.numel() * 4 + 4) / w.numel()
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert bits == pytest.approx(4.127, abs=1e-3)


def test_state_to_and_bad_inputs():
    packed, st = quantize_4bit(torch.randn(128))
    assert isinstance(st.to("cpu"), QuantState)
    assert st.nbytes() > 0
    with pytest.raises(LLMTuneError):
        quantize_4bit(torch.arange(10))
    with pytest.raises(LLMTuneError):
        quantize_4bit(torch.randn(10), blocksize=3)
    with pytest.raises(LLMTuneError):
        quantize_4bit(torch.randn(0))
