"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end in its CPU dry run, so it is known to
work before it meets a GPU: every section produces results, the JSON has the documented layout, and the
table renders. (Timings of a dry run mean nothing; nothing here asserts on them.)"""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_dry_run(tmp_path, capsys):
    gc = _module()
    out = tmp_path / "gpu.json"
    assert gc.main(["--dry-run", "--budget", "900", "--out", str(out), "--copy-to", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "gpu.json").exists() and "### Targets" in (tmp_path / "copy" / "gpu.md").read_text()
    res = json.loads(out.read_text())
    assert res["meta"]["dry_run"] is True
    kt = res["kernel_tests"]
    assert kt["status"] == "ok" and kt["collected"] and kt["collected"] >= 20, kt.get("tail")
    nf = res["nf4"]
    assert nf["status"] == "ok", nf
    assert {(r["shape"][:5], r["pass"]) for r in nf["lora"]} == {(k, p) for k in ("LoRA ", "QLoRA")
                                                                for p in ("forward", "forward+backward")}, nf["lora"]
    assert {r["M"] for r in nf["matmul"]} >= {1, 2, 4, 8, 16}
    tr = res["train"]
    ok = [r for r in tr["runs"] if r["status"] == "ok"]
    assert len(ok) == len(tr["runs"]), [r for r in tr["runs"] if r["status"] != "ok"]
    kinds = {(r["model"], r["impl"], r["method"]) for r in ok}
    for model in ("Llama-3.1-8B", "Qwen3-8B"):
        assert {(model, "llmtune", "lora"), (model, "transformers+peft", "lora"), (model, "llmtune", "qlora")} <= kinds
    assert all(r["loss"] == r["loss"] and 4.0 < r["loss"] < 7.0 for r in ok)  # ~ln(256) on random tokens
    assert tr["ratios"] and {t["target"][:4] for t in res["targets"]} == {"LoRA", "8B Q", "NF4 "}
    printed = capsys.readouterr().out
    assert "### Training steps" in printed and "### Targets" in printed


def test_gpu_check_guards_a_failing_section(tmp_path, monkeypatch):
    """One section raising is recorded and the others still run and are saved."""
    gc = _module()

    def boom(*a, **k):
        raise RuntimeError("planted failure")
    monkeypatch.setattr(gc, "section_nf4", boom)
    monkeypatch.setattr(gc, "section_kernel_tests", lambda dry, budget: {"status": "ok", "passed": 1})
    out = tmp_path / "gpu.json"
    assert gc.main(["--dry-run", "--sections", "nf4,tests", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["nf4"]["status"] == "error" and "planted failure" in res["nf4"]["error"]
    assert res["kernel_tests"]["status"] == "ok"


def test_targets_and_table_from_gpu_shaped_results():
    """The GPU-only branches of the report (peak memory, cut layers, met/unmet targets) on a hand-made result."""
    gc = _module()
    run = {"model": "Llama-3.1-8B", "method": "lora", "layers": 32, "full_layers": 32, "seq": 1024, "status": "ok",
           "step_ms": 500.0, "loss": 12.0}
    res = {"meta": {"device": "NVIDIA H200", "dry_run": False},
           "nf4": {"status": "ok", "copy_GBps": 4000.0, "path": "triton",
                   "dequant": [{"shape": "s", "ms": 0.1, "GBps": 3400.0, "fraction_of_copy": 0.85, "max_rel_err": 0.0}],
                   "matmul": [{"shape": "s", "M": 1, "nf4_ms": 0.01, "bf16_ms": 0.03, "speedup_vs_bf16": 3.0,
                               "max_rel_err": 1e-3}], "grad_input": []},
           "train": {"status": "ok", "notes": [], "runs": [
               {**run, "impl": "llmtune", "kernels": True, "tokens_per_s": 4000.0, "peak_GiB": 20.0},
               {**run, "impl": "transformers+peft", "kernels": None, "tokens_per_s": 2000.0, "peak_GiB": 25.0},
               {**run, "impl": "llmtune", "method": "qlora", "kernels": True, "tokens_per_s": 1500.0,
                "peak_GiB": 5.0},
               {**run, "model": "Qwen3-8B", "layers": 9, "full_layers": 36, "impl": "llmtune", "kernels": False,
                "tokens_per_s": 3000.0, "peak_GiB": 9.0},
               {"model": "Qwen3-8B", "impl": "transformers+peft", "method": "lora", "status": "skipped",
                "reason": "time budget"}]}}
    res["train"]["ratios"] = [{"model": "Llama-3.1-8B", "method": "lora", "seq": 1024, "layers": 32,
                               "speedup_vs_hf_lora": 2.0}]
    res["targets"] = gc.targets(res)
    met = {t["target"][:4]: (t["value"], t["met"]) for t in res["targets"]}
    assert met["LoRA"] == (2.0, True)
    assert met["8B Q"][1] is True and abs(met["8B Q"][0] - 5.0 * 2**30 / 1e9) < 0.01  # GiB reported as GB
    assert res["targets"][2]["met"] is True and res["targets"][3]["met"] is True
    table = gc.render(res)
    assert "9/36" in table and "(kernels off)" in table and "skipped: time budget" in table
