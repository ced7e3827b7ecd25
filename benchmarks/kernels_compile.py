"""Compile every Triton kernel of ``llmtune.kernels`` for GPUs without one: errors, registers, spills, shared memory.

Triton compiles ahead of time for a named target (``GPUTarget("cuda", 90, 32)`` = Hopper sm_90, ``80`` =
A100) with the ``ptxas`` shipped in its wheel; no GPU or driver is needed. Each kernel is compiled with the
argument specialisation a real launch gets (16-byte-aligned pointers, unit strides as constants, sizes
divisible by 16 hinted) at Llama-8B shapes, for every variant (dtype, constexpr flags, block sizes the
launchers pick) and every autotune config the code can launch (``llmtune.kernels._autotune``). For each
compiled kernel the bundled ``cuobjdump -res-usage`` gives registers per thread and the stack frame
(``STACK`` > 0 or ``LOCAL`` > 0 = registers spilled to local memory); Triton's metadata gives the dynamic
shared memory, checked against the target's per-block limit (``SMEM_LIMIT``).

Modes: ``full`` (every variant x every config; fp16 is left out: its register and shared-memory use equal
bf16's), ``ci`` (every autotune config of the tiled training-step kernels, LoRA and NF4, in bf16 with
every variant flag; the fixed ``LLMTUNE_AUTOTUNE=0`` config of their float32 variants; the row-wise and
elementwise kernels and the decode kernel in every launch variant, bf16 and float32 decode; the
float32 row-wise/elementwise kernels and TF32 variants only in ``full``), ``fixed`` (one config per
variant, for iterating).

Triton versions: the installed one, plus each directory in ``--triton-dirs`` (a ``pip install --no-deps
--target DIR triton==X`` folder, e.g. the GPU machine's triton 3.6): each version compiles in its own
subprocess (``PYTHONPATH=DIR``) with a pool of ``--jobs`` workers.

A row fails the check when it does not compile, spills in a training-step kernel (``TRAINING``) or in the
decode kernel, or needs more shared memory than the target has. Exit status 1 when any row fails.
Usage: ``python benchmarks/kernels_compile.py [--mode ci|full|fixed] [--cc 80,90] [--triton-dirs D1,D2]
[--jobs 2] [--out PATH]``; prints a table, writes JSON (default ``benchmarks/results/kernels_compile.json``).
Runs with ``TRITON_INTERPRET=0`` whatever the environment says.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: kernels must be JIT functions, not interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

#: Largest dynamic shared memory per block (bytes): H100/H200 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
M, N_UP, K_IN, RANK = 4096, 14336, 4096, 16  # tokens, Llama-8B up projection (out, in), LoRA rank
MODULES = ("llmtune.kernels._fused_triton", "llmtune.kernels._nf4_triton", "llmtune.kernels._nf4_decode")
#: Kernels a training step launches (zero spills required; the decode kernel is required spill-free too).
TRAINING = {"_rms_fwd_kernel", "_rms_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
            "_ce_kernel", "_lora_mm_kernel", "_matmul_kernel", "_grad_input_kernel", "_dequant_kernel"}
NO_SPILL = TRAINING | {"_decode_kernel"}
#: dtype modes of the matmul-shaped kernels on the GPU: (pointer dtype, IEEE flag).
BF16, FP32, TF32 = ("bf16", False), ("fp32", True), ("fp32", False)


# ----------------------------------------------------------------------------------------------------
# What to compile: one job = (module, kernel, pointer dtypes, ints, constexprs, config, label)
# ----------------------------------------------------------------------------------------------------

def _cfg(c) -> dict:
    return {"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}


def _plain(**kw) -> dict:
    return {"kwargs": {}, "num_warps": kw.get("num_warps", 4), "num_stages": kw.get("num_stages", 3)}


def jobs(mode: str) -> list[dict]:
    """Every (kernel, variant, config) to compile in ``mode`` (``ci``, ``full`` or ``fixed``)."""
    from llmtune.kernels import _autotune as A

    os.environ["LLMTUNE_AUTOTUNE"] = "0"  # read at each call of the config functions
    fixed_mm, fixed_nf4 = A.matmul_configs(), A.matmul_configs(nf4=True)
    os.environ["LLMTUNE_AUTOTUNE"] = "1"
    all_mm, all_nf4 = A.matmul_configs(), A.matmul_configs(nf4=True)
    from llmtune.kernels import _fused_triton as T
    from llmtune.kernels import _nf4_triton as Q

    out: list[dict] = []

    def add(mod, kernel, ptrs, ints, consts, cfg, label, training_primary=True):
        out.append({"module": mod, "kernel": kernel, "ptrs": ptrs, "ints": ints, "consts": consts, "cfg": cfg,
                    "label": label, "primary": training_primary})

    def configs(all_list, fixed_list, primary, fp32):
        """The configs a variant launches (``for_variant``): all of them, or the fixed one."""
        if mode == "fixed" or (mode == "ci" and not primary):
            return A.for_variant(fixed_list, fp32)
        return A.for_variant(all_list, fp32)

    ft, nq, _ = MODULES
    # --- row-wise and elementwise kernels of the training step (launch parameters as the launchers pick them)
    for dt in (("bf16", "fp32") if mode == "full" else ("bf16",)):
        p = "*" + dt
        for d in (128, 576, 2048, 4096, 8192):  # Qwen3 q/k-norm head_dim; hidden sizes 135M .. 70B
            rows, block_d = T._rms_tiles(d)
            cfg = _plain(num_warps=T._num_warps(block_d))
            add(ft, "_rms_fwd_kernel", {"x_ptr": p, "w_ptr": p, "y_ptr": p, "rstd_ptr": "*fp32", "eps": "fp32"},
                {"M": M, "D": d, "stride_x": d, "stride_y": d}, {"ROWS": rows, "BLOCK_D": block_d}, cfg,
                f"rmsnorm fwd D={d} {dt}")
            for has_dw in (True, False):
                add(ft, "_rms_bwd_kernel", {"dy_ptr": p, "x_ptr": p, "w_ptr": p, "rstd_ptr": "*fp32",
                                            "dx_ptr": p, "dw_ptr": "*fp32"},
                    {"M": M, "D": d, "rows_per_prog": 8, "stride_dy": d, "stride_x": d, "stride_dx": d},
                    {"HAS_DW": has_dw, "ROWS": rows, "BLOCK_D": block_d}, cfg, f"rmsnorm bwd D={d} dw={has_dw} {dt}")
        for hd, heads in ((64, 32), (128, 32), (128, 64)):
            bd, bh = hd // 2, heads
            st = {"sq_b": heads * M * hd, "sq_h": M * hd, "sq_t": hd, "sq_d": 1}
            ints = {"T": M, "HQ": heads, "HK": 8, "HALF": hd // 2, **st,
                    **{k.replace("sq", "sk"): v for k, v in st.items()},
                    **{k.replace("sq", "sqo"): v for k, v in st.items()},
                    **{k.replace("sq", "sko"): v for k, v in st.items()},
                    "sc_b": 0, "sc_t": hd, "sc_d": 1, "ss_b": 0, "ss_t": hd, "ss_d": 1}
            for bwd in (False, True):
                add(ft, "_rope_kernel", {n: p for n in ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr")},
                    ints, {"BACKWARD": bwd, "BLOCK_H": bh, "BLOCK_D": bd}, _plain(num_warps=T._num_warps(bh * bd)),
                    f"rope D={hd} H={heads} bwd={bwd} {dt}")
        ew = {"n": M * N_UP}
        add(ft, "_swiglu_fwd_kernel", {"g_ptr": p, "u_ptr": p, "y_ptr": p}, ew, {"BLOCK": T._EW_BLOCK}, _plain(),
            f"swiglu fwd {dt}")
        add(ft, "_swiglu_bwd_kernel", {n: p for n in ("dy_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr")}, ew,
            {"BLOCK": T._EW_BLOCK}, _plain(), f"swiglu bwd {dt}")
        for has_scale in (False, True):
            for grad in (False, True):
                add(ft, "_ce_kernel", {"z_ptr": p, "tgt_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
                                       "scale_ptr": "*fp32", "inv_temp": "fp32"},
                    {"stride_z": 128256, "V": 128256, "ignore_index": -100}, {"HAS_SCALE": has_scale,
                                                                             "WRITE_GRAD": grad, "BLOCK": 4096},
                    _plain(num_warps=T._num_warps(4096)), f"cross entropy scale={has_scale} grad={grad} {dt}")
        for nested in (False, True):
            add(nq, "_dequant_kernel", Q.dequant_compile_ptrs(p, nested), {"numel": N_UP * K_IN},
                {"BLOCKSIZE": 64, "BLOCK": 1024, "NESTED": nested, "NBS": 256}, _plain(),
                f"nf4 dequant nested={nested} {dt}")

    # --- fused LoRA (dense base): forward y = x W^T + s xa B^T (+ bias) and input gradient dx = g W + s gB A
    fwd = dict(M=M, N=N_UP, K=K_IN, R=RANK, M_BUCKET=M, s_am=K_IN, s_ak=1, s_bk=1, s_bn=K_IN, s_pm=RANK, s_pr=1,
               s_qr=1, s_qn=RANK, s_cm=N_UP, s_cn=1)
    dx = dict(M=M, N=K_IN, K=N_UP, R=RANK, M_BUCKET=M, s_am=N_UP, s_ak=1, s_bk=K_IN, s_bn=1, s_pm=RANK, s_pr=1,
              s_qr=K_IN, s_qn=1, s_cm=K_IN, s_cn=1)
    modes = (BF16, FP32, TF32) if mode == "full" else (BF16, FP32)
    for (dt, ieee) in modes:
        for br in (16,):  # the launchers step through any rank 16 at a time (BR = 16)
            primary = (dt, ieee) == BF16
            ptrs = {n: "*" + dt for n in ("a_ptr", "b_ptr", "p_ptr", "q_ptr", "bias_ptr", "c_ptr")}
            ptrs["scaling"] = "fp32"
            for lay, ints, biases in (("fwd", fwd, (False, True)), ("dx", dx, (False,))):
                for bias in biases:
                    for c in configs(all_mm, fixed_mm, primary, dt == "fp32"):
                        add(ft, "_lora_mm_kernel", ptrs, ints, {"HAS_BIAS": bias, "UPCAST": False, "IEEE": ieee,
                                                                 "BR": br}, _cfg(c),
                            f"lora {lay} bias={bias} r<={br} {dt}{' ieee' if ieee else ''}")
    # --- NF4 tiled matmul / input gradient, plain and with the QLoRA term
    mm = dict(M=M, N=N_UP, K=K_IN, stride_xm=K_IN, stride_om=N_UP, M_BUCKET=M, R=RANK, s_pm=RANK, s_pr=1, s_qr=1,
              s_qc=RANK)
    gi = dict(M=M, N=N_UP, K=K_IN, stride_gm=N_UP, stride_om=K_IN, M_BUCKET=M, R=RANK, s_pm=RANK, s_pr=1,
              s_qr=K_IN, s_qc=1)
    for (dt, ieee) in modes:
        p = "*" + dt
        ptrs = {"x_ptr": p, "g_ptr": p, "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                "out_ptr": p, "p_ptr": p, "q_ptr": p, "bias_ptr": p, "scaling": "fp32"}
        variants = [(False, False, 16)] + [(True, b, 16) for b in (False, True)]
        for lora, bias, br in variants:
            primary = (dt, ieee) == BF16
            base = {"BLOCKSIZE": 64, "UPCAST": False, "IEEE": ieee, "HAS_LORA": lora, "BR": br}
            kind = f"{dt}{' ieee' if ieee else ''}"
            tag = f"lora={lora} r<={br} {kind}" if lora else f"plain {kind}"
            for c in configs(all_nf4, fixed_nf4, primary, dt == "fp32"):
                add(nq, "_matmul_kernel", ptrs, mm, dict(base, HAS_BIAS=bias), _cfg(c), f"nf4 matmul bias={bias} {tag}")
                if not bias:
                    add(nq, "_grad_input_kernel", ptrs, gi, base, _cfg(c), f"nf4 grad_input {tag}")
    # --- NF4 decode (M <= 16, inference)
    from llmtune.kernels import _nf4_decode as D

    for j in D.compile_jobs(full=mode == "full"):
        if mode == "fixed" and j["consts"]["BLOCKSIZE"] != 64:
            continue
        add(MODULES[2], "_decode_kernel", j["ptrs"], j["ints"], j["consts"], j["cfg"], j["label"],
            training_primary=False)
    return out


def _jit(obj):
    """The ``JITFunction`` under ``obj`` (through ``triton.autotune`` / ``heuristics`` wrappers), or None."""
    for _ in range(4):
        if type(obj).__name__ == "JITFunction":
            return obj
        obj = getattr(obj, "fn", None)
    return None


def kernels_in_modules() -> set[str]:
    """Names of every launchable Triton kernel (``*_kernel``) in the kernel modules: the coverage check."""
    import importlib

    names = set()
    for mod in MODULES:
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            fn = _jit(obj)
            if name.endswith("_kernel") and fn is not None:
                names.add(fn.__name__)
    return names


# ----------------------------------------------------------------------------------------------------
# Compiling one job (in a worker process)
# ----------------------------------------------------------------------------------------------------

def _res_usage(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        txt = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    usage = {}
    for line in txt.splitlines():
        if "REG:" in line:
            for part in line.split():
                key, _, val = part.partition(":")
                if key in ("REG", "STACK", "LOCAL", "SHARED") and val.isdigit():
                    usage[key.lower()] = int(val)
    return usage


def compile_job(job: dict, cc: int) -> dict:
    """Compile one job for sm_``cc``; a result row (errors are caught and reported in the row)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit(getattr(importlib.import_module(job["module"]), job["kernel"]))
    cfg = job["cfg"]
    consts = dict(job["consts"], **cfg["kwargs"])
    ptrs, ints = job["ptrs"], job["ints"]
    sig, attrs, cx = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cx[(i,)] = "constexpr", consts[name]
        elif name in ptrs:
            sig[name] = ptrs[name]
            if ptrs[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            sig[name], cx[(i,)] = "constexpr", 1
        else:
            sig[name] = "i64" if abs(ints[name]) >= 2 ** 31 else "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    row = {"kernel": job["kernel"], "what": job["label"], "cc": cc, "triton": triton.__version__,
           "config": cfg["kwargs"], "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    t = time.monotonic()
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        row["compile_s"] = round(time.monotonic() - t, 2)
        row["shared_bytes"] = int(k.metadata.shared)
        row.update(_res_usage(k.asm["cubin"]))
    except Exception as e:  # noqa: BLE001 (a row that says why)
        row["compile_s"] = round(time.monotonic() - t, 2)
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    row["spills"] = bool(row.get("stack", 0) or row.get("local", 0))
    row["fits"] = "shared_bytes" in row and row["shared_bytes"] <= SMEM_LIMIT[cc]
    row["ok"] = "error" not in row and row["fits"] and not (row["spills"] and job["kernel"] in NO_SPILL)
    return row


def _compile_star(args):
    return compile_job(*args)


def worker(mode: str, ccs: list[int], n_jobs: int) -> list[dict]:
    """Compile every job of ``mode`` for every ``ccs`` with the Triton this process imports (pool of n_jobs)."""
    work = [(j, cc) for cc in ccs for j in jobs(mode)]
    if n_jobs <= 1:
        return [compile_job(j, cc) for j, cc in work]
    import multiprocessing as mp

    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_compile_star, work, chunksize=1))


