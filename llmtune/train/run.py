"""``llmtune train``: config -> model -> data -> Trainer -> output folder, read top to bottom in :func:`run_train`.

The output folder describes itself (DESIGN.md "Outputs describe themselves"):

* the adapter (``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's format, with
  ``base_model_name_or_path`` the absolute path of the base actually loaded and, for chained stages,
  ``llmtune_parent_adapters``: the earlier adapter folders in the order they were merged), or the full
  model (``model.safetensors`` + ``config.json`` with Hugging Face names);
* ``training_args.yaml`` (the full config, with the template actually used), ``llmtune.json`` (template,
  stage, finetuning type, base, parent adapters), the tokenizer files, ``generation_config.json`` whose
  ``eos_token_id`` lists the tokenizer's eos and the template's end-of-turn ids;
* ``trainer_log.jsonl``, ``training_loss.png`` (``plot_loss``), ``train_results.json``,
  ``eval_results.json``, ``all_results.json`` as LLaMA-Factory writes them, and
  ``generated_predictions.jsonl`` for ``do_predict`` + ``predict_with_generate``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch

from llmtune.errors import LLMTuneError, notice
from llmtune.train import checkpoint as ckpt
from llmtune.train.logging import LOG_FILE
from llmtune.train.trainer import Trainer, _is_main, cpu_supports_bf16, pad_collate, set_seed, write_json

#: files that mark a folder as the output of an earlier run
RUN_MARKERS = ("trainer_log.jsonl", "training_args.yaml", "adapter_model.safetensors", "model.safetensors",
               "all_results.json", "train_results.json")


def as_config(config: Any):
    """A validated ``llmtune.config.TrainConfig`` from a TrainConfig, a dict, or a YAML path."""
    from llmtune.config import TrainConfig, parse_config

    if isinstance(config, TrainConfig):
        return parse_config(config, command="train")
    return parse_config(config, command="train")


#: file names (glob patterns) a training run writes into ``output_dir``; ``overwrite_output_dir`` removes these
RUN_OUTPUTS = (LOG_FILE, "adapter_config.json", "adapter_model.safetensors", "model.safetensors",
               "model-*-of-*.safetensors", "model.safetensors.index.json", "value_head.safetensors", "config.json",
               "generation_config.json", "train_results.json", "eval_results.json", "all_results.json",
               "training_args.yaml", "llmtune.json", "generated_predictions.jsonl", "training_*.png",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def prepare_output_dir(cfg: Any) -> Path:
    """Apply the output-folder rules and return the folder (created).

    A non-empty ``output_dir`` (e.g. holding an earlier run) is an error unless ``overwrite_output_dir``
    (then the files and ``checkpoint-*`` folders a run writes, :data:`RUN_OUTPUTS`, are removed first, so a
    LoRA run over a full run leaves no stale ``model.safetensors``; other files are kept) or
    ``resume_from_checkpoint`` is set. Nothing is touched when it raises.

    Raises:
        LLMTuneError: ``output_dir`` is a file, is a folder the run reads (``model_name_or_path``,
            ``adapter_name_or_path``, ``ref_model``, ``reward_model`` and their adapters), or holds a previous run.
    """
    out = Path(str(cfg.output_dir)).expanduser()
    if out.exists() and not out.is_dir():
        raise LLMTuneError(f"output_dir: {out} is a file; give a folder path")
    if out.exists():
        for key in ("model_name_or_path", "adapter_name_or_path", "ref_model", "ref_model_adapters", "reward_model",
                    "reward_model_adapters"):
            for item in str(getattr(cfg, key, None) or "").split(","):
                src = Path(item.strip()).expanduser() if item.strip() else None
                if src is not None and src.exists() and src.resolve() == out.resolve():
                    raise LLMTuneError(f"output_dir: {out} is the {key} folder, which this run reads; write to a "
                                       "new folder")
    resume = ckpt.resolve_resume(cfg.resume_from_checkpoint, out) if cfg.resume_from_checkpoint not in (
        None, False) else None
    if out.is_dir() and any(out.iterdir()) and resume is None:
        if not cfg.overwrite_output_dir:
            found = sorted(p.name for p in out.iterdir())[:4]
            raise LLMTuneError(
                f"output_dir: {out} is not empty (holds {', '.join(found)}...), probably a previous run; choose a "
                "new output_dir, set overwrite_output_dir: true to replace it, or resume_from_checkpoint: true to "
                "continue it")
        if _is_main():
            notice(f"overwrite_output_dir: replacing the previous run in {out}")
            for p in out.iterdir():
                if p.is_dir() and (ckpt.CHECKPOINT_RE.match(p.name) or p.name.startswith("tmp-checkpoint-")):
                    shutil.rmtree(p)
                elif p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_OUTPUTS):
                    p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _device(cfg: Any) -> str:
    if getattr(cfg, "device", None):
        return str(cfg.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_dtype(cfg: Any, device_type: str) -> torch.dtype:
    """The dtype to load the base model in.

    Full fine-tuning: float32 (the trained weights are float32; bf16/fp16 then mean autocast). LoRA/freeze:
    bfloat16 for ``bf16`` (and for ``fp16`` on a CPU that supports bfloat16), float16 for ``fp16`` on CUDA,
    else float32; the trainable parameters are upcast to float32 by ``apply_lora``/``apply_freeze``.
    """
    if cfg.finetuning_type == "full":
        return torch.float32
    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16:
        if device_type == "cpu":
            return torch.bfloat16 if cpu_supports_bf16() else torch.float32
        return torch.float16
    return torch.float32


def adapter_chain(cfg: Any) -> tuple[str, list[str]]:
    """``(root_base, parent_adapters)`` of a run: the base model actually loaded and the adapter folders
    merged into it in order (from a LoRA output folder as ``model_name_or_path`` and from
    ``adapter_name_or_path``), as absolute paths."""
    from llmtune.models.loader import resolve_model_chain

    base, chain = resolve_model_chain(cfg.model_name_or_path)
    parents = [str(p) for p in chain]
    if cfg.adapter_name_or_path:
        items = [a.strip() for a in str(cfg.adapter_name_or_path).split(",") if a.strip()]
        for item in items:
            root, sub = resolve_model_chain(item)
            same_root = Path(root).exists() and Path(base).exists() and Path(root).resolve() == Path(base).resolve()
            if len(sub) > 1 and same_root and not chain:
                parents.extend(str(p) for p in sub)
            else:
                parents.append(str(Path(item).expanduser().resolve()))
    return base, parents


def apply_finetuning_type(model: torch.nn.Module, cfg: Any) -> None:
    """Choose the trainable parameters: ``lora`` (``llmtune.peft.apply_lora`` with the ``lora_*`` keys),
    ``freeze`` (``apply_freeze``) or ``full`` (everything, in float32)."""
    from llmtune import peft

    if cfg.stage not in ("rm", "ppo") and getattr(cfg, "value_head_lr", None) is not None:
        notice(f"value_head_lr only applies to stages rm and ppo (the value head's learning rate); stage is "
               f"{cfg.stage}, so it is ignored")
    if cfg.finetuning_type != "lora":
        lora_keys = [k for k in ("lora_target", "lora_rank", "lora_alpha", "use_dora", "use_rslora")
                     if hasattr(cfg, "is_set") and cfg.is_set(k)]
        if lora_keys:
            one = len(lora_keys) == 1
            notice(f"{', '.join(lora_keys)} only appl{'ies' if one else 'y'} to finetuning_type lora; "
                   f"finetuning_type is {cfg.finetuning_type}, so {'it is' if one else 'they are'} ignored")
    if cfg.finetuning_type == "lora":
        peft.apply_lora(model, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        lora_target=cfg.lora_target, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                        additional_target=cfg.additional_target)
    elif cfg.finetuning_type == "freeze":
        peft.apply_freeze(model, freeze_trainable_layers=cfg.freeze_trainable_layers,
                          freeze_trainable_modules=cfg.freeze_trainable_modules,
                          freeze_extra_modules=getattr(cfg, "freeze_extra_modules", None))
    else:
        if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
            raise LLMTuneError("finetuning_type: full cannot train 4-bit quantized weights; use finetuning_type: "
                               "lora (QLoRA) or remove quantization_bit")
        for p in model.parameters():
            p.requires_grad_(True)
            if p.dtype != torch.float32:
                p.data = p.data.float()
    for p in model.parameters():  # trainable parameters in float32 whatever the base dtype
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def _collator(cfg: Any, tokenizer: Any, stage: str):
    """The data package's collator for ``stage`` when it has one, else :func:`pad_collate`."""
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    try:
        from llmtune.data import collator as coll
    except ImportError:
        coll = None
    if coll is not None and hasattr(coll, "get_collator"):
        return coll.get_collator(stage, pad, padding_free=bool(getattr(cfg, "padding_free", True)))
    return lambda rows: pad_collate(rows, pad)


