"""Experiment trackers for ``report_to``: TensorBoard, Weights & Biases and MLflow, each through its own library.

``report_to`` takes Hugging Face ``TrainingArguments``' values: ``none``, ``tensorboard``, ``wandb``,
``mlflow``, ``all`` (every one of them that is installed), or a comma/space separated list. Each backend is
an optional extra (``pip install 'llmtune[tensorboard]'``, ``[wandb]``, ``[mlflow]``), imported only when
asked for; asking for one that is not installed is one :class:`~llmtune.errors.LLMTuneError` naming the
package.

What each backend receives (main process only; the trainer calls :class:`~llmtune.train.logging.TrainLogger`):

* **tensorboard**: ``torch.utils.tensorboard.SummaryWriter`` in ``output_dir/runs``; scalars ``train/<key>``
  and ``eval/<key>`` (an ``eval_`` prefix moves a key to ``eval/``), x-axis the optimizer step.
* **wandb**: ``wandb.init(project=$WANDB_PROJECT or "llmtune", name=run_name, dir=$WANDB_DIR or output_dir,
  config=<the run's config>)``; then ``run.log({"train/<key>": v, ...}, step=step)``, ``run.finish()``.
  ``WANDB_MODE=offline`` keeps everything on disk (``wandb sync`` uploads it later).
* **mlflow**: tracking URI ``$MLFLOW_TRACKING_URI`` (else MLflow's default), experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (else MLflow's default), ``start_run(run_name=run_name)``, the config as
  params (values cut to MLflow's 6000-character limit), ``log_metrics({"train/<key>": v}, step=step)``,
  ``end_run()``.

Only int/float values are sent (strings and None are skipped). Key names match Hugging Face's integrations
(``transformers.integrations``: ``WandbCallback``, ``MLflowCallback``, ``TensorBoardCallback``) and their
environment variables, for facts only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from llmtune.errors import LLMTuneError

__all__ = ["BACKENDS", "resolve_report_to", "Reporter", "make_reporters"]

#: supported report_to backends -> (import name, pip package)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}


def _installed(backend: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(BACKENDS[backend][0]) is not None


def resolve_report_to(report_to: Any) -> list[str]:
    """Normalise ``report_to`` (``none``, a backend, ``all``, a comma/space separated str or a list) to a sorted
    list of backends from :data:`BACKENDS`.

    ``all`` means every installed backend. Raises :class:`LLMTuneError` for an unknown backend, or a named
    backend whose package is not installed (with the ``pip install`` that fixes it).
    """
    if report_to is None:
        return []
    items = report_to if isinstance(report_to, (list, tuple)) else str(report_to).replace(",", " ").split()
    out: set[str] = set()
    for item in (str(i).strip().lower() for i in items):
        if item in ("", "none", "no", "false"):
            continue
        if item == "all":
            out.update(b for b in BACKENDS if _installed(b))
            continue
        if item not in BACKENDS:
            raise LLMTuneError(f"report_to: {item!r} is not supported; use none, {', '.join(BACKENDS)} or all "
                               "(a comma-separated list is fine)")
        if not _installed(item):
            raise LLMTuneError(f"report_to: {item} needs the {BACKENDS[item][1]} package; run `pip install "
                               f"'llmtune[{item}]'` or remove it from report_to")
        out.add(item)
    return sorted(out)


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    """``{"train/<key>" | "eval/<key>": float}`` for the finite-or-not numeric values of ``values``."""
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        name = ("eval/" + k[5:]) if k.startswith("eval_") else "train/" + k
        out[name] = float(v)
    return out


def _flat_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {str(k): v for k, v in dict(config).items()}


class Reporter:
    """One tracker backend. ``log(values, step)`` sends a record; ``close()`` ends the run.

    Args:
        backend: a key of :data:`BACKENDS`.
        output_dir: the run's output folder (TensorBoard's ``runs/``, wandb's default ``dir``).
        config: the run's config (a ``TrainConfig`` or a dict), sent to wandb/mlflow as config/params.
        run_name: the tracker's run name (default: the config's ``run_name`` if it has one, else the output
            folder's name).
    """

    def __init__(self, backend: str, output_dir: str | Path, config: Any = None,
                 run_name: Optional[str] = None) -> None:
        self.backend = backend
        try:
            self._start(Path(output_dir), config, run_name)
        except LLMTuneError:
            raise
        except Exception as e:  # the tracker's own refusal (bad URI, store, credentials): one clear line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LLMTuneError(f"report_to: {backend} could not start a run: {msg}") from None

    def _start(self, out: Path, config: Any, run_name: Optional[str]) -> None:
        backend = self.backend
        conf = _flat_config(config)
        name = run_name or conf.get("run_name") or out.name
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._w = SummaryWriter(log_dir=str(out / "runs"))
        elif backend == "wandb":
            import wandb

            self._w = wandb.init(project=os.environ.get("WANDB_PROJECT") or "llmtune", name=name,
                                 dir=os.environ.get("WANDB_DIR") or str(out), config=conf)
        elif backend == "mlflow":
            import mlflow

            self._mlflow = mlflow
            if os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
            if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
                mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
            self._w = mlflow.start_run(run_name=name)
            params = {k: str(v)[:6000] for k, v in conf.items() if v is not None}
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[i:i + 100]))
        else:
            raise LLMTuneError(f"report_to: {backend!r} is not supported")

    def log(self, values: dict[str, Any], step: int) -> None:
        """Send the numeric entries of ``values`` (loss, lr, eval_*, stage metrics) at optimizer step ``step``."""
        scalars = _scalars(values)
        if not scalars:
            return
        if self.backend == "tensorboard":
            for k, v in scalars.items():
                self._w.add_scalar(k, v, step)
        elif self.backend == "wandb":
            self._w.log(scalars, step=int(step))
        else:  # mlflow refuses NaN/inf metric values on some stores: send the finite ones
            self._mlflow.log_metrics({k: v for k, v in scalars.items() if math.isfinite(v)}, step=int(step))

    def close(self) -> None:
        """Flush and end the run (idempotent)."""
        w, self._w = getattr(self, "_w", None), None
        if w is None:
            return
        if self.backend == "tensorboard":
            w.close()
        elif self.backend == "wandb":
            w.finish()
        else:
            self._mlflow.end_run()


def make_reporters(backends: Iterable[str], output_dir: str | Path, config: Any = None,
                   run_name: Optional[str] = None) -> list[Reporter]:
    """A :class:`Reporter` for each backend of ``backends`` (from :func:`resolve_report_to`); when one fails to
    start, those already started are closed before the error propagates."""
    started: list[Reporter] = []
    try:
        for b in backends:
            started.append(Reporter(b, output_dir, config, run_name))
    except BaseException:
        for r in started:
            r.close()
        raise
    return started
