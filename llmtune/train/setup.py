"""``llmtune train``: one setup path for every stage, read top to bottom in :func:`run_train`.

config -> output folder -> model (base + adapter chain, 4-bit, then the trainable parameters; ``ref_model``) ->
tokenizer/template -> data -> stage -> :class:`~llmtune.train.trainer.Trainer` -> outputs. Each step is a line
or a few of :func:`_run_steps`, in that order, calling the module that does the work (the base model:
``train/precision.py``; the trainable parameters and the stage's extras: ``train/finetuning.py``; the data:
``llmtune.data``), so a reader goes down into each part once. An online stage (ppo) takes the same path: its
prompt rows are the data, and step 6 also builds the stage object (``build`` in
:data:`llmtune.train.stages.STAGES`) whose rollouts feed the Trainer.

What the output folder holds (DESIGN.md "Outputs describe themselves"):

* the adapter (``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's format, with
  ``base_model_name_or_path`` the absolute path of the root base actually loaded), or the full model
  (``model.safetensors`` + ``config.json`` with Hugging Face names) (:func:`llmtune.train.outputs.save_model`);
* ``training_args.yaml`` (the full config, with the template actually used), ``llmtune.json`` (template,
  stage, finetuning type, base, and the adapter chain that was merged under this run), the tokenizer files,
  ``generation_config.json`` (:func:`llmtune.runs.save_metadata`);
* ``trainer_log.jsonl``, ``training_loss.png`` (``plot_loss``), ``train_results.json``,
  ``eval_results.json``, ``all_results.json`` as LLaMA-Factory writes them, and
  ``generated_predictions.jsonl`` for ``do_predict`` + ``predict_with_generate``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from llmtune import runs
from llmtune.config import parse_config
from llmtune.data import get_dataset
from llmtune.data.collator import get_collator
from llmtune.data.multimodal import ImageCollator, model_processor
from llmtune.data.templates import get_template
from llmtune.errors import notice
from llmtune.fileio import write_json
from llmtune.peft.targets import select_lora_targets
from llmtune.tokenizer import load_tokenizer
from llmtune.locks import lock_output
from llmtune.train import manifest
from llmtune.train.checkpoint import clear_for_overwrite
from llmtune.train import eval_report, summary
from llmtune.train.distributed import barrier, distributed_session, is_main
from llmtune.train.wrap import full_parameters, gather_full_state_dict, unwrap
from llmtune.train.finetuning import prepare_stage
from llmtune.train.metrics import write_predict_results
from llmtune.train.outputs import RUN_OUTPUTS, prepare_output_dir, save_model, write_predictions
from llmtune.train.plotting import plot_loss
from llmtune.train.precision import load_base_model, train_device
from llmtune.train.seed import set_seed
from llmtune.train.stages import stage_info
from llmtune.train.trainer import Trainer


def run_train(config: Union[dict, str, Path, Any], **stage_options: Any) -> dict[str, Any]:
    """Run one ``llmtune train`` job and return its results (LLaMA-Factory's ``all_results.json`` dict).

    Args:
        config: an ``llmtune.config.TrainConfig``, a dict of LLaMA-Factory keys, or a YAML path.
        stage_options: keyword arguments for an online stage's ``build`` (``reward_fn=`` for ppo).

    Raises:
        LLMTuneError: any configuration or data mistake (one message naming the key/file/flag).
        KeyboardInterrupt: Ctrl-C, after saving ``checkpoint-<step>`` in ``output_dir``.

    Under ``torchrun`` (``WORLD_SIZE`` set) the process group lives for the call
    (``llmtune.train.distributed.distributed_session``): every rank trains its data shard, rank 0 writes.
    """
    cfg = parse_config(config, command="train")                          # 1. the config, validated
    if cfg.push_to_hub and cfg.do_train:   # before anything is written: a repo id, online, a token
        from llmtune.train.hub import check_ready

        check_ready(cfg)
    out_dir = Path(str(cfg.output_dir)).expanduser()
    with distributed_session(cfg), _no_empty_output_dir_left(cfg), lock_output(out_dir, "output_dir"):
        # the model and trainer live in _run_steps' frame: they are gone (their FSDP/DDP state included)
        # before distributed_session destroys the process group
        results = _run_steps(cfg, stage_options)
        push = cfg.push_to_hub and cfg.do_train and is_main()
    if push:   # 9. the finished folder (lock released, manifest written), uploaded by rank 0 (train/hub.py)
        from llmtune.train.hub import push_output

        push_output(cfg, out_dir)
    return results


def _run_steps(cfg: Any, stage_options: dict[str, Any]) -> dict[str, Any]:
    """Steps 2-8 of :func:`run_train` inside its session (``cfg`` validated)."""
    stage = stage_info(cfg.stage)
    if stage.check is not None:
        stage.check(cfg, **stage_options)                             #    (ppo: the reward model folder)
    out = prepare_output_dir(cfg)                                     # 2. the output folder
    barrier()  # every rank has checked output_dir before rank 0 writes into it
    set_seed(cfg.seed)
    model = load_base_model(cfg)                                      # 3. base + adapter chain (+ 4-bit)
    uses_ref = cfg.ref_model and stage.reference is not None and stage.reference(cfg)
    ref = load_base_model(cfg, reference=True) if uses_ref else None  #    ref_model: a stage's reference policy
    head_only = stage.head_only is not None and stage.head_only(model, cfg)   # rm: the value head alone
    if cfg.finetuning_type == "lora" and not head_only:
        select_lora_targets(model, cfg.lora_target)                   #    (a bad lora_target fails here)
    tokenizer = load_tokenizer(cfg.model_name_or_path)                # 4. tokenizer; template: the given one,
    template = get_template(cfg.template or model.adapter_chain.template, tokenizer)   # else the chain's
    data = get_dataset(cfg, tokenizer, template, stage.data)          # 5. data
    train_rows, eval_rows = data.train, data.eval
    set_seed(cfg.seed)  # LoRA init depends on the seed only
    extra = prepare_stage(model, cfg, head_only, ref)                 # 6. trainable params, head, reference
    online = (stage.build(model, cfg, tokenizer, template, train_rows, extra, **stage_options)
              if stage.online else None)                              #    (ppo: reward model, critic)
    # 7. the loop: the stage's collator (packed where exact; with the images for a vision-language model)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    collator = get_collator(stage.collator, pad, padding_free=cfg.padding_free)
    processor = model_processor(cfg.model_name_or_path, cfg.image_max_pixels, cfg.image_min_pixels)
    if processor is not None and getattr(unwrap(model), "visual", None) is not None:
        collator = ImageCollator(collator, processor)   # + pixel_values, image_grid_thw of the rows' images
    rows = train_rows if cfg.do_train else (eval_rows or train_rows)   # (evaluation only: the eval rows)
    trainer = Trainer(model, cfg, rows, eval_rows, collator=collator, tokenizer=tokenizer, ctx_extra=extra,
                      online=online)
    eval_report.check_best_metric(trainer, cfg.do_eval)   # a bad metric_for_best_model: now, not after training
    if not is_main():
        return train_evaluate_save(trainer, cfg, out, tokenizer, template, eval_rows, train_rows)
    clear_for_overwrite(cfg, out)  # all checked (config, model, adapters, data, optimizer): only now clear an old run
    before = manifest.snapshot(out, RUN_OUTPUTS)
    try:   # the run's record first: every checkpoint carries it (a LoRA checkpoint-N is an adapter folder too)
        recorded = False   # (a resumed run keeps the record of its start; the end writes the current one)
        if not (out / runs.RUN_RECORD).is_file():
            recorded = _record_at_start(out, cfg, tokenizer, template, model.adapter_chain)
        return train_evaluate_save(trainer, cfg, out, tokenizer, template, eval_rows, train_rows,  # 8. outputs
                                   recorded=recorded)
    finally:  # also after an error or Ctrl-C: what this run wrote is recorded, so a later overwrite may replace it
        with contextlib.suppress(OSError):
            manifest.record_outputs(out, RUN_OUTPUTS, before)


def _record_at_start(out: Path, cfg: Any, tokenizer: Any, template: Any, chain: runs.AdapterChain) -> bool:
    """:func:`llmtune.runs.save_metadata` before training, so checkpoints carry the run's record; a failure
    (a full disk) is a notice here: the checkpoint or final save reports the disk in its own error. Returns
    whether the record was written."""
    try:
        runs.save_metadata(out, cfg, tokenizer, template, chain.base, chain.parents)
        return True
    except Exception as err:  # noqa: BLE001 - the tokenizer library raises plain Exception for I/O errors
        notice(f"could not write the run's record in {out} before training ({str(err)[:120]}); checkpoints will "
               "not carry llmtune.json and the tokenizer")
        (out / runs.RUN_RECORD).unlink(missing_ok=True)
        return False


@contextlib.contextmanager
def _no_empty_output_dir_left(cfg: Any) -> Iterator[None]:
    """A run that fails before writing anything leaves no empty ``output_dir`` behind (a later run may use it)."""
    out = Path(str(cfg.output_dir)).expanduser() if cfg.output_dir else None
    existed = out is not None and out.exists()
    try:
        yield
    except BaseException:
        if out is not None and not existed and out.is_dir() and not any(out.iterdir()):
            try:
                out.rmdir()
            except OSError:
                pass
        raise


def train_evaluate_save(trainer: Trainer, cfg: Any, out: Path, tokenizer: Any, template: Any,
                        eval_rows: Optional[Sequence[dict]], train_rows: Sequence[dict],
                        recorded: bool = False) -> dict[str, Any]:
    """Step 8: train (``do_train``), save the model and the run's record, evaluate (``do_eval``), write
    predictions (``do_predict``), ``all_results.json`` and the loss plots. Rank 0 alone writes. ``recorded``:
    this run wrote its record before training (:func:`_record_at_start`); nothing it holds (config, template,
    tokenizer, base) changes while training, so it is not written a second time (the tokenizer files alone
    are 3.5 MB for the e2e model)."""
    model = unwrap(trainer.model)  # the user's model (DDP wraps it)
    chain = model.adapter_chain
    results: dict[str, Any] = {}
    if cfg.do_train:
        summary.report_start(cfg, model, trainer, train_device(cfg))  # the run's summary (train/summary.py)
        train_results = trainer.train()
        results.update(train_results)
        if trainer.online is not None:
            trainer.online.before_save(model)  # ppo: drop the reward adapter
        full_state = gather_full_state_dict(model)  # FSDP2: a collective on every rank; None otherwise
        if is_main():
            with full_parameters(model, full_state):  # FSDP2 LoRA: the gathered adapters stand in for the shards
                save_model(model, out, cfg, chain.base, state_dict=full_state)
            write_json(out / "train_results.json", train_results)
    if is_main() and not recorded:
        runs.save_metadata(out, cfg, tokenizer, template, chain.base, chain.parents)
    if cfg.do_eval:
        if trainer.eval_dataset is None:
            notice("do_eval: there is no evaluation data (set val_size or eval_dataset); skipping evaluation")
        else:
            ev = trainer.evaluate()
            ev["perplexity"] = math.exp(min(ev["eval_loss"], 700.0)) if stage_info(cfg.stage).perplexity else None
            ev = {k: v for k, v in ev.items() if v is not None}
            results.update(ev)
            eval_report.print_metrics("eval", ev)
            if is_main():
                write_json(out / "eval_results.json", ev)
    if cfg.do_predict:
        rows = eval_rows if eval_rows else (None if cfg.do_train else train_rows)
        if not cfg.predict_with_generate:
            notice("do_predict without predict_with_generate: nothing to predict; set predict_with_generate: true")
        elif rows is None:
            notice("do_predict: there is no evaluation data (set val_size or eval_dataset); skipping predictions")
        elif not stage_info(cfg.stage).predict:
            notice(f"do_predict: predictions are written for stage sft only, not {cfg.stage}; skipping")
        elif is_main():
            write_predictions(model, tokenizer, template, rows, out / "generated_predictions.jsonl", cfg)
            scores = write_predict_results(out)  # BLEU-4, ROUGE-1/2/L (train/metrics.py)
            results.update(scores)
            eval_report.print_metrics("predict", scores)
    if is_main():
        write_json(out / "all_results.json", results)
        if cfg.plot_loss:
            plot_loss(out, keys=("loss", "eval_loss", "reward") if stage_is_online(cfg) else ("loss", "eval_loss"))
        if cfg.do_train:
            summary.report_end(cfg, results, out, trainer, train_device(cfg))
    return results


def stage_is_online(cfg: Any) -> bool:
    """True for a stage that learns from rollouts (ppo)."""
    return stage_info(cfg.stage).online