def run_train(config: Union[dict, str, Path, Any]) -> dict[str, Any]:
    """Run one ``llmtune train`` job and return its results (LLaMA-Factory's ``all_results.json`` dict).

    Args:
        config: an ``llmtune.config.TrainConfig``, a dict of LLaMA-Factory keys, or a YAML path.

    Raises:
        LLMTuneError: any configuration or data mistake (one message naming the key/file/flag).
        KeyboardInterrupt: Ctrl-C, after saving ``checkpoint-<step>`` in ``output_dir``.

    Under ``torchrun`` (``WORLD_SIZE`` set) the process group lives for the call
    (``llmtune.train.distributed.distributed_session``): every rank trains its data shard, rank 0 writes.
    """
    cfg = as_config(config)
    from llmtune.train.distributed import distributed_session

    out = Path(str(cfg.output_dir)).expanduser() if cfg.output_dir else None
    existed = out is not None and out.exists()
    try:
        with distributed_session(cfg):
            return _run_train(cfg)
    except BaseException:
        # a run that failed before writing anything leaves no empty output_dir behind (a later run may use it)
        if out is not None and not existed and out.is_dir() and not any(out.iterdir()):
            try:
                out.rmdir()
            except OSError:
                pass
        raise


def _run_train(cfg: Any) -> dict[str, Any]:
    from llmtune.train.distributed import barrier, gather_full_state_dict, world_size

    if cfg.stage == "ppo":  # PPO's loop (rollouts, reward model) is its own: llmtune/train/ppo.py
        if world_size() > 1:
            raise LLMTuneError("stage ppo runs in one process (its rollout loop is not distributed yet); start it "
                               "with llmtune train (not torchrun), or scale pt/sft/rm/dpo/kto with torchrun")
        from llmtune.train.ppo import run_ppo

        return run_ppo(cfg)
    out = prepare_output_dir(cfg)
    barrier()  # every rank has checked output_dir before rank 0 writes into it
    from llmtune.data import get_dataset
    from llmtune.data.templates import get_template
    from llmtune.models.loader import load_model
    from llmtune.tokenizer import load_tokenizer

    set_seed(cfg.seed)
    device = _device(cfg)

    # model: the base (a LoRA output folder as model_name_or_path loads its base and merges the chain)
    base, parents = adapter_chain(cfg)
    model = load_model(cfg.model_name_or_path, dtype=load_dtype(cfg, device.split(":")[0]), device=device,
                       adapter_name_or_path=cfg.adapter_name_or_path, quantization_bit=cfg.quantization_bit,
                       quantization_type=cfg.quantization_type, double_quantization=cfg.double_quantization)
    from llmtune.train.stages_rm import value_head_only

    head_only = value_head_only(model, cfg)  # rm with the seed's `--lora_target value`: the value head alone
    if cfg.finetuning_type == "lora" and not head_only:  # a bad lora_target fails before the data is read
        from llmtune.peft.lora import select_lora_targets

        select_lora_targets(model, cfg.lora_target)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    template_name = cfg.template or _recorded_template(cfg.model_name_or_path, *reversed(parents))
    template = get_template(template_name, tokenizer)

    # data (the data code raises LLMTuneError for e.g. a dataset whose every label is masked)
    splits = get_dataset(cfg, tokenizer, template, cfg.stage)
    train_rows, eval_rows = splits.train, splits.eval
    if eval_rows and cfg.do_train and not cfg.do_eval and cfg.eval_strategy == "no":
        notice(f"{len(eval_rows)} evaluation rows (val_size / eval_dataset) are set aside but nothing evaluates "
               "them; set do_eval: true (after training) or eval_strategy: steps/epoch (during training)")

    # trainable parameters (LoRA init depends on the seed only), then the loop
    set_seed(cfg.seed)
    from llmtune.train.stages_pref import reference_extra
    from llmtune.train.stages_rm import prepare_reward_model

    if not head_only:
        apply_finetuning_type(model, cfg)
    if cfg.stage == "rm":
        prepare_reward_model(model, cfg, head_only)  # model.v_head, trainable
    extra = reference_extra(model, cfg, device)  # dpo/kto reference when not LoRA (frozen copy / ref_model)
    results: dict[str, Any] = {}
    trainer = Trainer(model, cfg, train_rows if cfg.do_train else (eval_rows or train_rows), eval_rows,
                      collator=_collator(cfg, tokenizer, cfg.stage), tokenizer=tokenizer, ctx_extra=extra)
    if cfg.do_train:
        train_results = trainer.train()
        results.update(train_results)
        full_state = gather_full_state_dict(model)  # FSDP2: a collective on every rank; None otherwise
        if _is_main():
            save_model(model, out, cfg, base, parents, state_dict=full_state)
            write_json(out / "train_results.json", train_results)
    if _is_main():
        save_metadata(out, cfg, tokenizer, template, base, parents)
    if cfg.do_eval:
        if trainer.eval_dataset is None:
            notice("do_eval: there is no evaluation data (set val_size or eval_dataset); skipping evaluation")
        else:
            ev = trainer.evaluate()
            ev["perplexity"] = math.exp(min(ev["eval_loss"], 700.0)) if cfg.stage in ("pt", "sft") else None
            ev = {k: v for k, v in ev.items() if v is not None}
            results.update(ev)
            if _is_main():
                write_json(out / "eval_results.json", ev)
    if cfg.do_predict:
        rows = eval_rows if eval_rows else (None if cfg.do_train else train_rows)
        if not cfg.predict_with_generate:
            notice("do_predict without predict_with_generate: nothing to predict; set predict_with_generate: true")
        elif rows is None:
            notice("do_predict: there is no evaluation data (set val_size or eval_dataset); skipping predictions")
        elif cfg.stage not in ("pt", "sft"):
            notice(f"do_predict: predictions are written for stage sft only, not {cfg.stage}; skipping")
        elif _is_main():
            write_predictions(model, tokenizer, template, rows, out / "generated_predictions.jsonl", cfg)
    if _is_main():
        write_json(out / "all_results.json", results)
        if cfg.plot_loss:
            from llmtune.train.plotting import plot_loss

            plot_loss(out)
    return results


