"""The README's Python snippet runs as written (the model path substituted), from the repository root."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    """The first ```python block under '## The Python API' in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The Python API"):]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README.md: no python block under '## The Python API'"
    return m.group(1)


def test_snippet_names_only_what_exists():
    code = readme_snippet()
    compile(code, "README.md", "exec")
    assert '"..."' not in code and 'MODEL = "' in code
    dirs = re.findall(r'"dataset_dir": "([^"]+)"', code)
    assert dirs and all((REPO / d / "dataset_info.json").is_file() for d in dirs)


@pytest.mark.real
@pytest.mark.slow
def test_readme_snippet_runs(real_model_path, tmp_path, monkeypatch, capsys):
    code = readme_snippet()
    code = re.sub(r'MODEL = "[^"]*"', f"MODEL = {str(real_model_path)!r}", code, count=1)
    out = tmp_path / "api-demo"
    code = code.replace('"runs/api-demo"', repr(str(out)))
    monkeypatch.chdir(REPO)  # the snippet's dataset_dir is relative to the repository root
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (out / "adapter_model.safetensors").is_file()
    loss = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert loss == pytest.approx(json.loads((out / "train_results.json").read_text())["train_loss"])
