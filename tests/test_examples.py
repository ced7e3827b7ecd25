"""The examples run from a fresh clone (issue 25, new-user trial item 1 and 2).

A fresh clone has no ``../shared``: every example YAML and ``examples/*.py`` must read the model the README's
main job puts at ``examples/models/`` (``examples/fetch_model.sh``) and data the repository ships
(``examples/data``), with paths relative to the repository root. The config checks need nothing but the
repository; the runs (``real``) copy ``examples/`` into an empty folder (a stand-in for the fresh clone: no
``../shared`` beside it), link the real model there with ``examples/fetch_model.sh PATH`` (what the main job
does after its PyPI fetch) and train each chosen example for 2 steps from that folder. Reference: the issue's
report (``model_name_or_path '../shared/models/...': no such file or folder``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXAMPLE_MODEL = "examples/models/SmolLM2-135M-Instruct.Q4_1.gguf"
YAMLS = sorted(EXAMPLES.glob("*.yaml"))
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
#: examples whose model is a Hub id (too large for a CPU test; the config and data are still checked)
HUB_MODEL_EXAMPLES = {"vlm_lora.yaml": "Qwen/Qwen2.5-VL-3B-Instruct"}
#: examples given their model and output folder as flags (examples/main_job.sh)
FLAG_MODEL_EXAMPLES = {"identity_lora.yaml"}


def _tracked() -> set[str] | None:
    """Files git tracks or would add (untracked, not ignored): what a clone of this commit holds."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


TRACKED = _tracked()


def _in_clone(rel: str) -> None:
    """``rel`` (relative to the repository root) exists and would be in a clone."""
    path = REPO / rel
    assert path.exists(), f"{rel}: no such file or folder in the repository"
    assert ".." not in Path(rel).parts and "shared" not in Path(rel).parts, rel
    if TRACKED is not None and path.is_file():
        assert rel in TRACKED, f"{rel} is ignored by git: a fresh clone would not have it"


def _check_dataset(dataset_dir: str, names: str) -> list[str]:
    _in_clone(f"{dataset_dir}/dataset_info.json")
    info = json.loads((REPO / dataset_dir / "dataset_info.json").read_text())
    files = []
    for name in names.split(","):
        assert name.strip() in info, f"{dataset_dir}/dataset_info.json has no dataset {name!r}"
        files.append(f"{dataset_dir}/{info[name.strip()]['file_name']}")
        _in_clone(files[-1])
    return files


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_every_example_yaml_resolves_from_the_repository_root(path):
    from llmtune.config import parse_config
    from llmtune.config.parse import read_config_file

    raw = read_config_file(path)
    for key, value in raw.items():
        assert "../" not in str(value) and "shared/" not in str(value), f"{path.name}: {key}: {value}"
    extra = ["--model_name_or_path", EXAMPLE_MODEL, "--output_dir", "runs/x"] if path.name in FLAG_MODEL_EXAMPLES else []
    cfg = parse_config([str(path), *extra], command="train")
    if path.name in HUB_MODEL_EXAMPLES:
        assert cfg.model_name_or_path == HUB_MODEL_EXAMPLES[path.name]
    else:
        assert cfg.model_name_or_path == EXAMPLE_MODEL, f"{path.name}: the model must be the main job's"
    _check_dataset(cfg.dataset_dir, cfg.dataset)
    for spec in str(cfg.reward_funcs or "").split(","):
        if spec.strip():
            _in_clone(spec.split(":")[0].strip())
    if cfg.reward_model:   # the output of another example (ppo_lora reads rm_lora's)
        outputs = {read_config_file(p).get("output_dir") for p in YAMLS}
        assert cfg.reward_model in outputs, f"{path.name}: reward_model {cfg.reward_model} is no example's output"


def test_the_model_path_is_where_the_main_job_puts_it():
    """examples/main_job.sh runs examples/fetch_model.sh, which links the model at EXAMPLE_MODEL; git ignores it."""
    fetch = (EXAMPLES / "fetch_model.sh").read_text()
    assert f'DEST="{EXAMPLE_MODEL}"' in fetch
    assert "bash examples/fetch_model.sh" in (EXAMPLES / "main_job.sh").read_text()
    if TRACKED is not None:
        assert EXAMPLE_MODEL not in TRACKED and "examples/models/.gitignore" in TRACKED


def _constants(path: Path) -> dict[str, str]:
    """Module-level string constants and the string values of ``model_name_or_path``/``dataset_dir`` keys."""
    tree = ast.parse(path.read_text())
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    found[t.id] = node.value.value
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                    found[k.value] = v.value
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_example_script_reads_the_main_jobs_model_and_shipped_data(path):
    text = path.read_text()
    assert "../shared" not in text, path.name
    const = _constants(path)
    model = const.get("MODEL", const.get("model_name_or_path"))
    if model is not None:
        assert model == EXAMPLE_MODEL, f"{path.name}: MODEL {model}"
    if "DATA" in const:
        assert const["DATA"] == "examples/data"
        for name in re.findall(r'"dataset": "([\w,]+)"', text):
            _check_dataset("examples/data", name)


