"""A training run's output folder: the rules for reusing one, and what the run writes into it.

:func:`prepare_output_dir` applies the output-folder rules before anything is loaded; :func:`save_model` writes
the trained adapter (PEFT format), the full model (``model.safetensors`` + ``config.json`` with Hugging Face
names) or a reward model's value head; :func:`write_predictions` writes ``generated_predictions.jsonl``. The
run's record (``training_args.yaml``, ``llmtune.json``, tokenizer, ``generation_config.json``) is
:func:`llmtune.runs.save_metadata`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from llmtune.constants import IGNORE_INDEX
from llmtune.errors import LLMTuneError, notice
from llmtune.fileio import same_path, save_tensors
from llmtune.chat import chat_stop_ids
from llmtune.engine import Engine, Request
from llmtune.sampling import SamplingParams
from llmtune.models.value_head import save_value_head
from llmtune.peft import save_adapter
from llmtune.train import checkpoint as ckpt
from llmtune.train.distributed import is_main
from llmtune.train.guard import check_weights_finite
from llmtune.train.manifest import check_no_foreign_files
from llmtune.train.logging import LOG_FILE

#: file names (glob patterns) a training run writes into ``output_dir`` (defined with the code that removes them)
RUN_OUTPUTS = ckpt.RUN_OUTPUTS


def prepare_output_dir(cfg: Any) -> Path:
    """Apply the output-folder rules and return the folder (created).

    A non-empty ``output_dir`` (e.g. holding an earlier run) is an error unless ``overwrite_output_dir``
    (then the files and ``checkpoint-*`` folders an earlier run of ours wrote, as its manifest records them,
    :mod:`llmtune.train.manifest`, are removed later, so a LoRA run over a full run leaves no stale
    ``model.safetensors``; other files are kept; a file named like an output that no run of ours recorded
    writing, e.g. a saved model's ``config.json``, refuses the run) or
    ``resume_from_checkpoint`` is set. Nothing is removed here: the setup path calls
    ``checkpoint.clear_for_overwrite`` once the model, adapters and data have loaded.

    Raises:
        LLMTuneError: ``output_dir`` is a file, is a folder the run reads (``model_name_or_path``,
            ``adapter_name_or_path``, ``ref_model``, ``reward_model`` and their adapters), or holds a previous run; with ``overwrite_output_dir``, holds files named like a
            run's outputs that no run of ours recorded writing (listed; nothing is removed).
    """
    out = Path(str(cfg.output_dir)).expanduser()
    if out.exists() and not out.is_dir():
        raise LLMTuneError(f"output_dir: {out} is a file; give a folder path")
    if out.exists():
        for key in ("model_name_or_path", "adapter_name_or_path", "ref_model", "ref_model_adapters", "reward_model",
                    "reward_model_adapters"):
            for item in str(getattr(cfg, key) or "").split(","):
                src = Path(item.strip()).expanduser() if item.strip() else None
                if src is not None and src.exists() and same_path(src, out):
                    raise LLMTuneError(f"output_dir: {out} is the {key} folder, which this run reads; write to a "
                                       "new folder")
    resume = ckpt.resolve_resume(cfg.resume_from_checkpoint, out) if cfg.resume_from_checkpoint not in (
        None, False) else None
    from llmtune.locks import LOCK_NAME

    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if entries and resume is None and not cfg.overwrite_output_dir:
        raise LLMTuneError(
            f"output_dir: {out} is not empty (holds {', '.join(entries[:4])}...), probably a previous run; choose "
            "a new output_dir, set overwrite_output_dir: true to replace it, or resume_from_checkpoint: true to "
            "continue it")
    if entries and resume is None:  # overwrite_output_dir: a folder holding files no run of ours wrote is refused
        check_no_foreign_files(out, RUN_OUTPUTS)   # now; nothing is removed until model and data have loaded
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_model(model: torch.nn.Module, out: Path, cfg: Any, base: str, parents: Optional[list[str]] = None,
               state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write the trained adapter (PEFT format) or the full model (safetensors + config.json) to ``out``;
    a reward model's value head goes to ``value_head.safetensors`` (alone when it was trained alone).

    ``base``: the root base, written as the adapter's ``base_model_name_or_path``. ``parents`` is accepted for
    callers that pass the whole chain but not written here: :func:`llmtune.runs.save_metadata` records the
    parent adapters in ``llmtune.json``, outside PEFT's ``adapter_config.json``. ``state_dict``: the gathered full weights of an
    FSDP2-sharded model (else ``model.state_dict()``).

    Raises:
        LLMTuneError: a weight holds NaN/inf (a diverged run's weights are never saved as its output)."""
    # frozen weights are as loaded (training never changes them): only what training changed is scanned
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    check_weights_finite(state_dict.items() if state_dict is not None else trained, "the final model")
    if getattr(model, "v_head", None) is not None:
        save_value_head(model, out)
        if getattr(model, "value_head_only", False):
            return
    if cfg.finetuning_type == "lora":
        save_adapter(model, out, base_model_name_or_path=base)
        return
    dtype = torch.bfloat16 if (cfg.bf16 or cfg.fp16) else torch.float32
    tensors, seen = {}, {}
    rename = getattr(model, "checkpoint_name", None) or (lambda n: n)   # a VL model's checkpoint layout
    for name, t in (state_dict if state_dict is not None else model.state_dict(keep_vars=False)).items():
        if id(t) in seen or (name == "lm_head.weight" and model.config.tie_word_embeddings) or name.startswith("v_head."):
            continue
        seen[id(t)] = name
        tensors[rename(name)] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    save_tensors(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def write_predictions(model: torch.nn.Module, tokenizer: Any, template: Any, rows: Any, path: Path, cfg: Any,
                      batch_size: Optional[int] = None) -> int:
    """Generate a reply to each row's prompt and write ``{"prompt", "predict", "label"}`` JSON lines.

    The prompt is the row's tokens before its first label token; the label is the decoded label tokens.
    Generation runs all prompts on one :class:`llmtune.engine.Engine` with ``batch_size`` slots with the
    config's sampling keys and the template's stop ids. Returns the number of rows written.
    """
    stop = chat_stop_ids(tokenizer, template)
    params = SamplingParams(cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    bs = batch_size or cfg.per_device_eval_batch_size
    model.eval()
    prompts, labels = [], []
    for j in range(len(rows)):
        lab = list(rows[j]["labels"])
        first = next((k for k, v in enumerate(lab) if v != IGNORE_INDEX), len(lab))
        prompts.append(list(rows[j]["input_ids"][:first]))
        labels.append([v for v in lab if v != IGNORE_INDEX])
    replies: list = [[] for _ in prompts]
    if prompts and cfg.max_new_tokens > 0:   # continuous batching: a finished row's slot takes the next prompt
        from llmtune.train.eval_report import progress

        engine = Engine(model, max_slots=max(1, min(bs, len(prompts))),
                        max_len=max(map(len, prompts)) + cfg.max_new_tokens)
        chunk = 4 * max(1, bs)   # the progress bar advances per chunk; slots are refilled within one
        replies = []
        for i in progress(range(0, len(prompts), chunk), -(-len(prompts) // chunk), "predict", not cfg.disable_tqdm):
            replies += [d.tokens for d in engine.run([Request(p, cfg.max_new_tokens, params, stop)
                                                      for p in prompts[i:i + chunk]])]
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for p, lab, reply in zip(prompts, labels, replies):
            rec = {"prompt": tokenizer.decode(p, skip_special_tokens=False),
                   "predict": tokenizer.decode(reply, skip_special_tokens=True),
                   "label": tokenizer.decode(lab, skip_special_tokens=True)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n
