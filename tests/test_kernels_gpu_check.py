"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end in its CPU dry run, so it is known to
work before it meets a GPU: every section's code runs (kernels in Triton's interpreter), each section's
JSON has its documented fields, at most 8 files are written, and a section that hangs, crashes or raises
is recorded while the others still run. (Timings of a dry run mean nothing; nothing here asserts on them.)"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
SECTION_FILES = {"train_packed", "kernels", "nf4_decode", "lora_vs_hf", "qlora_8b", "moe", "nf4_paths"}


def _module():
    if str(_DIR) not in sys.path:
        sys.path.insert(0, str(_DIR))
    spec = importlib.util.spec_from_file_location("gpu_check", _DIR / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry")
    assert _module().main(["--dry-run", "--out", str(out)]) == 0
    return out, {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def test_dry_run_files_and_summary(dry_run):
    out, res = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and set(res) == SECTION_FILES | {"summary"}, files
    s = res["summary"]
    assert s["format"] == "llmtune.gpu_check/1" and s["dry_run"] is True
    assert set(s["sections"]) == SECTION_FILES | {"env"}
    assert {k: v["status"] for k, v in s["sections"].items()} == {k: "ok" for k in s["sections"]}, \
        {k: res.get(k, {}).get("error") or res.get(k, {}).get("failed_checks") for k in SECTION_FILES}
    env = s["env"]
    assert env["torch"] and env["python"] and env["gpu"] is None and "triton_available" in env
    assert [t["target"][:8] for t in s["targets"]] == ["LoRA ste", "8B QLoRA", "NF4 deco", "NF4 dequ"]
    assert all({"value", "met", "basis"} <= set(t) for t in s["targets"])
    assert "| train_packed | ok |" in s["table"]


def test_dry_run_packed_training(dry_run):
    res = dry_run[1]["train_packed"]
    runs = res["runs"]
    assert {(r["method"], r["dtype"], r["batch"]) for r in runs} == {
        (m, d, "packed") for m in ("lora", "qlora", "full") for d in ("bfloat16", "float16")} | {
        ("lora", "bfloat16", "padded")}
    seg, padded = res["segments"], res["padded_segments"]
    assert len(seg) >= 2 and len({len(r) for r in seg}) > 1  # several rows, with different segment counts
    assert len({sum(r) for r in padded}) > 1  # the padded batch's rows differ in length
    for r in runs:
        want = sum(map(sum, seg if r["batch"] == "packed" else padded))  # real tokens, padding not counted
        assert r["status"] == "ok" and r["finite"] and r["tokens"] == want, r
        assert abs(r["losses"][0] - math.log(256)) < 0.5, r  # random init: about ln(vocab) on random tokens


def test_dry_run_kernel_checks(dry_run):
    k = dry_run[1]["kernels"]
    assert k["triton"] is True and k["failed_checks"] == []
    names = {(c["kernel"].split(" ")[0], c["dtype"]) for c in k["checks"]}
    for name in ("rms_norm", "apply_rope", "swiglu", "fused_linear_cross_entropy", "dequantize_4bit",
                 "matmul_4bit", "matmul_4bit_tiled", "matmul_4bit_grad_input", "lora_linear_4bit", "lora_linear"):
        assert (name, "bfloat16") in names, name
    for c in k["checks"]:
        assert c["path"] == "triton" and c["ok"] and max(c["errors"].values()) <= c["tol"], c
    assert any(n.startswith("grad") for c in k["checks"] for n in c["errors"])  # backward passes checked


def test_dry_run_nf4_sections(dry_run):
    dec = dry_run[1]["nf4_decode"]
    assert {r["M"] for r in dec["decode"]} == {1, 2, 4, 8, 16}
    assert all(r["status"] == "ok" and r["max_rel_err"] < 3e-2 for r in dec["decode"] + dec["dequant"])
    assert set(dec["per_M"]) == {"1", "2", "4", "8", "16"} and dec["dequant_fraction_of_copy"] is not None
    table = dry_run[1]["nf4_paths"]
    assert table["measured"] is False and table["default"] == "dequant" and table["blocksize"] == 64
    assert {r["op"] for r in table["entries"]} == {"forward", "grad_input"}
    assert len(table["entries"]) == len(table["rows"])
    for r in table["entries"]:
        assert {"m_bucket", "n", "k", "tiled_ms", "dequant_ms"} <= set(r)
        assert r["path"] == ("tiled" if r["tiled_ms"] < r["dequant_ms"] else "dequant")
    from llmtune.kernels import nf4

    if hasattr(nf4, "load_path_table"):  # the NF4 training path reads the file as it is
        assert nf4.load_path_table(dry_run[0] / "nf4_paths.json")["entries"] == table["entries"]


def test_dry_run_models(dry_run):
    res = dry_run[1]
    hf = res["lora_vs_hf"]
    assert {r["impl"] for r in hf["runs"]} == {"llmtune", "transformers+peft"} and hf["ratio"] > 0
    q = res["qlora_8b"]
    assert [r["layers"] for r in q["runs"]] == [1, 2, 3] and all(r["finite"] for r in q["runs"])
    moe = res["moe"]
    grouped, *steps = moe["runs"]
    assert grouped["ok"] and grouped["grouped_mm"]["available"] in (True, False)
    assert [r["run"] for r in steps] == ["lora step (bf16)", "full_lowp step (bf16)"]
    assert all(r["status"] == "ok" and r["loss_plausible"] for r in steps)


def test_launch_records_timeout_and_crash(tmp_path):
    """A hanging child is killed at its limit and a crashing one recorded, each with its output's tail,
    keeping what the child had written."""
    gc = _module()
    (tmp_path / "hang.json").write_text(json.dumps({"section": "hang", "status": "ok"}))  # an earlier run's
    child = ("import json, sys, time; open(sys.argv[1], 'w').write(json.dumps({'status': 'running', 'rows': [1]}));"
             "print('started', flush=True); time.sleep(60)")
    res = gc.launch("hang", tmp_path, 1, 3, False, {}, cmd=[sys.executable, "-c", child, str(tmp_path / "hang.json")])
    assert res["status"] == "timeout" and res["rows"] == [1] and "started" in res["log_tail"]
    assert json.loads((tmp_path / "hang.json").read_text())["status"] == "timeout"
    res = gc.launch("boom", tmp_path, 1, 30, False, {}, cmd=[sys.executable, "-c", "raise SystemExit('died here')"])
    assert res["status"] == "crashed" and res["returncode"] == 1 and "died here" in res["log_tail"]
    assert json.loads((tmp_path / "boom.json").read_text())["status"] == "crashed"


def test_section_exception_is_recorded(tmp_path, monkeypatch):
    """A section that raises leaves ``status: error`` with the message and the traceback's last lines."""
    gc = _module()
    import gpu_check_kernels

    def planted(sec):
        sec.result["rows"] = ["kept"]
        raise RuntimeError("planted failure")
    monkeypatch.setattr(gpu_check_kernels, "section_nf4_paths", planted)
    assert gc.run_child("nf4_paths", tmp_path, 10, True) == 0
    res = json.loads((tmp_path / "nf4_paths.json").read_text())
    assert res["status"] == "error" and "planted failure" in res["error"] and res["rows"] == ["kept"]
    assert "planted" in res["traceback"]


def test_budget_skips_sections_and_targets_from_gpu_results(tmp_path):
    gc = _module()
    assert gc.main(["--budget", "0", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert {v["status"] for v in s["sections"].values()} == {"skipped"}
    res = {"lora_vs_hf": {"ratio": 2.1, "layers": 8, "seq": 2048},
           "qlora_8b": {"extrapolated_peak_gb": 6.4},
           "nf4_decode": {"per_M": {"1": {"layer_speedup": 2.6}}, "dequant_fraction_of_copy": 0.7}}
    t = {x["target"][:8]: x for x in gc.targets(res)}
    assert t["LoRA ste"]["met"] is True and t["NF4 deco"]["met"] is True and t["NF4 dequ"]["met"] is False
    assert t["8B QLoRA"]["met"] is False and "extrapolated" in t["8B QLoRA"]["basis"]
    res["qlora_8b"]["measured_peak_gb"] = 5.9
    assert gc.targets(res)[1]["value"] == 5.9 and gc.targets(res)[1]["met"] is True


def test_packed_section_catches_an_attention_crash(tmp_path, monkeypatch):
    """The packed-batch section is what catches a crash in attention (as torch 2.11's ``varlen_attn``
    refusing ``enable_gqa``): planted in the attention call the packed batch makes, every run is recorded
    with the error and its traceback and the section fails."""
    _module()
    import gpu_check_train
    import torch.nn.functional as F
    from gpu_check_common import Section

    def crash(*a, **k):
        raise TypeError("varlen_attn() got an unexpected keyword argument 'enable_gqa'")
    monkeypatch.setattr(F, "scaled_dot_product_attention", crash)
    sec = Section("train_packed", tmp_path, 60, True)
    gpu_check_train.section_train_packed(sec)
    sec.save()  # as run_child does after the section returns
    res = json.loads((tmp_path / "train_packed.json").read_text())
    assert res["status"] == "failed" and len(res["runs"]) == 7
    for r in res["runs"]:
        assert r["status"] == "error" and "enable_gqa" in r["error"] and "crash" in r["traceback"]
