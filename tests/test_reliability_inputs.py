"""Table-driven bad inputs (issue 15): every one gives exit status 2, exactly one ``llmtune: error:`` line, no
traceback, and leaves every file the user had byte-for-byte unchanged (no new folder either).

The CLI cases run ``llmtune.cli.main([...])`` in-process (an import costs ~2 s per subprocess); a handful run
as true subprocesses at the end. Python-API cases assert an ``LLMTuneError`` (or ``ValueError``) with a
one-line message. Reference: the issue's own list of found problems; each case states the input it breaks.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from reliability_helpers import make_data_dir, make_model_folder, run_subprocess, train_args, tree_hash

BAD_UTF8 = b"\xff\xfe\xc3\x28"


# -- shared inputs (built once) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llmtune.cli import main

    root = tmp_path_factory.mktemp("world")
    model = make_model_folder(root / "model")
    data = make_data_dir(root / "data")
    adapter = root / "adapter"
    ckpt_run = root / "ckpt_run"
    with _quiet():
        assert main(train_args(model, data, adapter, max_steps=2)) == 0
        assert main(train_args(model, data, ckpt_run, max_steps=2, save_steps=2)) == 0
    return {"root": root, "model": model, "data": data, "adapter": adapter, "ckpt_run": ckpt_run}


class _quiet:
    def __enter__(self):
        self._err, self._out = sys.stderr, sys.stdout
        sys.stderr = sys.stdout = io.StringIO()

    def __exit__(self, *a):
        sys.stderr, sys.stdout = self._err, self._out


@dataclass
class Ctx:
    """What a case builder gets: the shared inputs and a private folder ``tmp`` for its copies."""
    world: dict
    tmp: Path
    monkeypatch: Any
    stdin: Optional[bytes] = None
    extra_watch: list = field(default_factory=list)

    def copy(self, key: str, name: Optional[str] = None) -> Path:
        dst = self.tmp / (name or key)
        shutil.copytree(self.world[key], dst)
        return dst

    @property
    def model(self):
        return self.world["model"]

    @property
    def data(self):
        return self.world["data"]

    @property
    def adapter(self):
        return self.world["adapter"]

    @property
    def out(self):
        return self.tmp / "out"

    def train(self, **kw) -> list[str]:
        kw.setdefault("model", self.model)
        kw.setdefault("data", self.data)
        kw.setdefault("out", self.out)
        return train_args(kw.pop("model"), kw.pop("data"), kw.pop("out"), **kw)

    def chat(self, *extra, model=None, stdin=b"hello\n") -> list[str]:
        self.stdin = stdin
        return ["chat", "--model_name_or_path", str(model or self.model), "--template", "chatml",
                "--max_new_tokens", "3", *map(str, extra)]

    def export(self, *extra, model=None, adapter=None, export_dir=None) -> list[str]:
        words = ["export", "--model_name_or_path", str(model or self.model),
                 "--export_dir", str(export_dir or self.tmp / "exported")]
        if adapter is not False:
            words += ["--adapter_name_or_path", str(adapter or self.adapter)]
        return words + list(map(str, extra))


# -- builders for broken copies ---------------------------------------------------------------------
def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def data_with(ctx: Ctx, file: str, content, info: Optional[dict] = None) -> Path:
    d = ctx.copy("data")
    _write(d / file, content)
    if info is not None:
        _write(d / "dataset_info.json", info)
    return d


def model_with(ctx: Ctx, file: str, content=None, remove: bool = False, truncate: Optional[float] = None,
               tokconfig: Optional[dict] = None) -> Path:
    m = ctx.copy("model")
    if remove:
        (m / file).unlink()
    elif truncate is not None:
        _truncate(m / file, truncate)
    elif tokconfig is not None:
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg.update(tokconfig)
        _write(m / "tokenizer_config.json", cfg)
    else:
        _write(m / file, content)
    return m


def template(ctx: Ctx, text: str) -> Path:
    return model_with(ctx, "tokenizer_config.json", tokconfig={"chat_template": text})


def adapter_with(ctx: Ctx, file: str, content=None, truncate: Optional[float] = None) -> Path:
    a = ctx.copy("adapter")
    if truncate is not None:
        _truncate(a / file, truncate)
    else:
        _write(a / file, content)
    return a


def ckpt_out(ctx: Ctx, file: Optional[str] = None, content=None, truncate: Optional[float] = None,
             remove: bool = False) -> Path:
    """A copy of an output folder holding checkpoint-2, optionally with one checkpoint file damaged."""
    out = ctx.copy("ckpt_run", "out")
    if file is not None:
        f = out / "checkpoint-2" / file
        if remove:
            f.unlink()
        elif truncate is not None:
            _truncate(f, truncate)
        else:
            _write(f, content)
    return out


def ro_folder(ctx: Ctx) -> Path:
    """A read-only tmpfs folder (root ignores chmod); skips when mounting is not allowed."""
    d = ctx.tmp / "ro"
    d.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(d)], capture_output=True).returncode
    if rc != 0:
        if os.geteuid() != 0:
            d.chmod(0o555)
            return d
        pytest.skip("cannot mount a read-only tmpfs here (needs root with mount rights)")
    ctx.monkeypatch.setattr(Ctx, "_mounts", getattr(Ctx, "_mounts", []) + [d], raising=False)
    return d


def _project(ctx: Ctx) -> Path:
    """A project folder: its own config.json, a README and source."""
    d = ctx.tmp / "project"
    _write(d / "config.json", {"name": "my project", "version": 3})
    _write(d / "README.md", "# my project\n")
    _write(d / "src" / "main.py", "print('hi')\n")
    return d


def _edited_run(ctx: Ctx) -> Path:
    """A finished run whose adapter_config.json the user has since edited."""
    out = ctx.copy("ckpt_run", "out")
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["my_note"] = "hand-tuned"
    _write(out / "adapter_config.json", cfg)
    return out


def _alpaca(ctx: Ctx, **extra) -> Path:
    """The toy data with one more row holding ``extra`` columns (history, system), registered for them."""
    good = {"history": [], "system": "", "images": []}
    rows = [{**r, **{k: good[k] for k in extra}} for r in json.loads((ctx.data / "toy.json").read_text())]
    rows.insert(3, {"instruction": "hello", "input": "", "output": "hi", **extra})
    cols = {"prompt": "instruction", "query": "input", "response": "output", **{k: k for k in extra}}
    return data_with(ctx, "toy.json", rows, {"toy": {"file_name": "toy.json", "columns": cols}})


def _keys(ctx: Ctx) -> dict:
    """The keys of the short training run (``Ctx.train``) as a dict of strings."""
    words = ctx.train()[1:]
    return {k[2:]: v for k, v in zip(words[::2], words[1::2])}


def _nan_adapter(ctx: Ctx) -> Path:
    """A copy of the trained adapter with one NaN in a lora_B weight (a diverged run saved by another tool)."""
    from safetensors.torch import load_file, save_file

    a = ctx.copy("adapter")
    sd = load_file(str(a / "adapter_model.safetensors"))
    name = next(k for k in sorted(sd) if "lora_B" in k)
    sd[name][0, 0] = float("nan")
    save_file(sd, str(a / "adapter_model.safetensors"))
    return a


def _moved_base(ctx: Ctx) -> Path:
    """A copy of the trained adapter whose recorded base was moved away (the error named the base, as if given)."""
    a = ctx.copy("adapter")
    for name in ("adapter_config.json", "llmtune.json"):
        if (a / name).is_file():
            cfg = json.loads((a / name).read_text())
            cfg["base_model_name_or_path"] = str(ctx.tmp / "moved-away")
            _write(a / name, cfg)
    return a


def test_a_moved_base_is_reported_by_the_adapter_folder_given(ctx, capsys):
    from llmtune.cli import main

    adapter = _moved_base(ctx)
    assert main(ctx.chat(model=adapter)) == 2
    err = capsys.readouterr().err
    assert f"{adapter} is a LoRA output folder whose recorded base" in err and "--adapter_name_or_path" in err, err


@pytest.mark.parametrize("command", ["train", "chat", "export"])
def test_the_lora_output_folder_notice_prints_once(command, ctx, capsys):
    """Issue 25's loose end: the 'LoRA output folder' notice printed twice when a chain was resolved."""
    from llmtune.cli import main

    argv = {"train": lambda: ctx.train(model=ctx.adapter, max_steps=1), "chat": lambda: ctx.chat(model=ctx.adapter),
            "export": lambda: ctx.export(model=ctx.adapter, adapter=False)}[command]()
    if ctx.stdin is not None:
        ctx.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ctx.stdin), encoding="utf-8"))
    assert main([str(a) for a in argv]) == 0
    assert capsys.readouterr().err.count("is a LoRA output folder: using its base") == 1