def run(mode: str, ccs: list[int], triton_dirs: list[str], n_jobs: int = 2, reuse: bool = False) -> list[dict]:
    """Rows of every Triton version: the installed one (this process's), then each of ``triton_dirs``
    (a subprocess with ``PYTHONPATH=DIR:...``). A version that cannot be imported gives one error row."""
    rows = []
    for d in [None] + list(triton_dirs):
        env = dict(os.environ, TRITON_INTERPRET="0")
        if d:
            env["PYTHONPATH"] = os.pathsep.join([d] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = f.name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode,
               "--cc", ",".join(map(str, ccs)), "--jobs", str(n_jobs), "--out", tmp]
        cmd += ["--reuse-cache"] if reuse else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        try:
            rows += json.loads(Path(tmp).read_text())["rows"]
        except (OSError, ValueError, KeyError):
            rows.append({"kernel": "*", "what": f"triton at {d or 'site-packages'}", "cc": 0, "triton": "?",
                         "error": (proc.stderr or proc.stdout)[-400:], "ok": False, "fits": False, "spills": False,
                         "config": {}, "num_warps": 0, "num_stages": 0, "compile_s": 0})
        finally:
            Path(tmp).unlink(missing_ok=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| triton | target | kernel | variant | config | warps | stages | regs | spill (stack B) | smem KiB | "
            "compile s | ok |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        c = r["config"]
        cfg = "/".join(f"{k}={v}" for k, v in c.items() if k != "GROUP_M") or "-"
        smem = f"{r['shared_bytes'] / 1024:.0f}" if "shared_bytes" in r else r.get("error", "")[:80]
        lines.append(f"| {r['triton']} | sm_{r['cc']} | {r['kernel']} | {r['what']} | {cfg} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r.get('reg', '')} | {r.get('stack', '')} | {smem} | {r['compile_s']} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[dict]:
    """Per (triton, target, kernel): variants compiled, max registers, max stack, max shared KiB, failures,
    total compile seconds."""
    out: dict = {}
    for r in rows:
        key = (r["triton"], r["cc"], r["kernel"])
        s = out.setdefault(key, {"triton": r["triton"], "cc": r["cc"], "kernel": r["kernel"], "compiled": 0,
                                 "max_regs": 0, "max_stack": 0, "max_smem_kib": 0.0, "failed": 0, "spilled": 0,
                                 "compile_s": 0.0})
        s["compiled"] += 1
        s["max_regs"] = max(s["max_regs"], r.get("reg", 0))
        s["max_stack"] = max(s["max_stack"], r.get("stack", 0))
        s["max_smem_kib"] = max(s["max_smem_kib"], round(r.get("shared_bytes", 0) / 1024, 1))
        s["failed"] += 0 if r["ok"] else 1
        s["spilled"] += 1 if r["spills"] else 0
        s["compile_s"] = round(s["compile_s"] + r["compile_s"], 1)
    return list(out.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="ci", choices=("ci", "full", "fixed"))
    ap.add_argument("--fixed", action="store_true", help="same as --mode fixed")
    ap.add_argument("--cc", default="80,90", help="compute capabilities, comma list (90 = Hopper, 80 = A100)")
    ap.add_argument("--triton-dirs", default=os.environ.get("LLMTUNE_EXTRA_TRITON", ""),
                    help="extra Triton versions: pip --target folders, comma list (env LLMTUNE_EXTRA_TRITON)")
    ap.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_compile.json)")
    ap.add_argument("--reuse-cache", action="store_true",
                    help="use Triton's kernel cache (faster reruns; compile times then mean nothing)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mode = "fixed" if args.fixed else args.mode
    ccs = [int(c) for c in args.cc.split(",")]
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="llmtune-kc-") as cache:
            if not args.reuse_cache:  # honest compile times: nothing from Triton's cache (~/.triton/cache)
                os.environ["TRITON_CACHE_DIR"] = cache
            rows = worker(mode, ccs, args.jobs)
        Path(args.out).write_text(json.dumps({"rows": rows}))
        return 0
    t = time.monotonic()
    dirs = [d for d in args.triton_dirs.split(",") if d]
    rows = run(mode, ccs, dirs, args.jobs, args.reuse_cache)
    wall = round(time.monotonic() - t, 1)
    print(table(rows))
    summ = summary(rows)
    print("\n| triton | target | kernel | compiled | max regs | max stack B | max smem KiB | spilled | failed | "
          "compile s |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in summ:
        print(f"| {s['triton']} | sm_{s['cc']} | {s['kernel']} | {s['compiled']} | {s['max_regs']} | "
              f"{s['max_stack']} | "
              f"{s['max_smem_kib']} | {s['spilled']} | {s['failed']} | {s['compile_s']} |")
    missing = sorted(kernels_in_modules() - {r["kernel"] for r in rows})
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "kernels_compile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": mode, "wall_s": wall, "jobs": args.jobs, "not_covered": missing,
                               "shape": {"M": M, "out": N_UP, "in": K_IN, "rank": RANK}, "smem_limit": SMEM_LIMIT,
                               "summary": summ, "rows": rows}, indent=1) + "\n")
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows)} compilations, {len(bad)} failing, wall {wall} s; kernels not covered: {missing or 'none'}")
    print(f"wrote {out}")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
