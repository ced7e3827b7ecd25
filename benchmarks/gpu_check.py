"""The prepared GPU check (issue 23): returns something whatever happens, in under 5 minutes on one GPU.

Needs only torch, triton, transformers and peft (no pytest, no network); ``benchmarks/gpu_check.sh``
installs llmtune from the checkout first. Each section runs in its own Python process with its own time
cap (a hang, a CUDA fault or a crash ends that section only), writes ``<out>/<section>.json`` as it goes
(so a section killed at its cap or a run killed at the machine's limit still returns what finished), and
records a failure's traceback tail in its JSON. ``<out>/summary.json`` (environment, every section's
status, the issue's targets, the table printed at the end) is rewritten after each section. At most
8 files land in ``<out>`` (``$OUT`` when set, else ``benchmarks/results/gpu/``).

Sections (in run order; cap in seconds on a GPU; all models random-init of public shapes):

* ``env`` (merged into summary.json): versions, GPU name, capability, memory, SMs, ``varlen_attn``'s
  signature, ``torch._grouped_mm`` presence.
* ``train_packed`` (60): one packed multi-row padding-free GQA batch (rows of segments of different
  lengths) through LoRA, QLoRA and full fine-tuning in bf16 and fp16, two optimizer steps each: tokens/s,
  peak memory, finite losses, ``varlen_attn`` calls (the path that crashed on torch 2.11); and LoRA bf16
  on a padded batch (spans that do not tile it).
* ``kernels`` (45): every Triton kernel against its PyTorch reference (float64) on small shapes, about
  20 compilations with fixed tile configs (``LLMTUNE_AUTOTUNE=0``; ``LLMTUNE_NF4_PATH=tiled``, so the
  tiled input-gradient kernel is the one checked).
* ``nf4_decode`` (35): NF4 decode at M = 1, 2, 4, 8, 16 vs bf16 (and bitsandbytes when it imports);
  dequantization bandwidth vs a device copy.
* ``lora_vs_hf`` (30): LoRA tokens/s, llmtune vs transformers+peft, Llama-3.1-8B shape cut to 8 layers.
* ``qlora_8b`` (40): 8B-shaped QLoRA peak memory at 1024 tokens (2 and 4 layers extrapolated; 32 measured
  when the cap allows).
* ``nf4_paths`` (35): tiled NF4 vs dequantize + cuBLAS at training shapes: the table the NF4 training
  path reads (``nf4_paths.json``, a valid ``kernels/nf4_paths.json``; format in ``gpu_check_kernels.py``).
* ``moe`` (25): Qwen3-30B-A3B-shaped experts, grouped vs loop, and LoRA / full steps.

A section that finishes early leaves its time to the later ones; the run stops starting sections when
``--budget`` (285 s) is spent (a section started late is killed at the budget's end), so with the
install of ``gpu_check.sh`` (10-20 s) the run takes at most about 5 minutes.

``--dry-run``: every section's code on tiny shapes on the CPU (kernels in Triton's interpreter, the rest
through the PyTorch references), about a minute; CI runs it (``tests/test_kernels_gpu_check.py``).

Usage: ``bash benchmarks/gpu_check.sh`` or ``python benchmarks/gpu_check.py [--dry-run] [--out DIR]
[--sections a,b] [--budget S]``. Internal: ``--child NAME --cap S`` runs one section in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

#: (name, "module:function" or None for env, cap in seconds on a GPU, extra environment)
SECTIONS: list[tuple[str, Optional[str], float, dict]] = [
    ("env", None, 15, {}),
    ("train_packed", "gpu_check_train:section_train_packed", 60, {"LLMTUNE_AUTOTUNE": "0"}),
    ("kernels", "gpu_check_kernels:section_kernels", 45, {"LLMTUNE_AUTOTUNE": "0", "LLMTUNE_NF4_PATH": "tiled"}),
    ("nf4_decode", "gpu_check_kernels:section_nf4_decode", 35, {}),
    ("lora_vs_hf", "gpu_check_train:section_lora_vs_hf", 30, {}),
    ("qlora_8b", "gpu_check_train:section_qlora_8b", 40, {"LLMTUNE_AUTOTUNE": "0"}),
    ("nf4_paths", "gpu_check_kernels:section_nf4_paths", 35, {"LLMTUNE_NF4_PATH": "tiled"}),
    ("moe", "gpu_check_train:section_moe", 25, {}),
]
CHILD_START_S = 20.0  # allowance for a child's imports and CUDA start on top of its cap
DRY_CAP_S = 90.0      # a dry-run section's kill limit (its soft cap is not applied: every path runs)


# ----------------------------------------------------------------------------------------------------
# child side
# ----------------------------------------------------------------------------------------------------

def section_env(sec) -> None:
    """Versions and the device: what every other number depends on."""
    import importlib
    import inspect
    import platform
    from importlib import metadata

    import torch

    r = sec.result
    r["python"] = platform.python_version()
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes"):
        try:
            r[name] = metadata.version(name)
        except Exception:  # noqa: BLE001 (absent is an answer)
            r[name] = None
    r["torch_cuda"] = torch.version.cuda
    import llmtune

    r["llmtune_path"] = str(Path(llmtune.__file__).parent)
    try:
        r["llmtune_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        r["llmtune_commit"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        r.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(0)),
                 gpu_memory_gb=round(p.total_memory / 1e9, 2), sms=p.multi_processor_count)
    else:
        r["gpu"] = None
    try:
        varlen = importlib.import_module("torch.nn.attention.varlen")
        r["varlen_attn_signature"] = str(inspect.signature(varlen.varlen_attn))
    except Exception as e:  # noqa: BLE001
        r["varlen_attn_signature"] = f"unavailable ({type(e).__name__})"
    r["grouped_mm"] = hasattr(torch, "_grouped_mm")
    from llmtune.kernels import triton_available

    r["triton_available"] = triton_available()
    r["status"] = "ok"


def run_child(name: str, out: Path, cap: float, dry: bool) -> int:
    """Run section ``name`` in this process; its JSON holds the result or the error. Returns 0."""
    from gpu_check_common import Section, error_info

    spec = dict((s[0], s[1]) for s in SECTIONS)[name]
    sec = Section(name, out, cap, dry)
    try:
        if spec is None:
            section_env(sec)
        else:
            import importlib

            mod, fn = spec.split(":")
            getattr(importlib.import_module(mod), fn)(sec)
        if sec.result.get("status") == "running":
            sec.result["status"] = "ok"
        if sec.result["status"] == "ok" and sec.result.get("skipped"):
            sec.result["status"] = "partial"
        if sec.result["status"] != "ok" and "error" not in sec.result:  # the first failed row, for the summary
            for rows in (v for v in sec.result.values() if isinstance(v, list)):
                bad = [r for r in rows if isinstance(r, dict) and r.get("error")]
                if bad:
                    sec.result["error"] = f"{len(bad)} failed, first: {bad[0]['error']}"[:600]
                    break
    except BaseException as e:  # noqa: BLE001 (recorded; the parent reads the JSON)
        sec.result.update(status="error", **error_info(e))
    sec.save()
    return 0


# ----------------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------------

def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def launch(name: str, out: Path, cap: float, timeout: float, dry: bool, extra_env: dict,
           cmd: Optional[list] = None) -> dict:
    """Run one section in a child process (its own process group, killed at ``timeout`` seconds) and
    return its JSON, completed with ``status`` ``timeout``/``crashed`` and the output's tail when the
    child did not finish; the JSON file is rewritten with that. ``cmd`` replaces the child command (tests)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
    if dry and name == "kernels":
        env.update(TRITON_INTERPRET="1", LLMTUNE_FORCE_TRITON="1")
    cmd = cmd or [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out),
                  "--cap", str(cap)] + (["--dry-run"] if dry else [])
    path = out / f"{name}.json"
    path.unlink(missing_ok=True)  # an earlier run's file must not pass for this one's
    fd, log_name = tempfile.mkstemp(prefix=f"gpu_check_{name}_", suffix=".log")
    log = Path(log_name)
    t0 = time.monotonic()
    status = None
    with os.fdopen(fd, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child and any compiler it started
            rc = proc.wait()
            status = "timeout"
    path.with_suffix(".tmp").unlink(missing_ok=True)  # a write the kill interrupted: not a 9th file
    res = _load(path) or {"section": name}
    if status is None and (rc != 0 or res.get("status") in (None, "running")):
        status = "crashed"
    if status:
        res.update(status=status, returncode=rc, killed_after_s=round(time.monotonic() - t0, 1) if status ==
                   "timeout" else None, log_tail=_tail(log)[-3000:])
        path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    res["wall_s"] = round(time.monotonic() - t0, 1)
    text = _tail(log, 12)
    if text:
        print("\n".join(f"    {line}" for line in text.splitlines()), flush=True)
    log.unlink(missing_ok=True)
    return res


def targets(res: dict) -> list[dict]:
    """The issue's four targets read off the section results (``value`` None where not measured)."""
    def t(name, value, ok, basis):
        return {"target": name, "value": value, "met": None if value is None else ok(value), "basis": basis}

    hf = res.get("lora_vs_hf", {})
    q = res.get("qlora_8b", {})
    q_val, q_basis = q.get("measured_peak_gb"), "measured, all 32 layers"
    if q_val is None:
        q_val, q_basis = q.get("extrapolated_peak_gb"), "extrapolated from 2 and 4 layers"
    if q_val is None:
        q_basis = "not measured"
    dec = res.get("nf4_decode", {})
    m1 = dec.get("per_M", {}).get("1", {})
    return [
        t("LoRA step >= 1.8x transformers+peft tokens/s", hf.get("ratio"), lambda v: v >= 1.8,
          f"Llama-3.1-8B shape, {hf.get('layers')} of 32 layers, {hf.get('seq')} tokens"),
        t("8B QLoRA step at 1024 tokens <= 6 GB peak", q_val, lambda v: v <= 6.0, q_basis),
        t("NF4 decode (M=1) >= 2.5x bf16", m1.get("layer_speedup"), lambda v: v >= 2.5,
          "one Llama-3.1-8B layer's 7 projections, Linear4bit forward vs bf16 F.linear"),
        t("NF4 dequantize >= 80% of copy bandwidth", dec.get("dequant_fraction_of_copy"), lambda v: v >= 0.8,
          "smallest over 8B shapes of >= 16M weights"),
    ]


def render(summary: dict, res: dict) -> str:
    """The markdown report printed at the end (also kept in summary.json as ``table``)."""
    env = summary.get("env", {})
    lines = [f"GPU check: {env.get('gpu') or 'cpu (dry run)'}; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}, peft {env.get('peft')}; {summary.get('elapsed_s')} s", "",
             "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, s in summary["sections"].items():
        lines.append(f"| {name} | {s.get('status')} | {s.get('wall_s')} | {str(s.get('error') or '')[:90]} |")
    runs = res.get("train_packed", {}).get("runs", [])
    if runs:
        lines += ["", "| step | dtype | batch | status | tokens/s | peak GB | losses | varlen calls |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r.get('method')} | {r.get('dtype')} | {r.get('batch')} | {r.get('status')} | "
                         f"{r.get('tokens_per_s')} | {r.get('peak_gb')} | {r.get('losses')} | "
                         f"{(r.get('varlen_attn') or {}).get('calls')} |")
    lines += ["", "| target | value | met | basis |", "|---|---|---|---|"]
    for t in summary.get("targets", []):
        lines.append(f"| {t['target']} | {t['value']} | {t['met']} | {t['basis']} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, every section's code path")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results/gpu)")
    ap.add_argument("--sections", default=None, help="comma list of sections to run (default: all)")
    ap.add_argument("--budget", type=float, default=285.0, help="seconds for the whole run (default 285)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return run_child(args.child, out, args.cap, args.dry_run)
    names = [s[0] for s in SECTIONS]
    wanted = names if not args.sections else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"gpu_check: unknown section(s) {unknown}; choose from {', '.join(names)} (--sections)",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    summary: dict[str, Any] = {"format": "llmtune.gpu_check/1", "dry_run": args.dry_run, "budget_s": args.budget,
                               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": {}}
    results: dict[str, dict] = {}

    def save() -> None:
        summary["elapsed_s"] = round(time.monotonic() - start, 1)
        summary["targets"] = targets(results)
        summary["table"] = render(summary, results)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")

    save()
    for name, _, cap, extra in SECTIONS:
        if name not in wanted:
            continue
        left = args.budget - (time.monotonic() - start)
        if not args.dry_run and left < 10:
            summary["sections"][name] = {"status": "skipped", "error": f"time budget ({left:.0f} s left)"}
            save()
            continue
        timeout = DRY_CAP_S if args.dry_run else min(cap + CHILD_START_S, left)
        print(f"gpu_check: {name} (cap {cap:.0f} s, killed at {timeout:.0f} s; {left:.0f} s of the budget left)",
              flush=True)
        try:
            res = launch(name, out, cap, timeout, args.dry_run, extra)
        except Exception as e:  # noqa: BLE001 (the parent itself failed to run it: record, go on)
            res = {"section": name, "status": "crashed", "error": f"launch failed: {type(e).__name__}: {e}"}
        results[name] = res
        summary["sections"][name] = {"status": res.get("status"), "wall_s": res.get("wall_s"),
                                     "file": None if name == "env" else f"{name}.json",
                                     "error": res.get("error") or res.get("failed_checks") or None}
        if name == "env":
            summary["env"] = {k: v for k, v in res.items() if k not in ("section", "cap_s", "dry_run")}
            (out / "env.json").unlink(missing_ok=True)  # kept in summary.json: 8 files at most under $OUT
            if not args.dry_run and res.get("status") == "ok" and not res.get("gpu"):
                print("gpu_check: no CUDA device; running the dry run instead (tiny shapes on the CPU)")
                args.dry_run = summary["dry_run"] = True
                summary["note"] = "no CUDA device was found: the sections ran as in --dry-run"
        save()
    print("\n" + summary["table"])
    print(f"\ngpu_check: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
