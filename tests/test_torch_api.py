"""The version contract of llmtune's CUDA-only and version-dependent torch call sites, checked on the CPU.

``tests/fixtures/torch_api.json`` holds the exact signatures of the torch APIs llmtune calls, read from every
torch release's wheel 2.4 ... 2.14 (``python tests/fixtures/torch_api_extract.py`` regenerates it). Each test
here builds a stand-in with one release's exact signature (binding the arguments as that release would, so an
unknown keyword is a ``TypeError`` as there), computes the stand-in's result with an independent CPU reference,
and runs llmtune's call site against it, with the CUDA device check patched where the path is CUDA-only.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import llmtune.compat as compat
import llmtune.models.transformer as transformer
from llmtune.models.transformer import attend, build_attention_mask, segment_spans

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "torch_api.json").read_text())
VERSIONS = list(FIXTURE)


def _vkey(v: str) -> tuple:
    return tuple(int(p) for p in v.split("."))


def versions_with(api: str) -> list:
    """The fixture's torch versions where ``api`` exists."""
    return [v for v in VERSIONS if FIXTURE[v]["apis"].get(api) is not None]


def oldest_with(api: str) -> str:
    return min(versions_with(api), key=_vkey)


class _Unset:
    """A default the stand-in cannot evaluate (e.g. ``MixedPrecisionPolicy()``)."""


def stub(version: str, api: str, impl, calls: list | None = None):
    """A function with torch ``version``'s exact signature of ``api`` that binds its arguments like the real
    one (``TypeError`` on an unknown or missing argument) and returns ``impl(**bound_arguments)``."""
    params = []
    for p in FIXTURE[version]["apis"][api]["params"]:
        kind = {"positional": inspect.Parameter.POSITIONAL_OR_KEYWORD,
                "keyword_only": inspect.Parameter.KEYWORD_ONLY,
                "var_positional": inspect.Parameter.VAR_POSITIONAL,
                "var_keyword": inspect.Parameter.VAR_KEYWORD}[p["kind"]]
        default = inspect.Parameter.empty
        if "default" in p:
            try:
                default = eval(p["default"], {"torch": torch})   # literals: None, (-1, -1), False, ...
            except Exception:
                default = _Unset()
        params.append(inspect.Parameter(p["name"], kind, default=default))
    sig = inspect.Signature(params)

    def fn(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        if calls is not None:
            calls.append(dict(bound.arguments))
        return impl(**bound.arguments)

    fn.__signature__ = sig
    fn.__name__ = api.rsplit(".", 1)[-1]
    return fn


# -- varlen attention ------------------------------------------------------------------------------------------
def ref_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, -1), enable_gqa=False,
               is_causal=False, **_):
    """Flash-attention varlen semantics in float64: sequence ``i`` is rows ``cu[i]:cu[i+1]``; a query at ``r``
    sees keys ``c`` with ``r - c <= left`` and ``c - r <= right`` (-1: unbounded). Without ``enable_gqa`` the
    heads must match (the stand-in is stricter than flash attention, which llmtune must not rely on)."""
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise RuntimeError("stand-in varlen_attn: key/value heads differ from the query's without enable_gqa")
    left, right = window_size
    if is_causal:
        right = 0
    rep = query.shape[1] // key.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float64)
    cu = cu_seq_q.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        q = query[s:e].double().transpose(0, 1)
        k = key[s:e].double().repeat_interleave(rep, 1).transpose(0, 1)
        v = value[s:e].double().repeat_interleave(rep, 1).transpose(0, 1)
        r = torch.arange(e - s)
        ok = torch.ones(e - s, e - s, dtype=torch.bool)
        if left >= 0:
            ok &= r[:, None] - r[None, :] <= left
        if right >= 0:
            ok &= r[None, :] - r[:, None] <= right
        p = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~ok, float("-inf")), -1)
        out[s:e] = (p @ v).transpose(0, 1)
    return out.to(query.dtype)


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """Install a stand-in ``torch.nn.attention.varlen.varlen_attn`` (or none) and route CPU tensors through the
    CUDA branch of the span attention; returns ``install(fn_or_None)``."""
    monkeypatch.setattr(transformer, "is_cuda", lambda t: True, raising=False)
    monkeypatch.setitem(compat._VARLEN_STATE, "missing", False)
    monkeypatch.setitem(compat._VARLEN_STATE, "broken", None)

    def install(fn):
        mod = types.ModuleType("torch.nn.attention.varlen")
        if fn is not None:
            mod.varlen_attn = fn
        monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", mod)
        monkeypatch.setattr(torch.nn.attention, "varlen", mod, raising=False)

    return install


