"""Kernel sections of the GPU check (``benchmarks/gpu_check.py``): correctness of the Triton kernels against
their PyTorch references, NF4 decode speed, and the tiled-NF4 vs dequantize+cuBLAS table.

Every function takes a :class:`gpu_check_common.Section` (its JSON file, time cap, device, dry flag) and
fills ``sec.result``; the orchestrator runs each in its own process.

``nf4_paths.json`` (written by :func:`section_nf4_paths`): the measured table that chooses, per training
shape, between the tiled NF4 kernel and "dequantize, then cuBLAS" (``llmtune.kernels.nf4.training_path``).
It is a valid ``kernels/nf4_paths.json`` (``llmtune.kernels.nf4.load_path_table`` reads it; copy it there
to ship the measurement)::

    {"measured": true, "device": "NVIDIA H100 80GB HBM3", "default": "dequant",
     "entries": [{"op": "forward", "m_bucket": 2048, "n": 14336, "k": 4096, "tiled_ms": 0.41,
                  "dequant_ms": 0.37, "path": "dequant", "max_rel_err": 0.004}, ...],
     "rows": [...every measurement, failed ones too...], "capability": [9, 0], "torch": "2.11.0",
     "triton": "3.6.0", "autotune": true, "blocksize": 64, "dtype": "bfloat16", "section": "nf4_paths", ...}

``op``: ``"forward"`` is ``y = x @ W.T`` with ``x (m, k)``, ``W (n, k)`` 4-bit (``matmul_4bit_tiled``
against ``x @ dequantize_4bit(W).T``); ``"grad_input"`` is ``dx = g @ W`` with ``g (m, n)``
(``matmul_4bit_grad_input`` with ``LLMTUNE_NF4_PATH=tiled``, against ``g @ dequantize_4bit(W)``).
``m_bucket`` is the row count (a power of two, 512 to 8192). Times are medians in milliseconds
(``triton.testing.do_bench``, L2 flushed, the kernel autotuned in the warm-up); ``path`` names the faster.
``entries`` holds the successful measurements, ``rows`` all of them (``status`` ``ok``, or ``error``/``oom``
with ``error``). A dry run writes the same layout with ``"measured": false`` and CPU reference timings,
which mean nothing. The file is rewritten after every measurement.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from gpu_check_common import Section, bench_ms, free, guarded, rel_err

#: tolerance on ``max |err| / max |ref|`` per dtype (float64 reference on the same inputs)
TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}

# (name, N = out_features, K = in_features, count in one decoder layer): Llama-3.1-8B's projections
SHAPES_8B = [("q/o", 4096, 4096, 2), ("k/v", 1024, 4096, 2), ("gate/up", 14336, 4096, 2), ("down", 4096, 14336, 1)]
SHAPES_1B = [("1B q/o", 2048, 2048, 2), ("1B k/v", 512, 2048, 2), ("1B gate/up", 8192, 2048, 2),
             ("1B down", 2048, 8192, 1)]
TINY_SHAPES = [("tiny q", 96, 128, 2), ("tiny kv", 32, 128, 2)]
DECODE_M = [1, 2, 4, 8, 16]


def _nf4(n: int, k: int, dev: str, dtype):
    """A random ``(n, k)`` weight in ``dtype`` and its NF4 form: ``(w, packed, absmax float32, code)``."""
    import torch

    from llmtune.quant.nf4 import quantize_4bit

    g = torch.Generator(device="cpu").manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dev, dtype)
    packed, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    return w, packed, st.get_absmax().float(), st.code.to(dev).float()


def _compare(fn: Callable, ref: Callable, inputs: list, tol: float, seed: int = 0) -> dict:
    """Run ``fn(*inputs)`` and ``ref`` on float64 copies; backward with the same random cotangents
    through both when an input requires grad. Returns errors per output/gradient and ``ok``."""
    import torch

    def outs(o):
        return list(o) if isinstance(o, (tuple, list)) else [o]

    leaves = [x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) and x.is_floating_point()
              else x for x in inputs]
    leaves64 = [x.detach().double().requires_grad_(x.requires_grad) if torch.is_tensor(x) and x.is_floating_point()
                else x for x in inputs]
    t = time.perf_counter()
    got = outs(fn(*leaves))
    want = outs(ref(*leaves64))
    errors = {f"out{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(got, want))}
    if any(torch.is_tensor(x) and x.requires_grad for x in leaves):
        g = torch.Generator(device="cpu").manual_seed(seed)
        cots = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in got]
        torch.autograd.backward(got, cots)
        torch.autograd.backward(want, [c.double() for c in cots])
        for i, (a, b) in enumerate(zip(leaves, leaves64)):
            if torch.is_tensor(a) and a.requires_grad:
                errors[f"grad{i}"] = rel_err(a.grad, b.grad)
    if got[0].is_cuda:
        torch.cuda.synchronize()
    return {"errors": {k: float(f"{v:.3g}") for k, v in errors.items()}, "tol": tol,
            "ok": all(v <= tol for v in errors.values()), "seconds": round(time.perf_counter() - t, 2)}


def section_kernels(sec: Section) -> None:
    """Each Triton kernel once or twice (fixed tile configs: ``LLMTUNE_AUTOTUNE=0``, about 20 compilations)
    on small shapes against its PyTorch reference in float64: forward and, where trainable, backward.
    Under ``--dry-run`` the kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``,
    ``LLMTUNE_FORCE_TRITON=1``). A check is skipped (and listed) once the section's cap is near."""
    import torch
    import torch.nn.functional as F

    from llmtune.kernels import cross_entropy as CE
    from llmtune.kernels import lora as L
    from llmtune.kernels import nf4 as K
    from llmtune.kernels import rmsnorm as R
    from llmtune.kernels import rope as P
    from llmtune.kernels import swiglu as S
    from llmtune.kernels.dispatch import use_triton

    dev, dry = sec.dev, sec.dry
    rows: list = []
    sec.result.update(checks=rows, triton=use_triton(torch.empty(0, device=dev)))
    d, m, kk, nn_, v = (64, 8, 128, 96, 256) if dry else (4096, 256, 4096, 4096, 32000)
    bf16, fp16 = torch.bfloat16, torch.float16

    def t(*shape, dtype=bf16, grad=False, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_(grad)

    def ce_ref(h, w, y):
        return F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")

    labels = torch.randint(0, v, (m,), device=dev)
    labels[::5] = -100
    nf4 = {}

    def four(dtype):
        if dtype not in nf4:
            nf4[dtype] = _nf4(nn_, kk, dev, dtype)
        return nf4[dtype]

    def lora4(dtype):
        w, packed, absmax, code = four(dtype)
        return (lambda x, a, b: L.lora_linear_4bit(x, packed, absmax, code, nn_, 64, None, a, b, 2.0),
                lambda x, a, b: L.lora_linear_4bit_ref(x, packed, absmax, code, nn_, 64, None, a, b, 2.0))

    def dense_lora(dtype):
        w = t(nn_, kk, dtype=dtype, scale=kk ** -0.5)
        return (lambda x, a, b: L.lora_linear(x, w, None, a, b, 2.0),
                lambda x, a, b: L.lora_linear_ref(x, w.double(), None, a, b, 2.0))

    def mm4(fn_name, dtype, rows_m, grad_input=False):
        w, packed, absmax, code = four(dtype)
        fn = getattr(K, fn_name)
        w64 = K.dequantize_4bit_ref(packed, absmax, code, nn_ * kk, 64, torch.float64).view(nn_, kk)
        if grad_input:
            return fn, (lambda g: fn(g, packed, absmax, code, kk, 64)), (lambda g: g @ w64), [t(rows_m, nn_,
                                                                                           dtype=dtype)]
        return fn, (lambda x: fn(x, packed, absmax, code, nn_, 64)), (lambda x: x @ w64.t()), [t(rows_m, kk,
                                                                                               dtype=dtype)]

    def lora_inputs(dtype):
        return [t(m, kk, dtype=dtype, grad=True), t(16, kk, dtype=dtype, grad=True, scale=kk ** -0.5),
                t(nn_, 16, dtype=dtype, grad=True, scale=0.25)]

    def dequant(dtype):
        w, packed, absmax, code = four(dtype)
        return (lambda p: K.dequantize_4bit(p, absmax, code, nn_ * kk, 64, dtype),
                lambda p: K.dequantize_4bit_ref(p, absmax, code, nn_ * kk, 64, torch.float64), [packed])

    # (name, dtype, builder -> (fn, ref, inputs)); most important first: the cap cuts from the end
    checks: list[tuple[str, Any, Callable[[], tuple]]] = [
        ("rms_norm", bf16, lambda: (lambda x, w: R.rms_norm(x, w, 1e-5), lambda x, w: R.rms_norm_ref(x, w, 1e-5),
                                    [t(m, d, grad=True), t(d, grad=True)])),
        ("apply_rope", bf16, lambda: (P.apply_rope, P.apply_rope_ref,
                                      [t(1, 8, m, 128 if not dry else 16, grad=True),
                                       t(1, 2, m, 128 if not dry else 16, grad=True),
                                       t(m, 128 if not dry else 16), t(m, 128 if not dry else 16)])),
        ("swiglu", bf16, lambda: (S.swiglu, S.swiglu_ref, [t(m, d, grad=True), t(m, d, grad=True)])),
        ("fused_linear_cross_entropy", bf16, lambda: (
            lambda h, w, y: CE.fused_linear_cross_entropy(h, w, y)[0], ce_ref,
            [t(m, d, grad=True), t(v, d, grad=True, scale=d ** -0.5), labels])),
        ("dequantize_4bit", bf16, lambda: dequant(bf16)),
        ("matmul_4bit M=1 (decode)", bf16, lambda: mm4("matmul_4bit", bf16, 1)[1:]),
        ("matmul_4bit M=16 (decode)", bf16, lambda: mm4("matmul_4bit", bf16, 16)[1:]),
        ("matmul_4bit_tiled", bf16, lambda: mm4("matmul_4bit_tiled", bf16, m)[1:]),
        ("matmul_4bit_grad_input", bf16, lambda: mm4("matmul_4bit_grad_input", bf16, m, grad_input=True)[1:]),
        ("lora_linear_4bit (QLoRA fused)", bf16, lambda: (*lora4(bf16), lora_inputs(bf16))),
        ("lora_linear (dense fused)", bf16, lambda: (*dense_lora(bf16), lora_inputs(bf16))),
        ("rms_norm", fp16, lambda: (lambda x, w: R.rms_norm(x, w, 1e-5), lambda x, w: R.rms_norm_ref(x, w, 1e-5),
                                    [t(m, d, dtype=fp16, grad=True), t(d, dtype=fp16, grad=True)])),
        ("fused_linear_cross_entropy", fp16, lambda: (
            lambda h, w, y: CE.fused_linear_cross_entropy(h, w, y)[0], ce_ref,
            [t(m, d, dtype=fp16, grad=True), t(v, d, dtype=fp16, grad=True, scale=d ** -0.5), labels])),
        ("matmul_4bit M=1 (decode)", fp16, lambda: mm4("matmul_4bit", fp16, 1)[1:]),
        ("lora_linear_4bit (QLoRA fused)", fp16, lambda: (*lora4(fp16), lora_inputs(fp16))),
        ("lora_linear (dense fused)", fp16, lambda: (*dense_lora(fp16), lora_inputs(fp16))),
    ]
    for name, dtype, build in checks:
        dname = str(dtype).replace("torch.", "")
        if not sec.enough(8):
            sec.skip(f"{name} {dname}")
            continue

        def one(build=build, dname=dname):
            fn, ref, inputs = build()
            out = _compare(fn, ref, inputs, TOL[dname])
            out["path"] = "triton" if use_triton(inputs[0]) else "reference"
            return out
        guarded(sec, rows, {"kernel": name, "dtype": dname}, one)
    bad = [f"{r['kernel']} {r['dtype']}" for r in rows if r["status"] != "ok" or not r.get("ok")]
    sec.result["failed_checks"] = bad
    sec.result["status"] = "failed" if bad else "ok"


def section_nf4_decode(sec: Section) -> None:
    """NF4 decode (M = 1, 2, 4, 8, 16) on Llama-3.1-8B's projections: ``Linear4bit`` forward (what decoding
    runs: double-quantized scales as stored) and ``matmul_4bit`` with pre-expanded scales, against a bf16
    ``F.linear`` with the dense weight and bitsandbytes' ``matmul_4bit`` when it imports; each result checked
    against a float64 product with the dequantized weight. Per M, ``layer_speedup`` = sum of bf16 times /
    sum of ``Linear4bit`` times over one decoder layer's seven projections. Dequantization bandwidth
    (packed bytes + float32 scales read, bf16 written, per ms) against a device copy (``clone``: read +
    write); ``dequant_fraction_of_copy`` is the smallest over shapes of at least 16M weights."""
    import torch
    import torch.nn.functional as F

    from llmtune.kernels import nf4 as K
    from llmtune.quant import Linear4bit

    dev, dry = sec.dev, sec.dry
    try:
        if dev != "cuda":
            raise ImportError("no GPU")  # its CPU path is not what is compared; importing it costs seconds
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
        sec.result["bitsandbytes"] = getattr(bnb, "__version__", "?")
    except Exception as e:  # noqa: BLE001 (optional comparison)
        bnb = bnbF = None
        sec.result["bitsandbytes"] = f"not importable ({type(e).__name__})"
    nbytes = 1 << (20 if dry else 30)
    big = torch.empty(nbytes // 2, dtype=torch.float16, device=dev)
    copy_ms = bench_ms(lambda: big.clone(), dev)
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    big = None  # free it (not del: the timed closure above names it)
    deq: list = []
    rows: list = []
    sec.result.update(copy_GBps=round(copy_gbs, 1), dequant=deq, decode=rows)
    weights = {}  # every shape at once (about 1.5 GB with the float64 references): M-major order below
    for name, n, k, count in (TINY_SHAPES if dry else SHAPES_8B):
        w, packed, absmax, code = _nf4(n, k, dev, torch.bfloat16)
        wt = {"w": w, "packed": packed, "absmax": absmax, "code": code, "n": n, "k": k, "count": count,
              "layer": Linear4bit.from_float(w, compute_dtype=torch.bfloat16),
              "w64": K.dequantize_4bit_ref(packed, absmax, code, n * k, 64, torch.float64).view(n, k), "bnb": None}
        if bnbF is not None:
            try:
                wt["bnb"] = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            except Exception as e:  # noqa: BLE001
                sec.result["bitsandbytes"] += f"; quantize failed: {type(e).__name__}: {e}"[:200]
        weights[name] = wt

        def dq(wt=wt):
            p, a, c, numel = wt["packed"], wt["absmax"], wt["code"], wt["n"] * wt["k"]
            got = K.dequantize_4bit(p, a, c, numel, 64, torch.bfloat16)
            ms = bench_ms(lambda: K.dequantize_4bit(p, a, c, numel, 64, torch.bfloat16), dev)
            moved = p.numel() + a.numel() * 4 + numel * 2
            return {"ms": round(ms, 4), "GBps": round(moved / ms / 1e6, 1),
                    "fraction_of_copy": round(moved / ms / 1e6 / copy_gbs, 3),
                    "max_rel_err": rel_err(got, wt["w64"].view(-1))}
        guarded(sec, deq, {"shape": name, "N": n, "K": k}, dq)
    for mm in DECODE_M:  # M = 1 on every shape first: the target's row survives a cut
        for name, wt in weights.items():
            if not sec.enough(4):
                sec.skip(f"{name} M={mm}")
                continue
            x = torch.randn(mm, wt["k"], device=dev, dtype=torch.bfloat16)

            def one(x=x, wt=wt):
                layer, w, bq = wt["layer"], wt["w"], wt["bnb"]
                p, a, c, n = wt["packed"], wt["absmax"], wt["code"], wt["n"]
                with torch.no_grad():
                    err = rel_err(layer(x), x.double() @ wt["w64"].t())
                    r = {"module_ms": bench_ms(lambda: layer(x), dev),
                         "kernel_ms": bench_ms(lambda: K.matmul_4bit(x, p, a, c, n, 64), dev),
                         "bf16_ms": bench_ms(lambda: F.linear(x, w), dev)}
                    if bq is not None:
                        r["bnb_ms"] = bench_ms(lambda: bnb.matmul_4bit(x, bq[0].t(), quant_state=bq[1]), dev)
                r = {key: round(val, 5) for key, val in r.items()}
                r.update(speedup_vs_bf16=round(r["bf16_ms"] / r["module_ms"], 3),
                         kernel_speedup_vs_bf16=round(r["bf16_ms"] / r["kernel_ms"], 3), max_rel_err=err,
                         ok=err <= TOL["bfloat16"])
                if "bnb_ms" in r:
                    r["speedup_vs_bnb"] = round(r["bnb_ms"] / r["module_ms"], 3)
                return r
            guarded(sec, rows, {"shape": name, "N": wt["n"], "K": wt["k"], "per_layer": wt["count"], "M": mm}, one)
    weights.clear()
    free()
    per_m = {}
    shapes = {s[0] for s in (TINY_SHAPES if dry else SHAPES_8B)}
    for mm in DECODE_M:
        got = [r for r in rows if r["M"] == mm and r["status"] == "ok"]
        if {r["shape"] for r in got} == shapes:
            nf = sum(r["module_ms"] * r["per_layer"] for r in got)
            bf = sum(r["bf16_ms"] * r["per_layer"] for r in got)
            per_m[str(mm)] = {"layer_nf4_ms": round(nf, 4), "layer_bf16_ms": round(bf, 4),
                              "layer_speedup": round(bf / nf, 3),
                              "min_shape_speedup": min(r["speedup_vs_bf16"] for r in got)}
    sec.result["per_M"] = per_m
    big_rows = [r for r in deq if r["status"] == "ok" and (dry or r["N"] * r["K"] >= 1 << 24)]
    sec.result["dequant_fraction_of_copy"] = min((r["fraction_of_copy"] for r in big_rows), default=None)
    wrong = [r for r in rows + deq if r["status"] != "ok" or r.get("max_rel_err", 0) > TOL["bfloat16"]]
    sec.result["status"] = "failed" if wrong else "ok"


def section_nf4_paths(sec: Section) -> None:
    """The measured table of the NF4 training path (format: module docstring): tiled NF4 kernels against
    dequantize + cuBLAS at training row counts, forward and input gradient, Llama-3.1-8B and Llama-3.2-1B
    projections, bf16, autotuned. Runs with ``LLMTUNE_NF4_PATH=tiled`` so the input-gradient dispatcher
    takes the tiled kernel whatever the shipped table says."""
    import torch
    import triton

    from llmtune.kernels import nf4 as K
    from llmtune.kernels.dispatch import use_triton

    dev, dry = sec.dev, sec.dry
    rows: list = []
    entries: list = []
    cap = torch.cuda.get_device_capability() if dev == "cuda" else None
    sec.result.update({"measured": False, "device": torch.cuda.get_device_name() if cap else "cpu",
                       "default": "dequant", "entries": entries, "rows": rows,
                       "capability": list(cap) if cap else None, "torch": torch.__version__.split("+")[0],
                       "triton": triton.__version__,
                       "autotune": os.environ.get("LLMTUNE_AUTOTUNE", "1") not in ("0", "false", "no", "off"),
                       "blocksize": 64, "dtype": "bfloat16",
                       "kernels": "triton" if use_triton(torch.empty(0, device=dev)) else "reference"})
    ms_list = [32, 64] if dry else [512, 2048, 8192]
    for name, n, k, _ in (TINY_SHAPES if dry else SHAPES_8B + SHAPES_1B):
        if not sec.enough(6):
            sec.skip(name)
            continue
        _, packed, absmax, code = _nf4(n, k, dev, torch.bfloat16)

        def dense():
            return K.dequantize_4bit(packed, absmax, code, n * k, 64, torch.bfloat16).view(n, k)
        for mm in ms_list:
            x = torch.randn(mm, k, device=dev, dtype=torch.bfloat16)
            g = torch.randn(mm, n, device=dev, dtype=torch.bfloat16)
            cases = {"forward": (lambda: K.matmul_4bit_tiled(x, packed, absmax, code, n, 64),
                                 lambda: x @ dense().t()),
                     "grad_input": (lambda: K.matmul_4bit_grad_input(g, packed, absmax, code, k, 64),
                                    lambda: g @ dense())}
            for op, (tiled, deq) in cases.items():
                def one(tiled=tiled, deq=deq):
                    err = rel_err(tiled(), deq())
                    a, b = bench_ms(tiled, dev), bench_ms(deq, dev)
                    return {"tiled_ms": round(a, 5), "dequant_ms": round(b, 5),
                            "path": "tiled" if a < b else "dequant", "max_rel_err": err}
                row = guarded(sec, rows, {"op": op, "shape": name, "m_bucket": mm, "n": n, "k": k}, one)
                if row["status"] == "ok" and row["max_rel_err"] <= TOL["bfloat16"]:
                    entries.append({key: row[key] for key in ("op", "m_bucket", "n", "k", "tiled_ms",
                                                              "dequant_ms", "path", "max_rel_err")})
                    sec.result["measured"] = dev == "cuda"
                    sec.save()
        packed = absmax = code = None  # freed before the next shape
        free()
    bad = [r for r in rows if r["status"] != "ok" or r["max_rel_err"] > TOL["bfloat16"]]
    sec.result["status"] = "failed" if bad or not rows else "ok"