def test_the_shipped_demo_data_is_small():
    """The cut LLaMA-Factory demo files stay under 1 MB together (examples/data/README.md lists them)."""
    files = ["alpaca_en_demo.json", "dpo_en_demo.json", "kto_en_demo.json", "c4_demo.jsonl"]
    assert sum((EXAMPLES / "data" / f).stat().st_size for f in files) < 2 ** 20
    readme = (EXAMPLES / "data" / "README.md").read_text()
    assert all(f"`{f}`" in readme for f in files)


def _readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_snippet_reads_the_main_jobs_model():
    """It read MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf", a file no step of the README makes."""
    code = _readme_snippet()
    ast.parse(code)
    model = re.search(r'^MODEL = "([^"]+)"', code, re.M).group(1)
    assert model == EXAMPLE_MODEL
    assert '"dataset_dir": "examples/data"' in code and '"dataset": "identity"' in code
    _check_dataset("examples/data", "identity")


# -- runs from a stand-in fresh clone -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clone(tmp_path_factory, real_model_path):
    """examples/ copied into an empty folder, the real model linked by fetch_model.sh as the main job does."""
    root = tmp_path_factory.mktemp("fresh_clone")
    shutil.copytree(EXAMPLES, root / "examples", ignore=shutil.ignore_patterns("*.gguf", "__pycache__"))
    out = subprocess.run(["bash", "examples/fetch_model.sh", str(real_model_path)], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == EXAMPLE_MODEL, out.stderr
    assert (root / EXAMPLE_MODEL).resolve() == Path(real_model_path).resolve()
    return root


#: 2 steps each, from the clone's root; smaller batches and contexts than the recipes keep them to seconds each
#: (the keys that matter here, paths, stage, template, data, are the recipes' own)
RUNS = {
    "identity_lora.yaml": ["--model_name_or_path", EXAMPLE_MODEL],
    "train_pt_lora.yaml": [],
    "train_sft_lora.yaml": ["--val_size", "2", "--eval_steps", "2"],
    "dpo_lora.yaml": ["--val_size", "2", "--eval_steps", "2", "--per_device_eval_batch_size", "1"],
    "kto_lora.yaml": [],
    "grpo_lora.yaml": ["--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "4"],
    "grpo_tools.yaml": ["--num_generations", "2", "--per_device_train_batch_size", "2",
                        "--max_completion_length", "16"],
}
#: not run: train_sft_full.yaml (a full fine-tuning's optimizer state, 2.2 GB; its keys differ from
#: train_sft_lora.yaml's only in finetuning_type), vlm_lora.yaml (a 3B Hub model); rm_lora -> ppo_lora below


def _train(clone, name: str, *extra: str) -> Path:
    from llmtune.cli import main

    out = f"runs/test_{Path(name).stem}"
    argv = ["train", f"examples/{name}", "--max_steps", "2", "--output_dir", out, "--gradient_accumulation_steps", "1",
            "--cutoff_len", "64", "--per_device_train_batch_size", "1", "--save_strategy", "no",
            "--plot_loss", "false", "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", *extra]
    assert main(argv) == 0
    log = [json.loads(line) for line in (clone / out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in log if "loss" in r][-1] == 2
    return clone / out


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(RUNS))
def test_an_example_trains_two_steps_in_a_fresh_clone(name, clone, monkeypatch):
    monkeypatch.chdir(clone)
    out = _train(clone, name, *RUNS[name])
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.real
def test_the_reward_model_example_then_the_ppo_example_on_it(clone, monkeypatch):
    """ppo_lora.yaml reads rm_lora.yaml's output (reward_model: runs/rm_lora), here under the test's name."""
    monkeypatch.chdir(clone)
    rm = _train(clone, "rm_lora.yaml", "--val_size", "2", "--eval_steps", "2", "--per_device_eval_batch_size", "1")
    assert (rm / "value_head.safetensors").is_file()
    ppo = _train(clone, "ppo_lora.yaml", "--reward_model", str(rm.relative_to(clone)), "--max_new_tokens", "8")
    assert (ppo / "adapter_model.safetensors").is_file()


@pytest.mark.real
def test_the_readme_python_snippet_runs_as_pasted(clone):
    """The snippet, unchanged, in a subprocess from the clone's root after the main job's model fetch."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", _readme_snippet()], cwd=clone, capture_output=True, text=True,
                          timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = float(proc.stdout.strip().splitlines()[-1])
    assert 0 < loss < 20
    assert (clone / "runs" / "api-demo" / "adapter_model.safetensors").is_file()