def _packed_gqa(window):
    """A packed two-row GQA batch (3 + 2 + 4 and 4 + 5 tokens, no padding: the spans tile the batch)."""
    g = torch.Generator().manual_seed(0)
    b, t, h, hkv, d = 2, 9, 4, 2, 16
    q, k, v = (torch.randn(b, n, t, d, generator=g).to(torch.bfloat16) for n in (h, hkv, hkv))
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 3], [1] * 4 + [2] * 5])
    dense = attend(q.float(), k.float(), v.float(), build_attention_mask(seg, t, window))
    return q, k, v, segment_spans(seg, window), dense


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("version", versions_with("varlen_attn"))
def test_varlen_call_site_matches_each_torch_signature(varlen_on_cpu, version, window):
    """Every release's ``varlen_attn`` signature: the CUDA span path gives the dense-mask attention, using
    the kernel where the signature allows (``window_size`` for a sliding window, ``enable_gqa`` or expanded
    heads) and the per-span SDPA path otherwise (torch 2.11's signature crashed the call with ``TypeError``)."""
    names = {p["name"] for p in FIXTURE[version]["apis"]["varlen_attn"]["params"]}
    calls: list = []
    varlen_on_cpu(stub(version, "varlen_attn", ref_varlen, calls))
    q, k, v, segs, dense = _packed_gqa(window)
    assert segs.cu_seqlens is not None
    out = attend(q, k, v, segs)
    assert out.shape == dense.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense, atol=2e-2, rtol=2e-2)
    usable = "window_size" in names or (window is None and "is_causal" in names)
    assert len(calls) == (1 if usable else 0), (version, names)
    if calls:
        assert ("enable_gqa" in calls[0]) == ("enable_gqa" in names)
        assert calls[0]["key"].shape[1] == (2 if "enable_gqa" in names else 4)


def test_varlen_on_torch_2_11_uses_the_kernel_with_expanded_heads(varlen_on_cpu):
    """The GPU machine's torch (2.11): ``varlen_attn(..., *, return_aux, scale, window_size)``."""
    assert "2.11.0" in FIXTURE
    calls: list = []
    varlen_on_cpu(stub("2.11.0", "varlen_attn", ref_varlen, calls))
    q, k, v, segs, dense = _packed_gqa(None)
    out = transformer._varlen(q, k, v, segs)   # the kernel call itself (main passed enable_gqa: TypeError)
    assert out is not None and len(calls) == 1
    torch.testing.assert_close(out.float(), dense, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(attend(q, k, v, segs).float(), dense, atol=2e-2, rtol=2e-2)
    assert len(calls) == 2 and calls[1]["window_size"] == (-1, 0) and calls[1]["key"].shape[1] == 4


def test_varlen_missing_or_rejecting_falls_back_to_span_sdpa(varlen_on_cpu):
    """No ``varlen_attn`` (torch < 2.10), and one whose call raises ``TypeError``: the per-span SDPA path,
    and a ``TypeError`` is not retried."""
    q, k, v, segs, dense = _packed_gqa(None)
    varlen_on_cpu(None)
    torch.testing.assert_close(attend(q, k, v, segs).float(), dense, atol=2e-2, rtol=2e-2)
    calls: list = []

    def rejects(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
        calls.append(kw)
        raise TypeError("varlen_attn() got an unexpected keyword argument")

    varlen_on_cpu(rejects)
    for _ in range(2):
        torch.testing.assert_close(attend(q, k, v, segs).float(), dense, atol=2e-2, rtol=2e-2)
    assert len(calls) == 1


# -- process group with CPU offload on NCCL --------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_cuda_process_group_has_gloo_for_cpu_tensors(monkeypatch, version):
    """On CUDA the group is ``cpu:gloo,cuda:nccl``: FSDP offload keeps parameters and gradients as CPU
    DTensors, and a NCCL-only group has no backend for their collectives. Checked against each release's
    ``init_process_group`` signature."""
    import torch.distributed as dist

    from llmtune.train import distributed
    from config_helpers import make_config

    calls: list = []
    monkeypatch.setattr(dist, "init_process_group", stub(version, "init_process_group", lambda **kw: None, calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    for key, val in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, val)
    assert distributed.init_distributed(make_config()) is True
    backend = calls[0]["backend"]
    assert sorted(backend.split(",")) == ["cpu:gloo", "cuda:nccl"]
    assert calls[0]["device_id"] == torch.device("cuda", 1)
    calls.clear()
    assert distributed.init_distributed(make_config(device="cpu")) is True   # a CPU run on a GPU machine
    assert calls[0]["backend"] == "gloo"


# -- RNG state of fewer devices ----------------------------------------------------------------------------------
def test_resume_with_fewer_gpus_restores_the_devices_present(monkeypatch, capsys):
    """A checkpoint written on 4 GPUs resumed on 2: the first 2 device states are restored, with a notice
    (``torch.cuda.set_rng_state_all`` fails on a device index that does not exist)."""
    from llmtune.train import checkpoint as ckpt

    have = 2
    restored: dict = {}

    def set_all(new_states):
        for i, s in enumerate(new_states):
            if i >= have:
                raise RuntimeError(f"CUDA error: invalid device ordinal {i}")
            restored[i] = s

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: have)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", stub(VERSIONS[-1], "cuda.set_rng_state_all",
                                                              lambda new_states: set_all(new_states)))
    st = ckpt.capture_rng_state()
    st["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    ckpt.restore_rng_state(st)
    assert sorted(restored) == [0, 1] and all(int(restored[i][0]) == i for i in restored)
    assert "4 CUDA devices" in capsys.readouterr().err
    restored.clear()
    st["cuda"] = st["cuda"][:1]   # fewer saved than present: those restored, no notice
    ckpt.restore_rng_state(st)
    assert sorted(restored) == [0] and capsys.readouterr().err == ""
