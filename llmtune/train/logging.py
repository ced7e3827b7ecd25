"""Training logs: a tqdm progress bar, ``output_dir/trainer_log.jsonl`` and optionally TensorBoard.

``trainer_log.jsonl`` holds one JSON object per line with LLaMA-Factory's keys (``current_steps``,
``total_steps``, ``loss``, ``lr``, ``epoch``, ``percentage``, ``elapsed_time``, ``remaining_time``,
``throughput`` in input tokens per second) plus ``grad_norm``, ``eval_loss`` and each stage's metrics by
TRL's names. Only the main process (rank 0) writes. No callbacks: the trainer calls :meth:`TrainLogger.log`.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from llmtune.errors import LLMTuneError
from llmtune.fileio import strict_dumps

LOG_FILE = "trainer_log.jsonl"


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def resolve_report_to(report_to: Any) -> list[str]:
    """``report_to`` as a list of backends: :func:`llmtune.train.reporters.resolve_report_to`."""
    from llmtune.train.reporters import resolve_report_to as resolve

    return resolve(report_to)


class TrainLogger:
    """Writes log records to the progress bar, ``trainer_log.jsonl`` and TensorBoard (main process only).

    Args:
        output_dir: folder of ``trainer_log.jsonl`` (and TensorBoard's ``runs/``).
        total_steps: optimizer steps of the whole run (for percentage and remaining time).
        report_to: list from :func:`resolve_report_to`.
        enabled: False on ranks other than 0.
        resume_step: when resuming, keep the file's records up to this step and append after them;
            None starts a new file.
        history: when resuming, the checkpoint's log records; written first when the file holds none (a
            resume into another output_dir), so the log starts at step 1 as the uninterrupted run's does.
        progress: show the tqdm progress bar (False for ``disable_tqdm: true``).
    """

    def __init__(self, output_dir: str | Path, total_steps: int, report_to: list[str] = (), enabled: bool = True,
                 resume_step: Optional[int] = None, initial_step: int = 0, progress: bool = True,
                 run_config: Any = None, history: Sequence[dict] = ()) -> None:
        self.path = Path(output_dir) / LOG_FILE
        self.total_steps = total_steps
        self.enabled = enabled
        self.start_time = time.time()
        self.start_step = initial_step
        self.bar = None
        self.reporters: list = []  # report_to trackers (llmtune/train/reporters.py)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("current_steps", 0) <= resume_step:
                    kept.append(line)
        if resume_step is not None and not kept:
            kept = [strict_dumps(r) for r in history if r.get("current_steps", 0) <= resume_step]
        self.path.write_text("".join(k + "\n" for k in kept))
        if not progress:
            self.bar = None
        else:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        from llmtune.train.reporters import make_reporters

        self.reporters = make_reporters(report_to, output_dir, run_config)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar by ``n`` optimizer steps."""
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, epoch: float, values: dict[str, Any], tokens_seen: int = 0) -> dict[str, Any]:
        """Write one record for ``step``; returns it. ``values``: loss, lr, grad_norm, eval_* and metrics."""
        elapsed = time.time() - self.start_time
        done = max(step - self.start_step, 0)
        remaining = elapsed / done * (self.total_steps - step) if done else 0.0
        rec: dict[str, Any] = {"current_steps": step, "total_steps": self.total_steps}
        for k, v in values.items():
            rec[k] = float(v) if hasattr(v, "__float__") else v
        rec.update({
            "epoch": round(float(epoch), 4),
            "percentage": round(step / self.total_steps * 100, 2) if self.total_steps else 100.0,
            "elapsed_time": _hms(elapsed),
            "remaining_time": _hms(remaining),
            "throughput": round(tokens_seen / elapsed, 2) if elapsed > 0 else 0.0,
        })
        if not self.enabled:
            return rec
        with self.path.open("a") as f:
            f.write(strict_dumps(rec) + "\n")  # strict JSON: a NaN/inf value is written as null
        if self.bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()
                     if k in ("loss", "eval_loss", "reward", "lr", "grad_norm")}  # reward: ppo, grpo
            self.bar.set_postfix(shown, refresh=True)   # else the bar shows the previous step's loss
        for reporter in self.reporters:
            reporter.log(values, step)
        return rec

    def close(self) -> None:
        """Close the progress bar and TensorBoard writer."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for reporter in self.reporters:
            reporter.close()


def read_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``output_dir/trainer_log.jsonl`` (empty list if absent)."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