def test_chat_help_names_the_session_commands_as_typed(capsys):
    """`chat --help` said `clear`/`exit` while the session says `/clear`/`/exit`."""
    from llmtune.cli import main

    assert main(["chat", "--help"]) == 0
    out = capsys.readouterr().out
    assert "`/clear`" in out and "`/exit`" in out


def _no_tokenizer(ctx: Ctx) -> Path:
    """The model without its word-level tokenizer (the GGUF writer takes byte-level BPE only)."""
    model = ctx.copy("model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    return model


def test_gguf_export_names_the_model_after_export_dir(ctx):
    """general.name was the temporary folder's name (.merged_gguf.tmp-...)."""
    from llmtune.cli import main
    from llmtune.models.gguf import read_gguf_metadata

    model = _no_tokenizer(ctx)
    with _quiet():
        assert main(ctx.export("--export_format", "gguf", "--gguf_type", "f32", model=model, adapter=False,
                               export_dir=ctx.tmp / "merged")) == 0
    assert read_gguf_metadata(str(ctx.tmp / "merged" / "model-f32.gguf"))["general.name"] == "merged"


def test_a_failed_template_render_names_the_error(monkeypatch):
    """An exception with an empty message was shown as 'failed to render a conversation ()'."""
    from llmtune.data.templates.jinja import JinjaTemplate
    from llmtune.errors import LLMTuneError

    class Tok:
        def apply_chat_template(self, *a, **k):
            raise KeyError()

    with pytest.raises(LLMTuneError) as err:
        JinjaTemplate(Tok())._render([{"role": "user", "content": "hi"}], True)
    assert "(KeyError)" in str(err.value) and "()" not in str(err.value)


def test_the_python_api_accepts_pathlib_paths(world, tmp_path):
    import llmtune

    cfg = {k: v for k, v in zip(*[iter(train_args(world["model"], world["data"], tmp_path / "o", max_steps=1)[1:])] * 2)}
    cfg = {k[2:]: v for k, v in cfg.items()}
    cfg.update(model_name_or_path=world["model"], dataset_dir=world["data"], output_dir=tmp_path / "o")
    with _quiet():
        llmtune.train(cfg)
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_errors_echo_whole_numbers_as_integers():
    from llmtune.config import parse_config
    from llmtune.errors import LLMTuneError

    with pytest.raises(LLMTuneError) as err:
        parse_config({"stage": "sft", "save_steps": 0.0}, command=None)
    assert "save_steps: 0 is not allowed" in str(err.value)
    with pytest.raises(LLMTuneError) as err:
        parse_config(["--seed", str(2 ** 64 + 1)], command=None)
    assert f"seed: {2 ** 64 + 1} is not allowed" in str(err.value) and "e+19" not in str(err.value)


def test_evaluation_and_prediction_show_progress_and_print_their_metrics(ctx, capsys):
    """rm_lora.yaml's do_eval printed nothing for 17 minutes and its metrics reached only eval_results.json."""
    from llmtune.cli import main

    assert main(ctx.train(max_steps=1, val_size=0.5, do_eval=True, per_device_eval_batch_size=2,
                          disable_tqdm=False)) == 0
    cap = capsys.readouterr()
    ev = json.loads((ctx.out / "eval_results.json").read_text())
    import re

    assert "***** eval metrics *****" in cap.out
    assert re.search(rf"eval_loss +\= {re.escape(format(ev['eval_loss'], '.4g'))}\n", cap.out), cap.out
    assert "eval:" in cap.err   # the evaluation's progress bar (tqdm writes to stderr)


def test_the_progress_bar_shows_the_reward_of_online_stages(tmp_path):
    from llmtune.train.logging import TrainLogger

    logger = TrainLogger(tmp_path, 4, progress=True)
    logger.log(1, 0.25, {"loss": 0.5, "reward": 0.75, "kl": 0.01})
    assert logger.bar.postfix is not None and "reward=0.75" in logger.bar.postfix
    logger.close()


def test_the_progress_bar_shows_the_loss_of_the_step_just_done(tmp_path, capsys):
    """The postfix was set without a refresh, so the bar drawn on screen showed the previous step's loss."""
    from llmtune.train.logging import TrainLogger

    logger = TrainLogger(tmp_path, 4, progress=True)
    for step, loss in ((1, 0.111), (2, 0.222)):
        logger.advance()
        logger.log(step, step / 4, {"loss": loss})
        assert f"loss={loss}" in capsys.readouterr().err.split("\r")[-1]
    logger.close()


def test_a_loss_plot_of_one_point_shows_the_point(tmp_path):
    """A line through one point draws nothing: the chart's centre (where matplotlib puts a lone point) must
    hold pixels of the curve's colour #1f77b4."""
    import matplotlib.image

    from llmtune.train.plotting import plot_loss

    (tmp_path / "trainer_log.jsonl").write_text('{"current_steps": 1, "loss": 2.5}\n')
    (path,) = plot_loss(tmp_path, keys=("loss",))
    img = matplotlib.image.imread(str(path))   # rows from the top, RGBA floats
    h, w = img.shape[:2]
    cy, cx = int(h * (1 - (0.11 + 0.88) / 2)), int(w * (0.125 + 0.9) / 2)
    win = img[cy - 6:cy + 7, cx - 6:cx + 7, :3]
    blue = ((abs(win[..., 0] - 31 / 255) < 0.08) & (abs(win[..., 1] - 119 / 255) < 0.08)
            & (abs(win[..., 2] - 180 / 255) < 0.08))
    assert blue.sum() >= 10, blue.sum()


def _pairs(ctx: Ctx) -> Path:
    """``toy`` as a preference dataset (alpaca chosen/rejected)."""
    rows = [{"instruction": "what is the color of sky", "chosen": "blue", "rejected": "green"}] * 8
    return data_with(ctx, "pairs.json", rows, {"toy": {"file_name": "pairs.json", "ranking": True, "columns": {
        "prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}})


def _yaml(ctx: Ctx, more: str) -> Path:
    """A YAML config of the short training run with ``more`` lines appended."""
    lines = [f"{k}: {json.dumps(v)}" for k, v in _keys(ctx).items()]
    return _write(ctx.tmp / "c.yaml", "\n".join(lines) + "\n" + more)


def _sharegpt(ctx: Ctx, **extra) -> Path:
    conv = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]
    rows = [{"conversations": conv, "tools": "[]"}] * 3 + [{"conversations": conv, **extra}]
    cols = {"messages": "conversations", **{k: k for k in extra}}
    return data_with(ctx, "chat.json", rows, {"toy": {"file_name": "chat.json", "formatting": "sharegpt",
                                                       "columns": cols}})


#: a "billion laughs" YAML: 9 levels of 9 aliases, 9**9 strings once expanded, under a known key
YAML_BOMB = "lora_target: [&a [lol,lol,lol,lol,lol,lol,lol,lol,lol], " + ", ".join(
    f"&{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)) + "]\n"


NESTED = "{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}"
SOME_TEMPLATES = {
    "include": "{% include 'other.jinja' %}",
    "import": "{% import 'macros.jinja' as m %}{{ m.x() }}",
    "extends": "{% extends 'base.jinja' %}",
    "huge_range": "{% for i in range(10**10) %}x{% endfor %}",
    "huge_repeat": "{{ 'x' * 10**10 }}",
    "huge_output": "{% for i in range(90000) %}{{ 'abcdefghij' * 1000 }}{% endfor %}",
    "nested_loops": NESTED,
    "raise_exception": "{{ raise_exception('only user and assistant roles are supported') }}",
    "syntax_error": "{% for m in messages %}{{ m.content }",
    "type_error": "{{ messages[0]['content'] + 1 }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "attribute_escape": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
}


# -- the table --------------------------------------------------------------------------------------
def _t(**kw):
    return lambda c: c.train(**kw)


CASES: list = [
    # ---- train: keys, values, flags ----
    ("train-unknown-key", _t(foo=1)),
    ("train-misspelled-key", _t(learning_rat=1e-3)),
    ("train-bad-stage", _t(stage="sftt")),
    ("train-bad-finetuning-type", _t(finetuning_type="lorra")),
    ("train-lr-not-a-number", _t(learning_rate="abc")),
    ("train-lr-nan", _t(learning_rate="nan")),
    ("train-lr-inf", _t(learning_rate="inf")),
    ("train-batch-size-0", _t(per_device_train_batch_size=0)),
    ("train-grad-accum-0", _t(gradient_accumulation_steps=0)),
    ("train-bad-scheduler", _t(lr_scheduler_type="cosin")),
    ("train-lora-rank-0", _t(lora_rank=0)),
    ("train-bad-lora-target", _t(lora_target="not_a_module")),
    ("train-bad-template", _t(template="not_a_template")),
    ("train-bf16-and-fp16", _t(bf16=True, fp16=True)),
    ("train-bad-eval-strategy", _t(eval_strategy="sometimes")),
    ("train-nothing-to-train", _t(num_train_epochs=0, max_steps=-1)),
    ("train-bad-nonfinite-policy", _t(nonfinite_policy="explode")),
    ("train-bad-report-to", _t(report_to="wandbb")),
    ("train-lone-space-argument", lambda c: c.train() + [" "]),
    ("train-bad-quantization-bit", _t(quantization_bit=3)),
    ("train-bad-save-strategy", _t(save_strategy="sometimes")),
    ("train-bool-not-bool", _t(do_train="maybe")),
    ("train-int-not-int", _t(max_steps="ten")),
    ("train-bad-cutoff-len", _t(cutoff_len="long")),
    ("train-missing-yaml", lambda c: ["train", str(c.tmp / "missing.yaml")]),
    ("train-yaml-syntax", lambda c: ["train", str(_write(c.tmp / "c.yaml", "stage: sft\n  bad: [\n"))]),
    ("train-yaml-not-mapping", lambda c: ["train", str(_write(c.tmp / "c.yaml", "- a\n- b\n"))]),
    ("train-yaml-unknown-key", lambda c: ["train", str(_write(c.tmp / "c.yaml", "stage: sft\nlearnin_rate: 1\n"))]),
    pytest.param("train-yaml-not-utf8", lambda c: ["train", str(_write(c.tmp / "c.yaml", b"stage: sft\n# " + BAD_UTF8))]),
    pytest.param("train-lora-alpha-0", _t(lora_alpha=0)),
    pytest.param("train-lora-alpha-negative", _t(lora_alpha=-8)),
    pytest.param("train-save-steps-0", _t(save_steps=0)),
    pytest.param("train-logging-steps-negative", _t(logging_steps=-1)),
    pytest.param("train-warmup-ratio-negative", _t(warmup_ratio=-0.1)),
    pytest.param("train-warmup-steps-negative", _t(warmup_steps=-5)),
    pytest.param("train-weight-decay-negative", _t(weight_decay=-0.1)),
    pytest.param("train-adam-beta1-2", _t(adam_beta1=2)),
    pytest.param("train-adam-beta2-1", _t(adam_beta2=1.0)),
    pytest.param("train-adam-epsilon-negative", _t(adam_epsilon=-1)),
    pytest.param("train-adam-epsilon-0", _t(adam_epsilon=0)),
    # ---- train: paths and output folder ----
    ("train-missing-model", lambda c: c.train(model=c.tmp / "no_model")),
    ("train-missing-dataset", _t(dataset="nope")),
    ("train-missing-dataset-dir", lambda c: c.train(data=c.tmp / "no_data")),
    ("train-output-dir-is-file", lambda c: c.train(out=_write(c.tmp / "out.txt", "hi"))),
    ("train-output-dir-is-model", lambda c: c.train(model=c.copy("model"), out=c.tmp / "model")),
    ("train-output-dir-not-empty", lambda c: c.train(out=c.copy("adapter", "out"))),
    ("train-overwrite-with-typo-in-dataset", lambda c: c.train(out=c.copy("ckpt_run", "out"), dataset="toyy",
                                                               overwrite_output_dir=True)),
    ("train-overwrite-with-bad-model", lambda c: c.train(out=c.copy("ckpt_run", "out"), model=c.tmp / "nope",
                                                         overwrite_output_dir=True)),
    ("train-overwrite-with-bad-lora-target", lambda c: c.train(out=c.copy("ckpt_run", "out"), lora_target="zz",
                                                               overwrite_output_dir=True)),
    # issue 25: overwrite_output_dir removes only what a run of ours recorded writing; anything else named like
    # an output (a saved model, a project's config.json, an output the user edited) refuses the run
    ("train-overwrite-a-saved-model-folder", lambda c: c.train(out=c.copy("model", "out"), overwrite_output_dir=True)),
    ("train-overwrite-a-project-folder", lambda c: c.train(out=_project(c), overwrite_output_dir=True)),
    ("train-overwrite-an-edited-output", lambda c: c.train(out=_edited_run(c), overwrite_output_dir=True)),
    ("train-resume-nothing-there", _t(resume_from_checkpoint=True)),
    ("train-resume-missing-folder", lambda c: c.train(resume_from_checkpoint=c.tmp / "checkpoint-9")),
    ("train-read-only-output", lambda c: c.train(out=ro_folder(c) / "out")),
    # ---- train: data files ----
    ("data-json-not-utf8", lambda c: c.train(data=data_with(c, "toy.json", b'[{"instruction": "hi ' + BAD_UTF8 + b'", "output": "x"}]'))),
    ("data-jsonl-not-utf8", lambda c: c.train(data=data_with(c, "t.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "' + BAD_UTF8 + b'"}\n', {"toy": {"file_name": "t.jsonl"}}))),
    ("data-txt-not-utf8", lambda c: c.train(stage="pt", dataset="toy_text", data=data_with(c, "toy.txt", b"hello\n" + BAD_UTF8 + b"\n"))),
    ("data-csv-not-utf8", lambda c: c.train(data=data_with(c, "t.csv", b"instruction,output\nhi," + BAD_UTF8 + b"\n", {"toy": {"file_name": "t.csv"}}))),
    ("data-info-not-utf8", lambda c: c.train(data=data_with(c, "dataset_info.json", b'{"toy": {"file_name": "toy.json"}} ' + BAD_UTF8))),
    ("data-info-invalid-json", lambda c: c.train(data=data_with(c, "dataset_info.json", '{"toy": {"file_name": '))),
    ("data-info-a-list", lambda c: c.train(data=data_with(c, "dataset_info.json", [1, 2]))),
    ("data-json-invalid", lambda c: c.train(data=data_with(c, "toy.json", '[{"instruction": "a", '))),
    ("data-json-not-objects", lambda c: c.train(data=data_with(c, "toy.json", [1, 2, 3]))),
    ("data-jsonl-line-not-object", lambda c: c.train(data=data_with(c, "t.jsonl", '{"instruction": "a", "output": "b"}\n[1]\n', {"toy": {"file_name": "t.jsonl"}}))),
    ("data-file-missing", lambda c: c.train(data=data_with(c, "dataset_info.json", {"toy": {"file_name": "gone.json"}}))),
    ("data-column-missing", lambda c: c.train(data=data_with(c, "dataset_info.json", {"toy": {"file_name": "toy.json", "columns": {"prompt": "question", "response": "answer"}}}))),
    ("data-empty-list", lambda c: c.train(data=data_with(c, "toy.json", []))),
    ("data-bad-formatting", lambda c: c.train(data=data_with(c, "dataset_info.json", {"toy": {"file_name": "toy.json", "formatting": "weird"}}))),
    ("data-every-label-cut", _t(cutoff_len=1)),
    ("data-parquet-damaged", lambda c: c.train(data=data_with(c, "t.parquet", b"PAR1 not really", {"toy": {"file_name": "t.parquet"}}))),
    ("data-info-entry-not-object", lambda c: c.train(data=data_with(c, "dataset_info.json", {"toy": "toy.json"}))),
    # issue 25: each was a traceback; now one line naming the file, row and column
    ("data-file-other-extension", lambda c: c.train(data=data_with(c, "rows.ndjson", '{"instruction": "a", "output": "b"}\n', {"toy": {"file_name": "rows.ndjson"}}))),
    ("data-file-outside-the-folder", lambda c: c.train(data=data_with(c, "dataset_info.json", {"toy": {"file_name": "../" * 40 + "etc/passwd"}}))),
    ("data-history-pair-of-one", lambda c: c.train(data=_alpaca(c, history=[["q"]]))),
    ("data-history-numbers", lambda c: c.train(data=_alpaca(c, history=[[1, 2, 3]]))),
    ("data-history-flat-strings", lambda c: c.train(data=_alpaca(c, history=["q", "a"]))),
    ("data-history-a-string", lambda c: c.train(data=_alpaca(c, history="what is the color of sky"))),
    ("data-system-a-dict", lambda c: c.train(data=_alpaca(c, system={"role": "be nice"}))),
    ("data-sharegpt-tools-not-json", lambda c: c.train(data=_sharegpt(c, tools="{not json"))),
    ("data-images-column", lambda c: c.train(data=_alpaca(c, images=["sky.png"]))),
    ("data-images-mapped", lambda c: c.train(data=data_with(c, "dataset_info.json", {"toy": {"file_name": "toy.json", "columns": {"prompt": "instruction", "response": "output", "images": "pics"}}}))),
    ("train-seed-too-large", _t(seed=18446744073709551616)),
    ("train-yaml-alias-bomb", lambda c: ["train", str(_yaml(c, YAML_BOMB))]),
    # issue 25: silently ignored before (the last value won)
    ("train-yaml-key-twice", lambda c: ["train", str(_yaml(c, "learning_rate: 1.0e-3\nlearning_rate: 1.0\n"))]),
    ("train-json-key-twice", lambda c: ["train", str(_write(c.tmp / "c.json", json.dumps(_keys(c))[:-1] + ', "seed": 2}'))]),
    ("train-max-steps-negative", _t(max_steps=-5)),
    ("train-max-steps-0", _t(max_steps=0)),
    ("train-save-total-limit-negative", _t(save_total_limit=-1)),
    ("train-save-total-limit-0", _t(save_total_limit=0)),
    ("train-neat-packing-without-packing", _t(neat_packing=True, packing=False)),
    ("train-dpo-with-packing", lambda c: c.train(stage="dpo", packing=True, data=_pairs(c))),
    ("train-bad-metric-for-best-model", _t(val_size=0.25, eval_strategy="steps", eval_steps=2,
                                           metric_for_best_model="eval_acuracy")),
    ("train-aliases-conflict", lambda c: c.train(cutoff_len=128) + ["--max_length", "64", "--cutoff_len", "100"]),
    # ---- keys added in issue 25's last rounds: bad values (each must name the key and the fix) ----
    ("train-max-tokens-per-micro-batch-0", _t(max_tokens_per_micro_batch=0)),
    ("train-max-tokens-per-micro-batch-negative", _t(max_tokens_per_micro_batch=-1)),
    ("train-max-tokens-per-micro-batch-not-a-number", _t(max_tokens_per_micro_batch="abc")),
    ("train-offload-activations-not-bool", _t(offload_activations="maybe")),
    ("train-use-unsloth-gc-not-bool", _t(use_unsloth_gc="unsloth")),
    ("train-image-max-below-min-pixels", _t(image_max_pixels=100, image_min_pixels=200)),
    ("train-image-max-pixels-negative", _t(image_max_pixels=-5)),
    ("train-image-min-pixels-0", _t(image_min_pixels=0)),
    ("api-port-70000", lambda c: ["api", "--model_name_or_path", c.model, "--port", "70000"]),
    ("api-max-num-seqs-0", lambda c: ["api", "--model_name_or_path", c.model, "--max_num_seqs", "0"]),
    # ---- LLaMA-Factory/TRL keys that were accepted with only a notice: now mapped, or refused with the reason ----
    ("train-flash-attn-unknown", _t(flash_attn="fa3")),
    ("train-infer-backend-unknown", _t(infer_backend="tgi")),
    ("train-use-vllm-not-bool", _t(use_vllm="maybe")),
    ("train-deepspeed-unknown-file", _t(deepspeed="my_ds.json")),
    ("train-deepspeed-bad-stage", lambda c: c.train(deepspeed=_write(c.tmp / "ds.json", {"zero_optimization": {"stage": 7}}))),
    ("train-deepspeed-not-json", lambda c: c.train(deepspeed=_write(c.tmp / "ds.json", "{zero"))),
    ("train-push-to-hub-without-hub-model-id", _t(push_to_hub=True)),
    ("train-push-to-hub-offline", lambda c: (c.monkeypatch.setenv("HF_HUB_OFFLINE", "1"),
                                             c.train(push_to_hub=True, hub_model_id="me/tiny"))[1]),
    ("train-push-to-hub-without-token", lambda c: (c.monkeypatch.setenv("HF_HUB_OFFLINE", "0"),
                                                   c.monkeypatch.setattr("huggingface_hub.get_token", lambda: None),
                                                   c.train(push_to_hub=True, hub_model_id="me/tiny"))[2]),
    ("train-hub-model-id-not-a-repo-id", _t(hub_model_id="not a repo")),
    # ---- train: model folder and tokenizer ----
    ("model-tokenizer-config-not-utf8", lambda c: c.train(model=model_with(c, "tokenizer_config.json", b'{"eos_token": "' + BAD_UTF8 + b'"}'))),
    ("model-tokenizer-config-invalid", lambda c: c.train(model=model_with(c, "tokenizer_config.json", '{"eos_token": '))),
    ("model-tokenizer-config-a-list", lambda c: c.train(model=model_with(c, "tokenizer_config.json", "[]"))),
    ("model-tokenizer-json-corrupt", lambda c: c.train(model=model_with(c, "tokenizer.json", truncate=0.5))),
    ("model-tokenizer-json-missing", lambda c: c.train(model=model_with(c, "tokenizer.json", remove=True))),
    ("model-config-invalid", lambda c: c.train(model=model_with(c, "config.json", '{"hidden_size": '))),
    ("model-config-not-utf8", lambda c: c.train(model=model_with(c, "config.json", b'{"a": "' + BAD_UTF8 + b'"}'))),
    ("model-weights-truncated", lambda c: c.train(model=model_with(c, "model.safetensors", truncate=0.5))),
    ("model-weights-missing", lambda c: c.train(model=model_with(c, "model.safetensors", remove=True))),
    ("model-chat-template-jinja-not-utf8", lambda c: c.train(template=None, model=model_with(c, "chat_template.jinja", b"{{ '" + BAD_UTF8 + b"' }}"))),
    ("model-generation-eos-garbage", lambda c: c.train(model=model_with(c, "generation_config.json", {"eos_token_id": "abc"}))),
] + [
    (f"train-template-{name}", (lambda t: lambda c: c.train(template=None, model=template(c, t)))(text))
    for name, text in SOME_TEMPLATES.items()
] + [
    # ---- train: adapters and resume ----
    ("train-adapter-missing", lambda c: c.train(adapter_name_or_path=c.tmp / "no_adapter")),
    ("train-adapter-truncated", lambda c: c.train(adapter_name_or_path=adapter_with(c, "adapter_model.safetensors", truncate=0.6))),
    ("train-adapter-config-invalid", lambda c: c.train(adapter_name_or_path=adapter_with(c, "adapter_config.json", '{"r": '))),
    ("resume-other-adapter-shape", lambda c: c.train(out=ckpt_out(c), resume_from_checkpoint=True, lora_rank=8)),
    ("resume-corrupt-optimizer", lambda c: c.train(out=ckpt_out(c, "optimizer.safetensors", truncate=0.5), resume_from_checkpoint=True)),
    ("resume-garbage-optimizer", lambda c: c.train(out=ckpt_out(c, "optimizer.safetensors", b"\x00" * 64), resume_from_checkpoint=True)),
    ("resume-truncated-trainer-state", lambda c: c.train(out=ckpt_out(c, "trainer_state.json", truncate=0.5), resume_from_checkpoint=True)),
    ("resume-trainer-state-not-utf8", lambda c: c.train(out=ckpt_out(c, "trainer_state.json", b'{"global_step": 2, "x": "' + BAD_UTF8 + b'"}'), resume_from_checkpoint=True)),
    ("resume-trainer-state-not-object", lambda c: c.train(out=ckpt_out(c, "trainer_state.json", "[1, 2]"), resume_from_checkpoint=True)),
    ("resume-trainer-state-no-epoch", lambda c: c.train(out=ckpt_out(c, "trainer_state.json", {"global_step": 2}), resume_from_checkpoint=True)),
    ("resume-optimizer-json-missing", lambda c: c.train(out=ckpt_out(c, "optimizer.json", remove=True), resume_from_checkpoint=True)),
    ("resume-rng-state-missing", lambda c: c.train(out=ckpt_out(c, "rng_state.safetensors", remove=True), resume_from_checkpoint=True)),
    ("resume-trainable-truncated", lambda c: c.train(out=ckpt_out(c, "trainable.safetensors", truncate=0.5), resume_from_checkpoint=True)),
    ("resume-optimizer-json-invalid", lambda c: c.train(out=ckpt_out(c, "optimizer.json", "{"), resume_from_checkpoint=True)),
    ("resume-scheduler-json-invalid", lambda c: c.train(out=ckpt_out(c, "scheduler.json", "{"), resume_from_checkpoint=True)),
    ("resume-other-batch-size", lambda c: c.train(out=ckpt_out(c), resume_from_checkpoint=True, per_device_train_batch_size=2)),
    ("resume-other-finetuning-type", lambda c: c.train(out=ckpt_out(c), resume_from_checkpoint=True, finetuning_type="freeze")),
    # issue 25: silently accepted before (new data from the old position; another stage's loss on the old state)
    ("resume-other-dataset", lambda c: c.train(out=ckpt_out(c), resume_from_checkpoint=True, data=_alpaca(c, system="be brief"))),
    ("resume-other-stage", lambda c: c.train(out=ckpt_out(c), resume_from_checkpoint=True, stage="pt", dataset="toy_text")),
    ("resume-path-not-a-checkpoint", lambda c: c.train(resume_from_checkpoint=c.copy("adapter", "somewhere"))),
    # ---- chat ----
    ("chat-missing-model", lambda c: c.chat(model=c.tmp / "none")),
    ("chat-truncated-adapter", lambda c: c.chat("--adapter_name_or_path", adapter_with(c, "adapter_model.safetensors", truncate=0.6))),
    ("chat-adapter-config-not-utf8", lambda c: c.chat("--adapter_name_or_path", adapter_with(c, "adapter_config.json", b'{"r": 4, "x": "' + BAD_UTF8 + b'"}'))),
    ("chat-stdin-not-utf8", lambda c: c.chat(stdin=b"hello\n" + BAD_UTF8 + b" there\n")),
    ("chat-negative-temperature", lambda c: c.chat("--do_sample", "true", "--temperature", "-1")),
    ("chat-top-p-2", lambda c: c.chat("--do_sample", "true", "--top_p", "2")),
    ("chat-bad-infer-dtype", lambda c: c.chat("--infer_dtype", "float8")),
    ("chat-unknown-flag", lambda c: c.chat("--temprature", "1")),
    ("chat-adapter-with-full", lambda c: c.chat("--adapter_name_or_path", c.adapter, "--finetuning_type", "full")),
    ("chat-bad-template", lambda c: c.chat("--template", "nonexistent")),
    ("chat-tokenizer-config-not-utf8", lambda c: c.chat(model=model_with(c, "tokenizer_config.json", b'{"eos_token": "' + BAD_UTF8 + b'"}'))),
    ("chat-repetition-penalty-0", lambda c: c.chat("--repetition_penalty", "0")),
    ("chat-template-include", lambda c: _no_template(c.chat(model=template(c, SOME_TEMPLATES["include"])))),
] + [
    (f"chat-template-{name}", (lambda t: lambda c: _no_template(c.chat(model=template(c, t)))) (SOME_TEMPLATES[name]))
    for name in ("nested_loops", "huge_range", "raise_exception", "syntax_error", "recursion")
] + [
    # ---- export ----
    ("export-missing-export-dir-key", lambda c: ["export", "--model_name_or_path", str(c.model)]),
    ("export-dir-not-empty", lambda c: c.export(export_dir=_write(c.tmp / "exp" / "notes.txt", "mine").parent)),
    ("export-dir-is-file", lambda c: c.export(export_dir=_write(c.tmp / "exp.txt", "mine"))),
    ("export-size-0", lambda c: c.export("--export_size", 0)),
    ("export-bad-format", lambda c: c.export("--export_format", "onnx")),
    ("export-bad-gguf-type", lambda c: c.export("--export_format", "gguf", "--gguf_type", "q2_k_xl")),
    ("export-truncated-adapter", lambda c: c.export(adapter=adapter_with(c, "adapter_model.safetensors", truncate=0.6))),
    ("export-adapter-config-invalid", lambda c: c.export(adapter=adapter_with(c, "adapter_config.json", "{"))),
    ("export-dir-is-model", lambda c: c.export(model=c.copy("model"), adapter=False, export_dir=c.tmp / "model")),
    ("export-bad-quantization-bit", lambda c: c.export("--export_quantization_bit", 3)),
    ("export-missing-model", lambda c: c.export(model=c.tmp / "none", adapter=False)),
    ("export-tokenizer-config-not-utf8", lambda c: c.export(model=model_with(c, "tokenizer_config.json", b'{"eos_token": "' + BAD_UTF8 + b'"}'), adapter=False)),
    ("export-unknown-flag", lambda c: c.export("--exportdir", "x")),
    ("export-read-only-dir", lambda c: c.export(export_dir=ro_folder(c) / "exp")),
    ("export-overwrite-with-bad-adapter", lambda c: c.export("--overwrite_export_dir", "true", export_dir=_write(c.tmp / "exp" / "notes.txt", "mine").parent, adapter=c.tmp / "nope")),
    ("export-template-include", lambda c: c.export(model=template(c, SOME_TEMPLATES["include"]), adapter=False)),
    ("export-gguf-dir-named-like-a-file", lambda c: c.export("--export_format", "gguf", model=_no_tokenizer(c), adapter=False, export_dir=c.tmp / "m.gguf")),
    ("export-weights-hold-nan", lambda c: c.export(adapter=_nan_adapter(c))),
    ("chat-lora-folder-whose-base-moved", lambda c: c.chat(model=_moved_base(c))),
    ("export-lora-folder-whose-base-moved", lambda c: c.export(model=_moved_base(c), adapter=False)),
    ("cli-unknown-command", lambda c: ["trian"]),
]


def _no_template(words: list[str]) -> list[str]:
    """Chat words without ``--template chatml`` (so the model's own template is used)."""
    i = words.index("--template")
    return words[:i] + words[i + 2:]


def _loss(*shapes, labels_dtype="long"):
    import torch

    from llmtune.losses import causal_lm_loss

    h, w, lab = shapes
    labels = torch.zeros(lab, dtype=getattr(torch, labels_dtype))
    return causal_lm_loss(torch.randn(h), torch.randn(w), labels)


API_CASES = [
    ("api-train-int", lambda c: __import__("llmtune").train(42)),
    ("api-train-none", lambda c: __import__("llmtune").train(None)),
    ("api-train-missing-model-key", lambda c: __import__("llmtune").train({"stage": "sft", "dataset": "toy"})),
    ("api-train-missing-yaml", lambda c: __import__("llmtune").train(str(c.tmp / "nope.yaml"))),
    ("api-train-unknown-key", lambda c: __import__("llmtune").train({"stage": "sft", "lerning_rate": 1})),
    ("api-train-aliases-conflict", lambda c: __import__("llmtune").train({**_keys(c), "lora_rank": 8, "lora_r": 4})),
    ("api-export-int", lambda c: __import__("llmtune").export(42)),
    ("api-loss-hidden-2d", lambda c: _loss((2, 5), (10, 8), (2, 5))),
    ("api-loss-weight-mismatch", lambda c: _loss((2, 5, 8), (10, 7), (2, 5))),
    ("api-loss-labels-shape", lambda c: _loss((2, 5, 8), (10, 8), (2, 4))),
    ("api-loss-float-labels", lambda c: _loss((2, 5, 8), (10, 8), (2, 5), labels_dtype="float32")),
    ("api-loss-not-tensors", lambda c: __import__("llmtune").losses.causal_lm_loss([1], [2], [3])),
    ("api-load-tokenizer-not-utf8", lambda c: __import__("llmtune").load_tokenizer(str(model_with(c, "tokenizer_config.json", b'{"x": "' + BAD_UTF8 + b'"}')))),
    ("api-load-model-missing", lambda c: __import__("llmtune").load_model(str(c.tmp / "none"))),
    ("api-apply-template-include", lambda c: __import__("llmtune").load_tokenizer(str(template(c, SOME_TEMPLATES["include"]))).apply_chat_template([{"role": "user", "content": "hi"}])),
]


# -- running ----------------------------------------------------------------------------------------
def _watch(ctx: Ctx) -> dict:
    w = ctx.world
    return {"tmp": tree_hash(ctx.tmp), "model": tree_hash(w["model"]), "data": tree_hash(w["data"]),
            "adapter": tree_hash(w["adapter"]), "ckpt_run": tree_hash(w["ckpt_run"])}


def _cleanup_mounts(ctx):
    for d in getattr(Ctx, "_mounts", []):
        subprocess.run(["umount", str(d)], capture_output=True)


@pytest.fixture
def ctx(world, tmp_path, monkeypatch):
    import llmtune.tokenizer as tk

    monkeypatch.setattr(tk, "RENDER_SECONDS", 0.5)  # the nested-loop templates hit the deadline quickly
    monkeypatch.delenv("LLMTUNE_DEBUG", raising=False)
    c = Ctx(world=world, tmp=tmp_path / "case", monkeypatch=monkeypatch)
    c.tmp.mkdir()
    yield c
    _cleanup_mounts(c)
    Ctx._mounts = []


def _ids(cases):
    return [c.values[0] if hasattr(c, "values") else c[0] for c in cases]


@pytest.mark.parametrize("name,build", CASES, ids=_ids(CASES))
def test_bad_cli_input_is_one_line_exit_2_and_nothing_changes(name, build, ctx, capsys, monkeypatch):
    from llmtune.cli import main

    argv = [str(a) for a in build(ctx)]
    before = _watch(ctx)
    if ctx.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ctx.stdin), encoding="utf-8"))
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("llmtune: error:")]
    if os.environ.get("RELIABILITY_SHOW"):
        print(f"\n[{name}] rc={rc} {errors}", file=sys.__stderr__)
    assert rc == 2, f"{name}: exit {rc}\n{err[-2000:]}"
    assert len(errors) == 1, err[-2000:]
    assert "Traceback" not in err
    assert _watch(ctx) == before, f"{name}: files changed"


#: rows of the last round whose error line must also name the key (or flag) and the fix
NAMES_THE_KEY = {
    "train-max-tokens-per-micro-batch-0": ("max_tokens_per_micro_batch", ">= 1"),
    "train-max-tokens-per-micro-batch-negative": ("max_tokens_per_micro_batch", ">= 1"),
    "train-max-tokens-per-micro-batch-not-a-number": ("max_tokens_per_micro_batch", "whole number"),
    "train-offload-activations-not-bool": ("offload_activations", "true/false"),
    "train-use-unsloth-gc-not-bool": ("--use_unsloth_gc", "true/false"),
    "train-image-max-below-min-pixels": ("image_max_pixels", ">= image_min_pixels"),
    "train-image-max-pixels-negative": ("image_max_pixels", ">= 1"),
    "train-image-min-pixels-0": ("image_min_pixels", ">= 1"),
    "api-port-70000": ("--port", "0..65535"),
    "api-max-num-seqs-0": ("--max_num_seqs", ">= 1"),
    "train-flash-attn-unknown": ("flash_attn", "fa2"),
    "train-infer-backend-unknown": ("infer_backend", "huggingface"),
    "train-use-vllm-not-bool": ("use_vllm", "true/false"),
    "train-deepspeed-unknown-file": ("deepspeed", "set fsdp"),
    "train-deepspeed-bad-stage": ("deepspeed", "0, 1, 2 or 3"),
    "train-deepspeed-not-json": ("deepspeed", "not a readable JSON file"),
    "train-push-to-hub-without-hub-model-id": ("push_to_hub", "hub_model_id"),
    "train-push-to-hub-offline": ("push_to_hub", "HF_HUB_OFFLINE"),
    "train-push-to-hub-without-token": ("push_to_hub", "hf auth login"),
    "train-hub-model-id-not-a-repo-id": ("hub_model_id", "owner/name"),
}


@pytest.mark.parametrize("name", sorted(NAMES_THE_KEY))
def test_the_error_line_names_the_key_and_the_fix(name, ctx, capsys):
    from llmtune.cli import main

    build = {c[0]: c[1] for c in CASES if not hasattr(c, "values")}[name]
    assert main([str(a) for a in build(ctx)]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("llmtune: error:")][0]
    key, fix = NAMES_THE_KEY[name]
    assert key in line and fix in line, line


@pytest.mark.parametrize("name,call", API_CASES, ids=_ids(API_CASES))
def test_bad_python_api_input_raises_one_clear_error(name, call, ctx):
    from llmtune.errors import LLMTuneError

    before = {k: v for k, v in _watch(ctx).items() if k != "tmp"}  # the case's own copies are made inside
    with pytest.raises((LLMTuneError, ValueError)) as err:
        call(ctx)
    msg = str(err.value)
    assert msg and "\n" not in msg.strip(), msg
    assert {k: v for k, v in _watch(ctx).items() if k != "tmp"} == before


# -- accepted, but what is ignored is said (issue 25: each was silently ignored, exit 0, no notice) -----------------
NOTICE_CASES = [
    ("fsdp-without-torchrun", lambda c: c.train(fsdp="full_shard"), "nothing is sharded"),
    ("pref-loss-with-sft", lambda c: c.train(pref_loss="ipo", pref_beta=0.5), "stage sft ignores pref_beta, pref_loss"),
    ("reward-funcs-with-sft", lambda c: c.train(reward_funcs="/nonexistent.py:f"), "stage sft ignores reward_funcs"),
    ("training-keys-to-chat", lambda c: c.chat("--learning_rate", "1e-3", "--num_train_epochs", "2"),
     "llmtune chat ignores the training keys learning_rate, num_train_epochs"),
    ("training-keys-to-export", lambda c: c.export("--lora_dropout", "0.1", "--max_steps", "5"),
     "llmtune export ignores the training keys max_steps"),
    ("flag-given-twice", lambda c: c.train(cutoff_len=128) + ["--cutoff_len", "100"], "--cutoff_len is given twice"),
    # issue 25: accepted with a notice that said only "has no effect": each now says what llmtune does instead
    ("flash-attn-fa2", lambda c: c.train(flash_attn="fa2"), "which runs FlashAttention-2 kernels on CUDA"),
    ("flash-attn-disabled", lambda c: c.train(flash_attn="eager"), "flash_attn: disabled: llmtune's attention is"),
    ("infer-backend-vllm", lambda c: c.chat("--infer_backend", "vllm"), "infer_backend: vllm is not used; llmtune generates"),
    ("use-vllm-grpo", lambda c: c.train(stage="grpo", use_vllm=True, reward_funcs="len", num_generations=2),
     "use_vllm: rollouts run on llmtune's own generation engine"),
    ("deepspeed-z3-by-name", lambda c: c.train(deepspeed="examples/deepspeed/ds_z3_config.json"),
     "deepspeed: llmtune does not use DeepSpeed; ZeRO-3: fsdp: full_shard under torchrun"),
    ("deepspeed-z2-offload-file", lambda c: c.train(deepspeed=_write(c.tmp / "ds.json", {"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}})), "ZeRO-2 with offload: fsdp: shard_grad_op offload"),
    ("deepspeed-z0", lambda c: c.train(deepspeed="ds_z0_config.json"), "ZeRO-0: DDP"),
    ("deepspeed-with-fsdp-set", lambda c: c.train(deepspeed="ds_z3_config.json", fsdp="shard_grad_op"),
     "the fsdp you set applies: fsdp: shard_grad_op"),
]


@pytest.mark.parametrize("name,build,expected", NOTICE_CASES, ids=[c[0] for c in NOTICE_CASES])
def test_ignored_input_gets_a_notice(name, build, expected, ctx, capsys):
    from llmtune.config import parse_config

    words = [str(w) for w in build(ctx)]
    parse_config(words[1:], command=words[0])
    err = capsys.readouterr().err
    assert expected in err and "llmtune: notice:" in err, err


def test_ref_model_with_sft_gets_one_notice_with_the_right_reason(ctx, capsys):
    """It said 'pref_loss sigmoid needs no reference model', which is not why sft ignores it."""
    from llmtune.cli import main

    assert main(ctx.train(max_steps=1, ref_model=ctx.model)) == 0
    err = capsys.readouterr().err
    assert "stage sft ignores ref_model" in err and "pref_loss" not in err, err


def test_an_image_placeholder_on_a_text_model_gets_a_notice(ctx, capsys):
    from llmtune.cli import main

    rows = json.loads((ctx.data / "toy.json").read_text())
    rows[0]["instruction"] = "<image> what is the color of sky"
    assert main(ctx.train(max_steps=1, data=data_with(ctx, "toy.json", rows))) == 0
    assert "1 example(s) hold <image>/<video>/<audio> placeholders" in capsys.readouterr().err


# -- a few true subprocesses: exit status and stderr as a user sees them ---------------------------------
SUBPROCESS_CASES = [
    ("sub-unknown-key", lambda c: c.train(foo=1), None),
    ("sub-data-not-utf8", lambda c: c.train(data=data_with(c, "toy.json", b'[{"instruction": "' + BAD_UTF8 + b'"}]')), None),
    ("sub-chat-stdin-not-utf8", lambda c: c.chat(), b"hi\n" + BAD_UTF8 + b"\n"),
    ("sub-resume-truncated-state", lambda c: c.train(out=ckpt_out(c, "trainer_state.json", truncate=0.3), resume_from_checkpoint=True), None),
]


@pytest.mark.parametrize("name,build,stdin", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_bad_input_in_a_real_subprocess(name, build, stdin, ctx):
    argv = [str(a) for a in build(ctx)]
    before = _watch(ctx)
    proc = run_subprocess(argv, stdin=stdin if stdin is not None else ctx.stdin)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err[-2000:]
    assert len([x for x in err.splitlines() if x.startswith("llmtune: error:")]) == 1, err[-2000:]
    assert "Traceback" not in err
    assert _watch(ctx) == before


def test_the_table_holds_at_least_100_bad_inputs():
    assert len(CASES) + len(API_CASES) + len(SUBPROCESS_CASES) + len(REAL_CASES) >= 100


# -- a few cases with the real model (SmolLM2-135M GGUF): the errors come after a real model load -------------
REAL_CASES = [
    ("real-train-data-not-utf8", lambda c, m: c.train(model=m, template="smollm2",
                                                      data=data_with(c, "toy.json", b'[{"instruction": "' + BAD_UTF8 + b'"}]'))),
    ("real-train-overwrite-with-typo-keeps-the-run", lambda c, m: c.train(model=m, template="smollm2", dataset="toyy",
                                                                          out=c.copy("ckpt_run", "out"),
                                                                          overwrite_output_dir=True)),
    ("real-chat-stdin-not-utf8", lambda c, m: _no_template(c.chat(model=m, stdin=b"hi\n" + BAD_UTF8 + b"\n"))),
    ("real-export-into-a-folder-with-files", lambda c, m: c.export(model=m, adapter=False,
                                                                   export_dir=_write(c.tmp / "e" / "x.txt", "mine").parent)),
]


@pytest.mark.real
@pytest.mark.parametrize("name,build", REAL_CASES, ids=[c[0] for c in REAL_CASES])
def test_bad_input_with_the_real_model(name, build, ctx, capsys, monkeypatch, real_model_path):
    from llmtune.cli import main

    argv = [str(a) for a in build(ctx, real_model_path)]
    before = _watch(ctx)
    if ctx.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ctx.stdin), encoding="utf-8"))
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert len([x for x in err.splitlines() if x.startswith("llmtune: error:")]) == 1 and "Traceback" not in err
    assert _watch(ctx) == before
