"""Benchmark the 4-bit (NF4) kernels: dequantization bandwidth and 4-bit matmuls vs bf16 matmuls.

GPU (CUDA + Triton): ``triton.testing.do_bench`` medians for
  * dequantization of 1B-8B layer weights: effective GB/s (packed bytes + scales read, bf16 written)
    against the measured device copy bandwidth (``clone`` of a 1 GiB tensor: read + write);
  * ``x @ W.T`` for decode (M = 1, 4, 16: the fused matrix-vector kernel) and training (M = 2048..8192:
    the tiled fused kernel, and dequantize + cuBLAS) against a bf16 ``F.linear``, and bitsandbytes'
    ``matmul_4bit`` when it is installed;
  * the input-gradient product ``grad_out @ W`` (tiled kernel) against bf16.
CPU (no GPU): the PyTorch reference path on smaller shapes (median of a few wall-clock runs).

Prints a table and writes JSON (``--out``, default ``benchmarks/results/kernels_nf4.json``).
``--quick`` keeps it to a few seconds on the CPU (a handful of shapes).

Usage: ``python benchmarks/kernels_nf4.py [--quick] [--out PATH]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmtune.kernels import nf4 as K
from llmtune.quant.nf4 import quantize_4bit

# (name, out_features, in_features): Llama-3.2-1B and Llama-3-8B projection shapes; SmolLM2-135M for the CPU.
GPU_SHAPES = [("1B q/o 2048x2048", 2048, 2048), ("1B up 8192x2048", 8192, 2048), ("1B down 2048x8192", 2048, 8192),
              ("8B q/o 4096x4096", 4096, 4096), ("8B up 14336x4096", 14336, 4096),
              ("8B down 4096x14336", 4096, 14336)]
CPU_SHAPES = [("135M q 576x576", 576, 576), ("135M up 1536x576", 1536, 576), ("1B q/o 2048x2048", 2048, 2048)]


def _cpu_bench(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3  # ms


def _weight(n: int, k: int, device: str):
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    packed, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    return w, packed, st.get_absmax(), st.code, st


def run_gpu(quick: bool) -> dict:
    import triton.testing as tt

    bench = lambda fn: tt.do_bench(fn, return_mode="median")  # noqa: E731  (ms)
    dev = "cuda"
    big = torch.empty(1 << 29, dtype=torch.float16, device=dev)  # 1 GiB
    copy_ms = bench(lambda: big.clone())
    copy_gbs = 2 * big.numel() * 2 / copy_ms / 1e6
    del big
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # noqa: BLE001 (optional comparison)
        bnbF = None
    shapes = GPU_SHAPES[:2] if quick else GPU_SHAPES
    ms_train = [2048] if quick else [2048, 4096, 8192]
    rows, deq = [], []
    for name, n, k in shapes:
        w, packed, absmax, code, st = _weight(n, k, dev)
        nested = K.Nested(st.nested_absmax, st.nested_code, st.offset, st.nested_blocksize)
        t = bench(lambda: K.dequantize_4bit(packed, st.absmax, code, n * k, 64, torch.bfloat16, nested=nested))
        moved = packed.numel() + st.absmax.numel() + n * k * 2
        deq.append({"shape": name, "ms": t, "GB/s": moved / t / 1e6, "copy_GB/s": copy_gbs})
        if bnbF is not None:
            q, bst = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            deq[-1]["bnb_ms"] = bench(lambda: bnbF.dequantize_4bit(q, bst))
        for m in [1, 2, 4, 8, 16] + ms_train:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"shape": name, "M": m, "bf16_ms": bench(lambda: F.linear(x, w))}
            if m <= K.SMALL_M:
                row["nf4_fused_ms"] = bench(lambda: K.matmul_4bit_small_m(x, packed, st.absmax, code, n, 64,
                                                                          nested=nested))
            else:
                row["nf4_fused_ms"] = bench(lambda: K.matmul_4bit_tiled(x, packed, absmax, code, n, 64))
                g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
                row["grad_bf16_ms"] = bench(lambda: g @ w)
                row["grad_nf4_ms"] = bench(lambda: K.matmul_4bit_grad_input(g, packed, absmax, code, k, 64))
            row["nf4_dequant_then_mm_ms"] = bench(
                lambda: F.linear(x, K.dequantize_4bit(packed, absmax, code, n * k, 64, torch.bfloat16).view(n, k)))
            if bnbF is not None:
                import bitsandbytes as bnb

                row["bnb_ms"] = bench(lambda: bnb.matmul_4bit(x, q.t(), quant_state=bst))
            rows.append(row)
    return {"device": torch.cuda.get_device_name(), "copy_GB/s": copy_gbs, "dequant": deq, "matmul": rows}


def run_cpu(quick: bool) -> dict:
    shapes = CPU_SHAPES[:2] if quick else CPU_SHAPES
    reps = 3 if quick else 5
    big = torch.empty(1 << 26, dtype=torch.float16)  # 128 MiB
    copy_ms = _cpu_bench(lambda: big.clone(), reps)
    copy_gbs = 2 * big.numel() * 2 / copy_ms / 1e6
    del big
    rows, deq = [], []
    for name, n, k in shapes:
        w, packed, absmax, code, st = _weight(n, k, "cpu")
        t = _cpu_bench(lambda: K.dequantize_4bit_ref(packed, absmax, code, n * k, 64, torch.bfloat16), reps)
        moved = packed.numel() + absmax.numel() * 4 + n * k * 2
        deq.append({"shape": name, "ms": t, "GB/s": moved / t / 1e6, "copy_GB/s": copy_gbs})
        for m in ([1, 16, 512] if quick else [1, 16, 512, 2048]):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            rows.append({"shape": name, "M": m,
                         "bf16_ms": _cpu_bench(lambda: F.linear(x, w), reps),
                         "nf4_ref_ms": _cpu_bench(lambda: K.matmul_4bit_ref(x, packed, absmax, code, n, 64), reps)})
    return {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "copy_GB/s": copy_gbs, "dequant": deq, "matmul": rows}


def _table(res: dict) -> str:
    lines = [f"device: {res['device']}   copy bandwidth: {res['copy_GB/s']:.1f} GB/s", "",
             f"{'dequantize (bf16 out)':28s} {'ms':>9s} {'GB/s':>8s} {'% copy':>7s}"]
    for d in res["dequant"]:
        lines.append(f"{d['shape']:28s} {d['ms']:9.3f} {d['GB/s']:8.2f} {100 * d['GB/s'] / d['copy_GB/s']:6.0f}%"
                     + (f"   bnb {d['bnb_ms']:.3f} ms" if "bnb_ms" in d else ""))
    cols = [c for c in ("bf16_ms", "nf4_fused_ms", "nf4_dequant_then_mm_ms", "nf4_ref_ms", "bnb_ms", "grad_bf16_ms",
                        "grad_nf4_ms") if any(c in r for r in res["matmul"])]
    lines += ["", f"{'x @ W.T':28s} {'M':>6s} " + " ".join(f"{c[:-3]:>22s}" for c in cols)]
    for r in res["matmul"]:
        lines.append(f"{r['shape']:28s} {r['M']:6d} " + " ".join(
            f"{r[c]:22.3f}" if c in r else f"{'-':>22s}" for c in cols))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only (seconds on the CPU)")
    ap.add_argument("--out", default="benchmarks/results/kernels_nf4.json", help="JSON output path")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    gpu = torch.cuda.is_available() and K.triton_available()
    res = run_gpu(args.quick) if gpu else run_cpu(args.quick)
    res.update(quick=args.quick, torch=torch.__version__, units="ms (median); GB/s = 1e9 bytes/s")
    print(_table(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")
    return res


if __name__ == "__main__":
    main()
