"""Evaluation and prediction as a user sees them: a progress bar while they run, their metrics printed to the
console at the end (they were only in ``eval_results.json``), and ``metric_for_best_model`` checked against
the metrics evaluation really returns before training starts (it was found only at the first evaluation,
after a whole stretch of training).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Optional, TextIO

from llmtune.errors import LLMTuneError


def progress(items: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    """``items`` wrapped in a tqdm bar named ``desc`` (stderr) when ``enabled`` (main process and not
    ``disable_tqdm``), else ``items`` unchanged."""
    if not enabled or total <= 1:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, dynamic_ncols=True, leave=False)


def format_metrics(title: str, metrics: dict[str, Any]) -> list[str]:
    """``***** <title> metrics *****`` then one ``  key = value`` line per metric (sorted, floats to 4
    significant digits), as LLaMA-Factory / the Hugging Face Trainer print them."""
    lines = [f"***** {title} metrics *****"]
    width = max((len(k) for k in metrics), default=0)
    for k in sorted(metrics):
        v = metrics[k]
        lines.append(f"  {k:<{width}} = {v:.4g}" if isinstance(v, float) else f"  {k:<{width}} = {v}")
    return lines


def print_metrics(title: str, metrics: dict[str, Any], stream: Optional[TextIO] = None) -> None:
    """Print :func:`format_metrics` on the main process."""
    from llmtune.train.distributed import is_main

    if is_main() and metrics:
        print("\n".join(format_metrics(title, metrics)), file=stream or sys.stdout, flush=True)


def check_best_metric(trainer: Any, do_eval: bool) -> None:
    """With evaluation data and a ``metric_for_best_model`` other than ``eval_loss``, evaluate one batch now
    and check that the metric is among those returned.

    Raises:
        LLMTuneError: the metric is not one evaluation returns (names them).
    """
    if trainer.eval_dataset is None or trainer.metric == "eval_loss" or not (
            do_eval or trainer.eval_strategy != "no" or trainer.load_best):
        return
    first = [trainer.eval_dataset[i] for i in range(min(trainer.eval_bs, len(trainer.eval_dataset)))]
    names = sorted(trainer.evaluate(first, quiet=True))
    if trainer.metric not in names:
        raise LLMTuneError(f"metric_for_best_model: {trainer.metric!r} is not among the evaluation metrics of "
                           f"stage {trainer.stage_name} ({', '.join(names)}); use one of them")


__all__ = ["progress", "format_metrics", "print_metrics", "check_best_metric"]
