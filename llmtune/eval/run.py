"""``llmtune eval``: run lm-evaluation-harness tasks on an llmtune model (a base, adapters, a checkpoint, an export).

``llmtune eval [config.yaml] --tasks a,b --model_name_or_path M [--adapter_name_or_path A] [--key value ...]``
loads the model as ``llmtune chat`` does (:func:`llmtune.runs.load_model`: a base folder, Hub id or ``.gguf``
file; LoRA adapters merged in order; an llmtune output or ``checkpoint-N`` folder given as the model loads its
recorded base and chain), wraps it in :class:`llmtune.eval.lm.LLMTuneLM` and runs
``lm_eval.simple_evaluate``. It prints the harness's results table (``lm_eval.utils.make_table``) and writes
the results as JSON (``--output_path``: a ``.json`` file, or a folder that gets ``results.json``).

LLaMA-Factory's ``llamafactory-cli eval`` keys are accepted where they map: ``task`` (``mmlu_test`` ->
``mmlu``, ``cmmlu_test`` -> ``cmmlu``, ``ceval_validation`` -> ``ceval-valid``: the harness's tasks of the same
benchmarks), ``n_shot`` (``num_fewshot``), ``save_dir`` (``output_path``); ``lang``, ``split``,
``trust_remote_code``, ``cache_dir`` and ``download_mode`` get a notice and no effect (the harness's task
defines its prompt language and split). An unknown key is one error line naming the nearest known keys.

Source: lm-evaluation-harness ``lm_eval.simple_evaluate`` / ``TaskManager`` (0.4.x); LLaMA-Factory's
``llamafactory-cli eval`` (key names).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from llmtune.errors import LLMTuneError, nearest, notice

__all__ = ["KEYS", "parse_eval_args", "load_eval_model", "run_eval", "main"]

USAGE = """usage: llmtune eval [config.yaml] --tasks TASK[,TASK...] --model_name_or_path PATH [--key value ...]

Evaluate a model with lm-evaluation-harness (pip install 'llmtune[eval]').
  --tasks                 harness task or group names, comma-separated (LLaMA-Factory: --task mmlu_test)
  --model_name_or_path    a model folder, Hub id, .gguf file, or an llmtune output / checkpoint-N folder
  --adapter_name_or_path  LoRA adapter folder(s), comma-separated, merged in order
  --include_path DIR      a folder of your own task YAML files
  --num_fewshot N         few-shot examples per prompt (LLaMA-Factory: --n_shot)
  --limit N               the first N documents of each task (a number < 1: that fraction)
  --batch_size 8          requests per forward pass / rows generated together
  --output_path PATH      results JSON: a .json file, or a folder that gets results.json (LLaMA-Factory: --save_dir)
  --log_samples false     also write each document's requests and answers into the JSON
  --template NAME         render prompts as chats with an llmtune template (implies --apply_chat_template)
  --apply_chat_template   render prompts with the model's chat template (default: plain text, as the harness)
  --max_length N          the context in tokens (default: the model's max_position_embeddings)
  --max_gen_toks 256      new tokens of a generation task that sets none
  --infer_dtype auto      auto, float32, bfloat16, float16     --device cpu|cuda|cuda:0
  --quantization_bit 4    load the base weights as NF4
  --seed N                the harness's four seeds (default: the harness's own: 0, 1234, 1234, 1234)"""

#: key -> (type, default, one-line description)
KEYS: dict[str, tuple[type, Any, str]] = {
    "tasks": (str, None, "task names, comma-separated"),
    "model_name_or_path": (str, None, "the model"),
    "adapter_name_or_path": (str, None, "LoRA adapter folders, comma-separated"),
    "finetuning_type": (str, "lora", "lora (adapters), freeze or full"),
    "include_path": (str, None, "a folder of task YAML files"),
    "num_fewshot": (int, None, "few-shot examples"),
    "limit": (float, None, "documents per task"),
    "batch_size": (int, 8, "batch size"),
    "output_path": (str, None, "results JSON file or folder"),
    "log_samples": (bool, False, "write per-document samples"),
    "template": (str, None, "llmtune chat template"),
    "apply_chat_template": (bool, False, "render prompts as chats"),
    "system": (str, None, "system instruction of chat prompts"),
    "max_length": (int, None, "context length"),
    "max_gen_toks": (int, 256, "default new tokens"),
    "infer_dtype": (str, "auto", "compute dtype"),
    "device": (str, None, "device"),
    "quantization_bit": (int, None, "4 for NF4"),
    "quantization_type": (str, "nf4", "nf4 or fp4"),
    "double_quantization": (bool, True, "quantize the NF4 scales"),
    "seed": (int, None, "seed of the harness's sampling and few-shot choice (None: the harness's defaults)"),
}
ALIASES = {"task": "tasks", "n_shot": "num_fewshot", "save_dir": "output_path", "output_dir": "output_path",
           "model": "model_name_or_path", "default_system": "system", "system_instruction": "system"}
#: LLaMA-Factory eval keys with no meaning here (the harness's task decides them)
IGNORED = ("lang", "split", "trust_remote_code", "cache_dir", "download_mode", "hf_hub_token", "stage")
#: LLaMA-Factory's eval task names (``<benchmark>_<split>``) -> the harness's task of that benchmark
LF_TASKS = {"mmlu": "mmlu", "cmmlu": "cmmlu", "ceval": "ceval-valid"}
_DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _coerce(key: str, value: Any, source: str) -> Any:
    tp = KEYS[key][0]
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if tp is float:
            return float(value)
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(tp, "text")
        raise LLMTuneError(f"{source}: --{key} must be {kind} (got {value!r})") from None


def _lf_task(name: str) -> str:
    """A LLaMA-Factory eval task name (``mmlu_test``) as the harness's task name, with a notice."""
    bench, _, split = name.rpartition("_")
    if bench in LF_TASKS and split in ("test", "validation", "val", "dev", "train"):
        notice(f"task {name!r} (LLaMA-Factory's name): running the harness's task {LF_TASKS[bench]!r}; its "
               "own split and prompt format apply")
        return LF_TASKS[bench]
    return name


