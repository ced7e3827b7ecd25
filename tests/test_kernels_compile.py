"""The Triton kernels compile for the GPUs users have, checked on the CPU (``benchmarks/kernels_compile.py``).

Every launchable kernel of ``llmtune.kernels`` is compiled for sm_80 (A100) and sm_90 (H100/H200) with
Triton's own ptxas, in every variant and autotune config the launchers can pick (``--mode ci``: every
config of the training-step kernels in bf16 and float32, the fixed config for the other variants), with
the installed Triton and, when ``LLMTUNE_EXTRA_TRITON`` names a ``pip install --target`` folder (``.ci/run``
puts the GPU machine's Triton 3.6 there), with that one too. Asserted from ``cuobjdump -res-usage`` and
Triton's metadata: no compile error, no register spill (stack frame) in the training-step kernels and the
decode kernel, shared memory under each target's per-block limit (227 KiB sm_90, 163 KiB sm_80). The
interpreter, which runs the numerical tests, exercises none of this compiler path.

Runs in subprocesses (the script sets ``TRITON_INTERPRET=0``; this session keeps the interpreter).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernels_compile.py"
LIMITS = {80: 166912, 90: 232448}


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("LLMTUNE_AUTOTUNE", "TRITON_INTERPRET")}


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_kernel_and_variant_is_in_the_check():
    """The job list covers every ``*_kernel`` of the kernel modules and the variant flags the launchers
    pass: LoRA forward (with/without bias) and input-gradient layouts, NF4 tiled matmul and input
    gradient plain and LoRA-fused, bf16 and float32 (IEEE), the decode kernel's four row blocks with and
    without double quantization; the CI mode has every autotune config of the variant for the LoRA and
    NF4 tiled kernels in bf16 (float32: the fixed config)."""
    out = json.loads(_python(
        "import json, kernels_compile as kc\n"
        "from llmtune.kernels import _autotune as A\n"
        "import os\n"
        "jobs = kc.jobs('ci')\n"
        "os.environ['LLMTUNE_AUTOTUNE'] = '1'\n"
        "n_half, n_f32 = len(A.for_variant(A.matmul_configs(), False)), len(A.for_variant(A.matmul_configs(), True))\n"
        "n_half_nf4 = len(A.for_variant(A.matmul_configs(nf4=True), False))\n"
        "import torch\n"
        "cf = A.matmul_configs()\n"
        "f32 = lambda dt, ieee: [getattr(c, 'llmtune_fp32', False) for c in\n"
        "    A.prune_matmul(cf, {'M': 4096, 'a_ptr': torch.empty(1, dtype=dt)}, IEEE=ieee)]\n"
        "pruned = {'tf32': f32(torch.float32, False), 'ieee': f32(torch.float32, True), 'bf16': f32(torch.bfloat16, False)}\n"
        "print(json.dumps({'kernels': sorted(kc.kernels_in_modules()), 'n_half': n_half, 'n_f32': n_f32,\n"
        "  'n_half_nf4': n_half_nf4, 'pruned': pruned,\n"
        "  'jobs': [[j['kernel'], j['label'], j['consts'], j['cfg']] for j in jobs]}))"))
    jobs = out["jobs"]
    assert set(out["kernels"]) == {j[0] for j in jobs}
    assert {"_lora_mm_kernel", "_matmul_kernel", "_grad_input_kernel", "_decode_kernel", "_dequant_kernel",
            "_rms_fwd_kernel", "_rms_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
            "_ce_kernel"} <= set(out["kernels"])
    labels = {j[1] for j in jobs}
    for want in ("lora fwd bias=False r<=16 bf16", "lora fwd bias=True r<=16 bf16", "lora dx bias=False r<=16 bf16",
                 "lora fwd bias=True r<=16 fp32 ieee", "nf4 matmul bias=False plain bf16",
                 "nf4 matmul bias=True lora=True r<=16 bf16", "nf4 grad_input lora=True r<=16 bf16",
                 "nf4 grad_input plain fp32 ieee"):
        assert want in labels, want
    for label in ("lora fwd bias=True r<=16 bf16", "lora dx bias=False r<=16 bf16",
                  "nf4 matmul bias=True lora=True r<=16 bf16", "nf4 grad_input lora=True r<=16 bf16"):
        configs = {json.dumps(j[3], sort_keys=True) for j in jobs if j[1] == label}
        assert len(configs) == (out["n_half_nf4"] if "nf4" in label else out["n_half"]) >= 4, label
    assert out["n_f32"] >= 1
    # float32 operands (IEEE products or TF32) launch only the float32 configs, bf16 only the others
    assert all(out["pruned"]["tf32"]) and all(out["pruned"]["ieee"]) and not any(out["pruned"]["bf16"])
    assert out["pruned"]["bf16"] and out["pruned"]["tf32"]
    decode = {(j[2]["BM"], j[2]["NESTED"]) for j in jobs if j[0] == "_decode_kernel"}
    assert decode == {(bm, nested) for bm in (1, 2, 4, 16) for nested in (False, True)}


def test_compile_check_sm80_sm90(tmp_path):
    """``benchmarks/kernels_compile.py --mode ci --cc 80,90``: no errors, zero spills in the training-step
    kernels and the decode kernel, shared memory under each target's limit, for every Triton version."""
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path / "kc.json"
    extra = os.environ.get("LLMTUNE_EXTRA_TRITON", "")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "ci", "--cc", "80,90", "--jobs", "2",
                           "--triton-dirs", extra, "--out", str(out)], env=_env(), capture_output=True, text=True,
                          timeout=1500)
    summary = proc.stdout[proc.stdout.find("| triton | target | kernel | compiled"):]
    print(summary)  # the per-kernel table (registers, stack, shared memory, compile seconds) in the test log
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["not_covered"] == []
    errors = [(r["triton"], r["what"], r.get("error")) for r in rows if "error" in r]
    assert not errors, errors
    spills = [(r["triton"], r["cc"], r["what"], r["config"], r["num_warps"], r.get("stack"))
              for r in rows if r["spills"]]  # every kernel is a training-step kernel or the decode kernel
    assert not spills, spills
    assert all(r["shared_bytes"] <= LIMITS[r["cc"]] for r in rows)
    versions = {r["triton"] for r in rows}
    assert len(versions) == 1 + len([d for d in extra.split(",") if d]), versions
    assert {r["cc"] for r in rows} == {80, 90}
    assert proc.returncode == 0, summary
