"""The run's summary: a few lines printed when training starts and when it ends, by every stage.

At the start: the model, trainable parameters (count and % of all), training examples, optimizer steps,
precision and device. At the end: the final loss, examples and tokens seen, the time, tokens per second,
the peak memory and ``saved to <output_dir>: <adapter or model>, <plot>, <log>``. The same numbers are in
``all_results.json``; LLaMA-Factory and TRL print theirs the same way (``***** train metrics *****``).

The ``format_*`` functions take plain values and return the lines (tested); :func:`report_start` and
:func:`report_end` gather those values from a run's objects and print them on the main process only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, TextIO

__all__ = ["format_count", "format_bytes", "format_duration", "format_start", "format_end", "peak_memory",
           "count_parameters", "report_start", "report_end"]

#: files a run writes that the end summary names, in this order: (file name, what it is)
SAVED_FILES = (("adapter_model.safetensors", "adapter"), ("model.safetensors", "model"),
               ("model.safetensors.index.json", "model"), ("value_head.safetensors", "value head"),
               ("training_loss.png", "plot"), ("training_reward.png", "plot"), ("trainer_log.jsonl", "log"))


def format_count(n: int) -> str:
    """``n`` (int) with thousands separators and, from 10 000 on, a short form: ``4,884,480 (4.88M)``."""
    n = int(n)
    if abs(n) < 10_000:
        return f"{n:,}"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n:,} ({n / div:.3g}{unit})"
    return f"{n:,}"  # pragma: no cover


def format_bytes(n: Optional[float]) -> str:
    """A byte count as ``512 MiB`` / ``1.25 GiB`` (binary units); ``None`` gives ``n/a``."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.3g} {unit}" if unit == "GiB" else f"{n / div:.0f} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """Seconds (float) as ``42.3s``, ``4m 05s`` or ``1h 02m 03s``."""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s"


def format_start(model: str, trainable: int, total: int, examples: int, steps: int, precision: str, device: str,
                 stage: Optional[str] = None, finetuning_type: Optional[str] = None,
                 resumed: Optional[str] = None) -> list[str]:
    """The start-of-run lines.

    Args:
        model: the model path or name as given (``model_name_or_path``).
        trainable: trainable parameters (elements of tensors with ``requires_grad``); total: all parameters.
        examples: training examples (rows after preprocessing); steps: optimizer steps of the run.
        precision: e.g. ``bf16``, ``fp16``, ``fp32``; device: e.g. ``cpu``, ``cuda:0``.
        stage, finetuning_type: shown in the header when given (``sft``, ``lora``).
        resumed: ``"<checkpoint folder> (step N)"`` when the run resumes; adds a ``resumed from`` line.

    Returns:
        lines (no newline), the first ``***** llmtune train: <stage> <type> *****``.
    """
    what = " ".join(x for x in (stage, finetuning_type) if x)
    pct = 100.0 * trainable / total if total else 0.0
    return [f"***** llmtune train{': ' + what if what else ''} *****",
            f"  model: {model}",
            f"  trainable parameters: {format_count(trainable)} of {format_count(total)} ({pct:.4g}%)",
            f"  examples: {examples:,}   steps: {steps:,}",
            f"  precision: {precision}   device: {device}"] + ([f"  resumed from: {resumed}"] if resumed else [])


def format_end(final_loss: Optional[float], examples_seen: int, tokens_seen: Optional[int], runtime_s: float,
               peak_memory_bytes: Optional[float], output_dir: str, saved: list[tuple[str, str]],
               peak_memory_kind: str = "", session_tokens: Optional[int] = None,
               train_loss: Optional[float] = None) -> list[str]:
    """The end-of-run lines.

    Args:
        final_loss: the training loss of the last logged steps (``None``: not known).
        examples_seen: training examples processed (dataset rows, counted by the trainer step by step; PPO: steps x
            rollout size).
        tokens_seen: input tokens processed (``None``: not counted by this stage).
        runtime_s: training time in seconds; tokens per second is ``session_tokens / runtime_s``.
        peak_memory_bytes: peak memory in bytes (``None``: unknown); peak_memory_kind says what was
            measured (``CUDA allocated``, ``process RSS``).
        output_dir: the output folder; saved: ``(file name, what it is)`` pairs of the files written there.
        session_tokens: the tokens processed during ``runtime_s`` (a resumed run: those since the resume;
            ``None``: ``tokens_seen``).
        train_loss: the mean loss over every step of the run (``train_results.json``'s ``train_loss``); when
            given, the loss line names both, so the last step's loss is not read as the run's mean.

    Returns:
        lines (no newline), the first ``***** llmtune train: done *****``.
    """
    loss = "n/a" if final_loss is None else f"{final_loss:.4f}"
    if train_loss is not None and train_loss == train_loss:   # not NaN
        loss += f" (last logged step)   train_loss: {train_loss:.4f} (mean of all steps)"
    session_tokens = tokens_seen if session_tokens is None else session_tokens
    tps = "n/a" if not session_tokens or runtime_s <= 0 else f"{session_tokens / runtime_s:,.1f}"
    toks = "n/a" if tokens_seen is None else f"{tokens_seen:,}"
    mem = format_bytes(peak_memory_bytes) + (f" ({peak_memory_kind})" if peak_memory_kind and
                                             peak_memory_bytes is not None else "")
    files = ", ".join(f"{what} {name}" for name, what in saved) or "nothing"
    return ["***** llmtune train: done *****",
            f"  final loss: {loss}",
            f"  examples seen: {examples_seen:,}   tokens seen: {toks}",
            f"  time: {format_duration(runtime_s)}   tokens/s: {tps}",
            f"  peak memory: {mem}",
            f"  saved to {output_dir}: {files}"]


def peak_memory(device: str) -> tuple[Optional[int], str]:
    """``(bytes, kind)``: ``torch.cuda.max_memory_allocated`` on a CUDA device, else this process's peak
    resident set size (``resource.getrusage``: kilobytes on Linux, bytes on macOS); ``(None, "")`` if neither."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(torch.device(device))), "CUDA allocated"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None, ""
    return int(rss if sys.platform == "darwin" else rss * 1024), "process RSS"


def count_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter elements of a torch module (shared tensors counted once;
    a packed 4-bit weight counts its stored elements)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _precision(cfg: Any, trainer: Any = None) -> str:
    """The precision the run trains in: the trainer's autocast dtype (``amp_dtype``), with the requested one
    in brackets when it differs (fp16 on a CPU runs as bf16 or fp32); the config's flags without a trainer."""
    asked = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
    if trainer is None or not hasattr(trainer, "amp_dtype"):
        return asked
    import torch

    used = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(trainer.amp_dtype, "fp32")
    return used if used == asked else f"{used} ({asked} requested)"


def _emit(lines: list[str], stream: Optional[TextIO]) -> None:
    from llmtune.train.distributed import is_main as _is_main

    if _is_main():
        print("\n".join(lines), file=stream or sys.stdout, flush=True)


def report_start(cfg: Any, model: Any, trainer: Any, device: Any, stream: Optional[TextIO] = None) -> None:
    """Print :func:`format_start` for a run: ``cfg`` (TrainConfig), the model, the trainer (its
    ``train_dataset``/``prompts`` and ``total_steps``) and the device. Main process only."""
    rows = getattr(trainer, "train_dataset", None)
    if rows is None:
        rows = getattr(trainer, "prompts", None)
    trainable, total = count_parameters(model)
    _emit(format_start(str(cfg.model_name_or_path), trainable, total, len(rows) if rows is not None else 0,
                       int(getattr(trainer, "total_steps", 0) or 0), _precision(cfg, trainer), str(device), cfg.stage,
                       cfg.finetuning_type, _resumed(cfg)), stream)


def _resumed(cfg: Any) -> Optional[str]:
    """``"<folder> (step N)"`` of the checkpoint the run resumes from, else None."""
    from llmtune.train import checkpoint as ckpt

    if cfg.resume_from_checkpoint in (None, False) or not cfg.output_dir:
        return None
    try:
        folder = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        step = ckpt.read_checkpoint_json(folder / ckpt.TRAINER_STATE).get("global_step") if folder else None
    except Exception:  # noqa: BLE001 - the summary never fails a run; the trainer reports a bad checkpoint
        return None
    return None if folder is None else f"{folder} (step {step})"


def report_end(cfg: Any, results: dict, out: Any, trainer: Any, device: Any,
               stream: Optional[TextIO] = None) -> None:
    """Print :func:`format_end` for a finished run: ``results`` (the ``all_results.json`` dict), the output
    folder ``out`` and the trainer (``log_history``, ``global_step``, ``tokens_seen``). Main process only."""
    history = getattr(trainer, "log_history", None) or []
    losses = [r["loss"] for r in history if isinstance(r, dict) and isinstance(r.get("loss"), (int, float))]
    final = losses[-1] if losses else results.get("train_loss")
    step = int(getattr(trainer, "global_step", 0) or 0)
    rows = getattr(trainer, "train_dataset", None)
    per_step = getattr(trainer, "rollout_size", None)
    if per_step is not None:  # PPO: each step samples a rollout of prompts
        seen = step * int(per_step)
    elif isinstance(getattr(trainer, "examples_seen", None), int) and getattr(trainer, "online", None) is None:
        seen = trainer.examples_seen   # counted by the trainer, step by step (a resumed run: since step 0)
    elif rows is not None and hasattr(trainer, "epoch_float"):  # epochs done x rows (the last batch may be short)
        seen = int(round(float(trainer.epoch_float()) * len(rows)))
    else:
        from llmtune.train.distributed import world_size

        seen = step * int(getattr(trainer, "bs", 1)) * int(getattr(trainer, "ga", 1)) * world_size()
    tokens = getattr(trainer, "tokens_seen", None)
    mem, kind = peak_memory(str(device))
    folder = Path(str(out))
    saved = [(name, what) for name, what in SAVED_FILES if (folder / name).is_file()]
    _emit(format_end(final, seen, tokens, float(results.get("train_runtime", 0.0)), mem, str(folder),
                     saved, kind, session_tokens=None if tokens is None
                     else tokens - int(getattr(trainer, "tokens_at_start", 0) or 0),
                     train_loss=results.get("train_loss")), stream)
