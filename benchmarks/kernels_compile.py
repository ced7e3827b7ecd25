"""Compile the tiled Triton kernels for a GPU without one: every autotune config, shared memory per config.

Triton compiles ahead of time for a named target (``GPUTarget("cuda", 90, 32)`` = Hopper sm_90, ``80`` =
A100) with the ``ptxas`` shipped in its wheel; no GPU or driver is needed. This script compiles the fused
LoRA kernel (forward and input-gradient layouts) and the NF4 tiled matmul / input-gradient kernels (with
the QLoRA rank-r term) and the NF4 decode kernel, with the argument specialisation a real launch at a
Llama-8B projection gets (16-byte-aligned pointers, unit strides as constants, sizes divisible by 16),
for each config of ``llmtune.kernels._autotune``, and reports the shared memory each needs against the
target's limit (a config over it is skipped by the autotuner at run time: ``OutOfResources``).

It shows what the interpreter cannot: that the kernels lower to PTX for the target and that the tile
configs fit. It says nothing about speed (``benchmarks/gpu_check.py`` measures that on a GPU).

Usage: ``python benchmarks/kernels_compile.py [--cc 90,80] [--fixed] [--out PATH]`` (``--fixed``: only the
one config used with ``LLMTUNE_AUTOTUNE=0``; a few seconds). Prints a table; writes JSON (default
``benchmarks/results/kernels_compile.json``). Runs with ``TRITON_INTERPRET=0`` whatever the environment says.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: kernels must be JIT functions, not interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

#: Largest dynamic shared memory per block (bytes) of the targets: H100/H200 (sm_90), A100 (sm_80), sm_86/89.
SMEM_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
M, N_UP, K_IN, RANK = 4096, 14336, 4096, 16  # tokens, Llama-8B up projection (out, in), LoRA rank


def _compile(fn, cc: int, ptr_types: dict, ints: dict, consts: dict, cfg) -> dict:
    """Compile JIT function ``fn`` for sm_``cc`` with pointer dtypes ``ptr_types`` (name -> "*bf16"...),
    runtime ints ``ints`` (1 becomes a constant, multiples of 16 get the divisibility hint, as at launch),
    constexprs ``consts`` and the config's meta-parameters; returns a result row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts, **cfg.kwargs)
    sig, attrs, cx = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cx[(i,)] = "constexpr", consts[name]
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            if ptr_types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            sig[name], cx[(i,)] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    row = {"kernel": fn.__name__, "cc": cc, "config": dict(cfg.kwargs), "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages}
    t = time.monotonic()
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        row.update(shared_bytes=int(k.metadata.shared), fits=int(k.metadata.shared) <= SMEM_LIMIT[cc])
    except Exception as e:  # noqa: BLE001 (a row that says why)
        row.update(error=f"{type(e).__name__}: {e}"[:300], fits=False)
    row["compile_s"] = round(time.monotonic() - t, 2)
    return row


def run(ccs: list[int], fixed: bool) -> list[dict]:
    """Compile every kernel x config for each compute capability in ``ccs``; rows as :func:`_compile`."""
    if fixed:
        os.environ["LLMTUNE_AUTOTUNE"] = "0"
    from llmtune.kernels import _autotune as A
    from llmtune.kernels import _fused_triton as T
    from llmtune.kernels import _nf4_triton as Q

    bf = "*bf16"
    lora_ptrs = {n: bf for n in ("a_ptr", "b_ptr", "p_ptr", "q_ptr", "bias_ptr", "c_ptr")} | {"scaling": "fp32"}
    lora_const = {"HAS_BIAS": False, "UPCAST": False, "IEEE": False, "BR": 16}
    fwd = dict(M=M, N=N_UP, K=K_IN, R=RANK, M_BUCKET=M, s_am=K_IN, s_ak=1, s_bk=1, s_bn=K_IN, s_pm=RANK, s_pr=1,
               s_qr=1, s_qn=RANK, s_cm=N_UP, s_cn=1)  # y = x W^T + s xa B^T
    dx = dict(M=M, N=K_IN, K=N_UP, R=RANK, M_BUCKET=M, s_am=N_UP, s_ak=1, s_bk=K_IN, s_bn=1, s_pm=RANK, s_pr=1,
              s_qr=K_IN, s_qn=1, s_cm=K_IN, s_cn=1)  # dx = g W + s gB A
    nf_ptrs = {"x_ptr": bf, "g_ptr": bf, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
               "out_ptr": bf, "p_ptr": bf, "q_ptr": bf, "bias_ptr": bf, "scaling": "fp32"}
    mm = dict(M=M, N=N_UP, K=K_IN, stride_xm=K_IN, stride_om=N_UP, M_BUCKET=M, R=RANK, s_pm=RANK, s_pr=1, s_qr=1,
              s_qc=RANK)
    gi = dict(M=M, N=N_UP, K=K_IN, stride_gm=N_UP, stride_om=K_IN, M_BUCKET=M, R=RANK, s_pm=RANK, s_pr=1,
              s_qr=K_IN, s_qc=1)
    mv = dict(N=N_UP, K=K_IN, stride_xm=K_IN, stride_om=N_UP)
    jobs = [("lora fwd", T._lora_mm_kernel, lora_ptrs, fwd, lora_const, A.matmul_configs()),
            ("lora dx", T._lora_mm_kernel, lora_ptrs, dx, lora_const, A.matmul_configs()),
            ("nf4 matmul+lora", Q._matmul_kernel.fn, nf_ptrs, mm,
             {"BLOCKSIZE": 64, "UPCAST": False, "IEEE": False, "HAS_LORA": True, "HAS_BIAS": False, "BR": 16},
             A.matmul_configs(nf4=True)),
            ("nf4 grad_input+lora", Q._grad_input_kernel.fn, nf_ptrs, gi,
             {"BLOCKSIZE": 64, "UPCAST": False, "IEEE": False, "HAS_LORA": True, "BR": 16}, A.matmul_configs(nf4=True)),
            ("nf4 decode", Q._matvec_kernel.fn, nf_ptrs, mv, {"BLOCKSIZE": 64, "ROW_BLOCKS": True},
             A.matvec_configs())]
    rows = []
    for cc in ccs:
        for label, fn, ptrs, ints, consts, configs in jobs:
            for cfg in configs:
                row = _compile(fn, cc, ptrs, ints, consts, cfg)
                row["what"] = label
                rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cc", default="90,80", help="compute capabilities, comma list (90 = Hopper, 80 = A100)")
    ap.add_argument("--fixed", action="store_true", help="only the LLMTUNE_AUTOTUNE=0 config (seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_compile.json)")
    args = ap.parse_args(argv)
    rows = run([int(c) for c in args.cc.split(",")], args.fixed)
    print("| target | kernel | BM/BN/BK | warps | stages | shared KiB | fits | compile s |")
    print("|---|---|---|---|---|---:|---|---:|")
    for r in rows:
        c = r["config"]
        tiles = "/".join(str(c[k]) for k in ("BM", "BN", "BK") if k in c)
        smem = f"{r['shared_bytes'] / 1024:.0f}" if "shared_bytes" in r else r.get("error", "")[:60]
        print(f"| sm_{r['cc']} | {r['what']} | {tiles} | {r['num_warps']} | {r['num_stages']} | {smem} | "
              f"{'yes' if r['fits'] else 'NO'} | {r['compile_s']} |")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "kernels_compile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "shape": {"M": M, "out": N_UP, "in": K_IN, "rank": RANK},
                               "smem_limit": SMEM_LIMIT}, indent=1) + "\n")
    print(f"wrote {out}")
    bad = [r for r in rows if "error" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