def parse_eval_args(argv: list[str]) -> dict[str, Any]:
    """The eval settings from command-line words: config files (YAML/JSON) then ``--key value`` flags.

    Returns:
        a dict with every key of :data:`KEYS` (defaults filled); ``tasks`` a list of str.

    Raises:
        LLMTuneError: an unknown key (nearest named), a value of the wrong type, or no tasks / model.
    """
    from llmtune.config.parse import BARE_FLAG, read_config_file, split_argv

    files, flags = split_argv(argv)
    values: dict[str, Any] = {k: spec[1] for k, spec in KEYS.items()}
    sources: list[tuple[str, dict]] = [(f, read_config_file(Path(f))) for f in files] + [("command line", flags)]
    for source, pairs in sources:
        for raw, value in pairs.items():
            key = str(raw).strip().lstrip("-").replace("-", "_")
            if key in IGNORED:
                notice(f"{source}: '{key}' has no effect in llmtune eval (the harness's task defines it)")
                continue
            lf_task = key == "task"
            key = ALIASES.get(key, key)
            if key not in KEYS:
                shown = f"--{key}" if source == "command line" else f"'{raw}'"
                raise LLMTuneError(f"{source}: unknown key {shown} for llmtune eval."
                                   + (nearest(key, list(KEYS) + list(ALIASES)) or " Run `llmtune eval --help`."))
            if value is BARE_FLAG:
                if KEYS[key][0] is not bool:
                    raise LLMTuneError(f"{source}: --{key} needs a value")
                value = True
            value = _coerce(key, value, source)
            if key == "tasks" and lf_task:
                value = ",".join(_lf_task(t.strip()) for t in value.split(","))
            values[key] = value
    values["tasks"] = [t.strip() for t in (values["tasks"] or "").split(",") if t.strip()]
    if not values["tasks"]:
        raise LLMTuneError("llmtune eval: give the tasks to run: --tasks NAME[,NAME...] (harness task names, "
                           "or your own with --include_path DIR)")
    if not values["model_name_or_path"]:
        raise LLMTuneError("llmtune eval: give the model: --model_name_or_path PATH")
    if values["infer_dtype"] not in _DTYPES:
        raise LLMTuneError(f"--infer_dtype {values['infer_dtype']!r}: use auto, float32, bfloat16 or float16"
                           + nearest(values["infer_dtype"], _DTYPES))
    for key in ("batch_size", "max_gen_toks"):
        if values[key] < 1:
            raise LLMTuneError(f"--{key} must be >= 1 (got {values[key]})")
    for key in ("num_fewshot", "max_length"):
        if values[key] is not None and values[key] < (0 if key == "num_fewshot" else 2):
            raise LLMTuneError(f"--{key} is too small (got {values[key]})")
    if values["limit"] is not None:
        if values["limit"] <= 0:
            raise LLMTuneError(f"--limit must be > 0: a count of documents, or a fraction below 1 (got "
                               f"{values['limit']})")
        if values["limit"] >= 1:
            values["limit"] = int(values["limit"])
    if values["include_path"] and not Path(values["include_path"]).is_dir():
        raise LLMTuneError(f"--include_path {values['include_path']}: not a folder (give the folder holding your "
                           "task YAML files)")
    if values["adapter_name_or_path"] and values["finetuning_type"] != "lora":
        raise LLMTuneError(f"--adapter_name_or_path needs --finetuning_type lora (got {values['finetuning_type']!r})"
                           "; a full or freeze fine-tune is evaluated with --model_name_or_path <its output folder>")
    return values


