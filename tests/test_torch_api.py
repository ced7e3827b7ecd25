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
        kind = {"positional_only": inspect.Parameter.POSITIONAL_ONLY,
                "positional": inspect.Parameter.POSITIONAL_OR_KEYWORD,
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


# -- torch._grouped_mm (MoE experts) ----------------------------------------------------------------------------
def _moe_case(dtype, h=24, i=16, e=5, n=29):
    import llmtune.models.moe as moe

    torch.manual_seed(2)
    experts = torch.nn.ModuleList(moe.ExpertMLP(h, i) for _ in range(e)).to(dtype)
    x = torch.randn(n, h, dtype=dtype)
    weights, top = torch.topk(torch.softmax(torch.randn(n, e), -1), 2, dim=-1)
    return moe, experts, x, weights.to(dtype), top


@pytest.mark.parametrize("version", versions_with("_grouped_mm"))
def test_grouped_mm_call_site_binds_each_torch_signature(monkeypatch, version):
    """llmtune's ``_grouped_mm`` call binds every release's signature (2.8+), and on a CUDA-looking bfloat16
    batch without autograd the MoE block takes the grouped path and matches the per-expert loop."""
    moe, experts, x, weights, top = _moe_case(torch.bfloat16, h=32, i=16)
    from test_moe_grouped_cache import grouped_mm_reference

    calls: list = []
    monkeypatch.setattr(torch, "_grouped_mm", stub(version, "_grouped_mm", grouped_mm_reference, calls),
                        raising=False)
    monkeypatch.setattr(moe, "is_cuda", lambda t: True)
    monkeypatch.setattr(moe, "_GROUPED_MM_FAILED", False)
    with torch.no_grad():
        got = moe.experts_forward(x, experts, top, weights)
        ref = moe.experts_forward(x, experts, top, weights, grouped=False)
    assert len(calls) == 3 and not moe._GROUPED_MM_FAILED
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_grouped_mm_absent_before_2_8_takes_the_loop(monkeypatch):
    """torch < 2.8 has no ``torch._grouped_mm``: the MoE block runs the per-expert loop, same result."""
    assert oldest_with("_grouped_mm") == "2.8.0"
    moe, experts, x, weights, top = _moe_case(torch.bfloat16, h=32, i=16)
    with torch.no_grad():
        ref = moe.experts_forward(x, experts, top, weights, grouped=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    monkeypatch.setattr(moe, "is_cuda", lambda t: True)
    assert not moe._can_group(x, experts)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts_forward(x, experts, top, weights), ref, atol=0, rtol=0)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_mm_arguments_pass_the_meta_checks_at_qwen3_moe_shapes():
    """Qwen3-30B-A3B's expert shapes (hidden 2048, expert width 768, 128 experts) on the meta device: torch's
    own argument checks of ``_grouped_mm`` (bfloat16, int32 offsets, 16-byte aligned strides) pass for
    llmtune's stacked, transposed weights; a width that is not a multiple of 8 fails them, which is why
    ``_can_group`` requires multiples of 8."""
    import llmtune.models.moe as moe

    with torch.device("meta"):
        experts = torch.nn.ModuleList(moe.ExpertMLP(2048, 768) for _ in range(128)).to(torch.bfloat16)
        rows = torch.empty(4096, 2048, dtype=torch.bfloat16)
        counts = torch.empty(128, dtype=torch.long)
    with torch.no_grad():
        out = moe._grouped_swiglu(rows, counts, experts)
    assert out.shape == (4096, 2048) and out.dtype == torch.bfloat16
    with torch.device("meta"):
        odd = torch.nn.ModuleList(moe.ExpertMLP(60, 36) for _ in range(4)).to(torch.bfloat16)
        with pytest.raises(RuntimeError, match="16 bytes"):
            moe._grouped_swiglu(torch.empty(8, 60, dtype=torch.bfloat16), torch.empty(4, dtype=torch.long), odd)


# -- FSDP2 and the imports of every supported release ------------------------------------------------------------
def _torch_floor() -> str:
    import re

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    return re.search(r'"torch>=([0-9.]+)', text).group(1)


def _supported() -> list:
    floor = _vkey(_torch_floor())
    return [v for v in VERSIONS if _vkey(v)[:len(floor)] >= floor]


def _torch_imports() -> dict:
    """``{module: {names}}`` of every unconditional ``from torch.X import ...`` in llmtune's sources (not
    under ``try: ... except ImportError``), for the modules the fixture lists exports of."""
    import ast

    import llmtune

    root = Path(llmtune.__file__).parent
    found: dict = {}
    mods = set(FIXTURE[VERSIONS[-1]]["exports"])
    for f in list(root.rglob("*.py")) + list((root.parent / "kernels").glob("*.py")):
        tree = ast.parse(f.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                   and any("ImportError" in ast.dump(h) for h in t.handlers) for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):   # an import under ``try: ... except ImportError`` is optional
            if isinstance(node, ast.ImportFrom) and node.module in mods and id(node) not in guarded:
                found.setdefault(node.module, set()).update(a.name for a in node.names)
    return found


def test_every_supported_torch_has_what_llmtune_imports():
    """Each ``from torch.distributed.fsdp import fully_shard, ...`` (and the other version-dependent torch
    modules) resolves in every release from pyproject's floor on; the FSDP methods llmtune calls exist."""
    imports = _torch_imports()
    assert "fully_shard" in imports["torch.distributed.fsdp"]
    for v in _supported():
        for mod, names in imports.items():
            missing = names - set(FIXTURE[v]["exports"][mod] or ())
            assert not missing, f"torch {v}: {mod} lacks {sorted(missing)}"
        for api in ("fully_shard", "FSDPModule.set_gradient_divide_factor",
                    "FSDPModule.set_force_sum_reduction_for_comms", "get_autocast_dtype", "is_autocast_enabled",
                    "compiler.disable", "compiler.is_compiling", "distribute_tensor", "init_device_mesh",
                    "HuggingFaceStorageWriter.__init__"):
            assert FIXTURE[v]["apis"][api] is not None, f"torch {v} lacks {api}"


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("version", _supported())
def test_fully_shard_call_binds_each_supported_signature(monkeypatch, version, offload):
    """``apply_fsdp`` calls ``fully_shard`` per decoder layer then on the root, with keywords every supported
    release's signature accepts, and ``CPUOffloadPolicy`` with ``offload``."""
    import torch.distributed.device_mesh as dm
    import torch.distributed.fsdp as fsdp

    from config_helpers import make_config
    from llmtune.train.wrap import apply_fsdp
    from tiny_helpers import tiny_model

    calls: list = []
    monkeypatch.setattr(fsdp, "fully_shard", stub(version, "fully_shard", lambda **kw: kw["module"], calls))
    monkeypatch.setattr(dm, "init_device_mesh", lambda device_type, shape: ("mesh", device_type, shape))
    model = tiny_model()
    fs = "full_shard offload" if offload else "full_shard"
    apply_fsdp(model, make_config(fsdp=fs, bf16=True))
    assert [c["module"] for c in calls] == [*model.model.layers, model]
    assert all(isinstance(c["offload_policy"], fsdp.CPUOffloadPolicy) == offload for c in calls)
    assert calls[0]["mp_policy"].param_dtype == torch.bfloat16


# the torch callables llmtune calls by name -> their fixture entry
CALLED = {"fully_shard": "fully_shard", "init_process_group": "init_process_group",
          "init_device_mesh": "init_device_mesh", "distribute_tensor": "distribute_tensor",
          "get_state_dict": "get_state_dict", "set_state_dict": "set_state_dict",
          "get_model_state_dict": "get_model_state_dict",
          "HuggingFaceStorageWriter": "HuggingFaceStorageWriter.__init__",
          "HuggingFaceStorageReader": "HuggingFaceStorageReader.__init__",
          "set_gradient_divide_factor": "FSDPModule.set_gradient_divide_factor",
          "set_force_sum_reduction_for_comms": "FSDPModule.set_force_sum_reduction_for_comms",
          "_grouped_mm": "_grouped_mm", "scaled_dot_product_attention": "scaled_dot_product_attention",
          "set_rng_state_all": "cuda.set_rng_state_all", "GradScaler": "GradScaler.__init__"}


def _calls_in_sources() -> list:
    """``(file:line, name, positional count, keyword names)`` of every call of a ``CALLED`` name in llmtune."""
    import ast

    import llmtune

    root = Path(llmtune.__file__).parent
    out = []
    for f in list(root.rglob("*.py")) + list((root.parent / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if name in CALLED:
                    out.append((f"{f.name}:{node.lineno}", name, len(node.args),
                                [k.arg for k in node.keywords if k.arg is not None]))
    return out


def test_every_torch_call_binds_in_every_supported_release():
    """Each call llmtune makes to a version-dependent torch function passes only positional arguments and
    keywords that every supported release's signature takes (torch 2.8's ``HuggingFaceStorageWriter``, for
    one, has ``save_sharded`` where 2.9 has ``save_distributed``)."""
    calls = _calls_in_sources()
    assert {c[1] for c in calls} >= {"fully_shard", "init_process_group", "HuggingFaceStorageWriter",
                                     "_grouped_mm", "scaled_dot_product_attention"}
    for v in _supported():
        for where, name, npos, kws in calls:
            api = FIXTURE[v]["apis"][CALLED[name]]
            assert api is not None, f"torch {v} has no {CALLED[name]} ({where})"
            for params in [api["params"]] + api.get("overloads", []):
                names = {p["name"] for p in params if p["kind"] in ("positional", "keyword_only")}
                npos_ok = sum(p["kind"] in ("positional_only", "positional") for p in params)
                star = {p["kind"] for p in params} & {"var_positional", "var_keyword"}
                if (set(kws) <= names or "var_keyword" in star) and (npos <= npos_ok or "var_positional" in star):
                    break
            else:
                pytest.fail(f"torch {v}: {where} calls {name} with {npos} positional and keywords {kws}, "
                            f"which {CALLED[name]} does not take")


@pytest.mark.parametrize("version", ["2.11.0+cu128", "2.12.1"])
def test_fsdp_4bit_needs_the_release_that_shards_integer_parameters(monkeypatch, version):
    """FSDP2 before torch 2.12 re-creates each shard as a parameter requiring grad, which fails for the uint8
    NF4 storage (seen on torch 2.9: "only Tensors of floating point dtype can require gradients"); the fixture
    says which releases keep frozen parameters frozen, and ``apply_fsdp`` refuses QLoRA below that with one
    clear line instead of a traceback from inside torch."""
    import torch.distributed.device_mesh as dm
    import torch.distributed.fsdp as fsdp

    from config_helpers import make_config
    from llmtune.errors import LLMTuneError
    from llmtune.quant.linear4bit import Linear4bit
    from llmtune.train.wrap import apply_fsdp
    from tiny_helpers import tiny_model

    fixed = [v for v in VERSIONS if FIXTURE[v]["features"]["fsdp_shards_integer_params"]]
    assert fixed and all(_vkey(v) >= _vkey(fixed[0]) for v in fixed)
    assert _vkey(fixed[0])[:2] == compat.FSDP_INTEGER_PARAMS_TORCH
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(fsdp, "fully_shard", stub(VERSIONS[-1], "fully_shard", lambda **kw: kw["module"]))
    monkeypatch.setattr(dm, "init_device_mesh", lambda device_type, shape: ("mesh", device_type, shape))
    model = tiny_model()
    up = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = Linear4bit.from_float(up.weight.detach(), None, compute_dtype=torch.float32)
    if compat.torch_version() < compat.FSDP_INTEGER_PARAMS_TORCH:
        with pytest.raises(LLMTuneError, match="torch >= 2.12"):
            apply_fsdp(model, make_config(fsdp="full_shard"))
    else:
        assert apply_fsdp(model, make_config(fsdp="full_shard")) is model