def _recorded_template(*folders: str) -> Optional[str]:
    """The template recorded in ``training_args.yaml`` of an earlier llmtune output folder (chained stages)."""
    import yaml

    for folder in folders:
        f = Path(str(folder)) / "training_args.yaml"
        if f.is_file():
            try:
                name = (yaml.safe_load(f.read_text()) or {}).get("template")
            except yaml.YAMLError:
                continue
            if name:
                return str(name)
    return None


def save_model(model: torch.nn.Module, out: Path, cfg: Any, base: str, parents: list[str],
               state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write the trained adapter (PEFT format) or the full model (safetensors + config.json) to ``out``;
    a reward model's value head goes to ``value_head.safetensors`` (alone when it was trained alone).
    ``state_dict``: the gathered full weights of an FSDP2-sharded model (else ``model.state_dict()``)."""
    if getattr(model, "v_head", None) is not None:
        from llmtune.models.value_head import save_value_head

        save_value_head(model, out)
        if getattr(model, "value_head_only", False):
            return
    if cfg.finetuning_type == "lora":
        from llmtune.peft import save_adapter

        save_adapter(model, out, base_model_name_or_path=base,
                     extra_config={"llmtune_parent_adapters": parents} if parents else None)
        return
    from llmtune.fileio import save_tensors

    dtype = torch.bfloat16 if (cfg.bf16 or cfg.fp16) else torch.float32
    tensors, seen = {}, {}
    for name, t in (state_dict if state_dict is not None else model.state_dict(keep_vars=False)).items():
        if id(t) in seen or (name == "lm_head.weight" and model.config.tie_word_embeddings) or name.startswith("v_head."):
            continue
        seen[id(t)] = name
        tensors[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    save_tensors(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def save_metadata(out: Path, cfg: Any, tokenizer: Any, template: Any, base: str, parents: list[str]) -> None:
    """Write ``training_args.yaml``, ``llmtune.json``, the tokenizer files and ``generation_config.json``."""
    import yaml

    from llmtune import __version__

    args = cfg.to_dict()
    args["template"] = template.name
    (out / "training_args.yaml").write_text(yaml.safe_dump(args, sort_keys=False, allow_unicode=True))
    meta = {"llmtune_version": __version__, "stage": cfg.stage, "finetuning_type": cfg.finetuning_type,
            "template": template.name, "base_model_name_or_path": base, "parent_adapters": parents}
    write_json(out / "llmtune.json", meta)
    tokenizer.save_pretrained(str(out))
    eos = list(dict.fromkeys(list(getattr(tokenizer, "eos_token_ids", None) or
                                  ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
                             + list(template.stop_token_ids or [])))
    gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
           "pad_token_id": tokenizer.pad_token_id, "do_sample": bool(cfg.do_sample),
           "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
           "max_new_tokens": cfg.max_new_tokens, "repetition_penalty": cfg.repetition_penalty}
    write_json(out / "generation_config.json", gen)


@torch.no_grad()
def write_predictions(model: torch.nn.Module, tokenizer: Any, template: Any, rows: Any, path: Path, cfg: Any,
                      batch_size: Optional[int] = None) -> int:
    """Generate a reply to each row's prompt and write ``{"prompt", "predict", "label"}`` JSON lines.

    The prompt is the row's tokens before its first label token; the label is the decoded label tokens.
    Generation uses ``llmtune.generation.generate`` with the config's sampling keys and the template's
    stop ids. Returns the number of rows written.
    """
    from llmtune.generation import chat_stop_ids, generate

    stop = chat_stop_ids(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bs = batch_size or cfg.per_device_eval_batch_size
    model.eval()
    device = next(model.parameters()).device
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(0, len(rows), bs):
            prompts, labels = [], []
            for row in (rows[j] for j in range(i, min(i + bs, len(rows)))):
                lab = list(row["labels"])
                first = next((k for k, v in enumerate(lab) if v != -100), len(lab))
                prompts.append(list(row["input_ids"][:first]))
                labels.append([v for v in lab if v != -100])
            t = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (t - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts], device=device)
            tokens, lengths = generate(model, ids, mask, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                       temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                       repetition_penalty=cfg.repetition_penalty, eos_token_ids=stop,
                                       pad_token_id=pad, return_lengths=True)
            for p, lab, tok, ln in zip(prompts, labels, tokens.tolist(), lengths.tolist()):
                rec = {"prompt": tokenizer.decode(p, skip_special_tokens=False),
                       "predict": tokenizer.decode(tok[:ln], skip_special_tokens=True),
                       "label": tokenizer.decode(lab, skip_special_tokens=True)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    return n