def load_eval_model(args: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, template)`` for :func:`parse_eval_args`'s settings, loaded as ``llmtune chat`` does.

    The template is None unless chat prompts are asked for (``template`` or ``apply_chat_template``): then
    ``--template``, else the one recorded by the run that wrote the folder, else the model's ``chat_template``.

    Raises:
        LLMTuneError: from :func:`llmtune.runs.load_model` and the tokenizer/template loaders.
    """
    from llmtune.chat import resolve_device
    from llmtune.runs import load_model, recorded_template
    from llmtune.tokenizer import load_tokenizer

    device = resolve_device(args["device"])
    dtype = _DTYPES[args["infer_dtype"]]
    if dtype == "float16" and device.type == "cpu":
        notice("--infer_dtype float16: float16 arithmetic is very slow on the CPU; using float32")
        dtype = "float32"
    kw: dict[str, Any] = dict(dtype=dtype, device=str(device), adapter_name_or_path=args["adapter_name_or_path"])
    if args["quantization_bit"] is not None:
        kw.update(quantization_bit=args["quantization_bit"], quantization_type=args["quantization_type"],
                  double_quantization=args["double_quantization"])
    model = load_model(args["model_name_or_path"], **kw)
    model.eval()
    adapters = [a.strip() for a in (args["adapter_name_or_path"] or "").split(",") if a.strip()]
    last = Path(adapters[-1]) if adapters else None
    has_tok = last is not None and any((last / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(last) if has_tok else args["model_name_or_path"])
    template = None
    if args["template"] or args["apply_chat_template"]:
        from llmtune.data.templates import get_template

        name = args["template"] or recorded_template(*reversed(model.adapter_chain.parents),
                                                     args["model_name_or_path"])
        template = get_template(name, tokenizer)
    return model, tokenizer, template


def _task_manager(lm_eval: Any, include_path: Optional[str], tasks: list[str]) -> Any:
    """A ``TaskManager`` that knows ``tasks``: the ``include_path`` folder alone when it holds them all (indexing
    the harness's thousands of task files takes tens of seconds), else the harness's tasks too.

    Raises: LLMTuneError naming the unknown tasks and the nearest known names."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) - set(local.all_tasks):
            return local
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(tm.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        where = f" (nor in --include_path {include_path})" if include_path else ""
        raise LLMTuneError(f"eval: unknown task(s) {', '.join(missing)} in lm-evaluation-harness{where}."
                           + nearest(missing[0], sorted(known)) + " List them with `lm-eval ls tasks`.")
    return tm


def _output_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.suffix == ".json":
        if p.is_dir():
            raise LLMTuneError(f"--output_path {path}: is a folder; give a .json file name or a folder")
        return p
    if p.exists() and not p.is_dir():
        raise LLMTuneError(f"--output_path {path}: is a file that is not .json; give a .json file or a folder")
    return p / "results.json"


def _check_replaceable(out: Path) -> None:
    """Refuse to write over a file that an earlier ``llmtune eval`` did not write (a model's ``config.json``)."""
    if not out.exists():
        return
    try:
        old = json.loads(out.read_text(encoding="utf-8"))
        ours = isinstance(old, dict) and "llmtune" in old and "results" in old
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise LLMTuneError(f"--output_path: {out} exists and was not written by llmtune eval; choose another "
                           "file or folder (it is left as it is)")
    notice(f"{out}: replacing the results of an earlier llmtune eval")


def run_eval(args: dict[str, Any]) -> dict:
    """Load the model, run the harness, print the table, write the JSON; returns the harness's results dict.

    Args:
        args: :func:`parse_eval_args`'s settings.

    Raises:
        LLMTuneError: lm-eval missing (``pip install 'llmtune[eval]'``), unknown tasks, loading errors.
    """
    from llmtune.eval.lm import import_lm_eval, lm_class

    lm_eval = import_lm_eval()
    tm = _task_manager(lm_eval, args["include_path"], args["tasks"])
    out_file = _output_file(args["output_path"]) if args["output_path"] else None
    if out_file is not None:
        _check_replaceable(out_file)
    model, tokenizer, template = load_eval_model(args)
    chat = bool(args["template"] or args["apply_chat_template"])
    if args["template"] and not args["apply_chat_template"]:
        notice(f"--template {args['template']}: prompts are rendered as chats with it (as --apply_chat_template)")
    lm = lm_class()(model, tokenizer, batch_size=args["batch_size"], max_length=args["max_length"],
                    max_gen_toks=args["max_gen_toks"], template=template)
    seed = args["seed"]      # one value for the harness's four seeds, as its own --seed N; None: its defaults
    seeds = {} if seed is None else dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                         fewshot_random_seed=seed)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=args["tasks"], num_fewshot=args["num_fewshot"], limit=args["limit"], task_manager=tm,
            apply_chat_template=chat, system_instruction=args["system"], log_samples=bool(args["log_samples"]),
            **seeds)
    except FileNotFoundError as e:   # a task's data file (datasets raises it for local and Hub files alike)
        what = e.filename or (e.args[0] if e.args else e)
        raise LLMTuneError(f"eval: a task's data was not found: {what} (a task YAML's data_files are relative to "
                           "the folder you run in; the harness's own tasks download their data from the Hugging "
                           "Face Hub)") from None
    except (ConnectionError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise                  # a full disk, a read-only folder: the CLI's own one-line message
        raise LLMTuneError(f"eval: could not load a task's dataset ({str(e).splitlines()[0] if str(e) else e!r}); "
                           "the harness's own tasks download their data from the Hugging Face Hub: check the "
                           "network, or HF_HUB_OFFLINE and the datasets cache") from None
    if results is None:
        raise LLMTuneError("eval: the harness returned no results")
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    chain = getattr(model, "adapter_chain", None)
    results["llmtune"] = {"model_name_or_path": str(args["model_name_or_path"]),
                          "base": None if chain is None else str(chain.base),
                          "adapters": [] if chain is None else [str(a) for a in chain.adapters],
                          "template": getattr(template, "name", None) if template is not None else None,
                          "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                          "batch_size": args["batch_size"], "max_length": lm.max_length}
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
                       encoding="utf-8")
        os.replace(tmp, out_file)
        print(f"llmtune: results written to {out_file}", file=sys.stderr)
    return results


def main(argv: list[str]) -> int:
    """``llmtune eval`` entry point (called by :mod:`llmtune.cli`); returns the exit status (0).

    Raises:
        LLMTuneError: a bad key or value, lm-eval missing, an unknown task, a loading error (one line in the CLI).
    """
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    run_eval(parse_eval_args(argv))
    return 0
