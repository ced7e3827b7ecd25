"""Loss curves from ``trainer_log.jsonl`` (``plot_loss: true``), as LLaMA-Factory draws them.

Writes ``training_loss.png`` and, when evaluation ran, ``training_eval_loss.png`` (LLaMA-Factory's file
names): the raw curve and an exponentially smoothed one. matplotlib is imported lazily with the Agg
backend, so no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from llmtune.train.logging import read_log


def smooth(values: Sequence[float]) -> list[float]:
    """Exponential moving average with weight ``1.8 * (1/(1+exp(-0.05 n)) - 0.5)`` (LLaMA-Factory's choice).

    Short curves are barely smoothed, long ones more. Returns a list of the same length.
    """
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def plot_loss(output_dir: str | Path, keys: Sequence[str] = ("loss", "eval_loss")) -> list[Path]:
    """Draw one PNG per key found in ``output_dir/trainer_log.jsonl``; return the written paths."""
    records = read_log(output_dir)
    written = []
    for key in keys:
        pts = [(r["current_steps"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, vals = zip(*pts)
        fig = plt.figure()
        dot = {"marker": "o"} if len(pts) < 3 else {}   # a line through one point draws nothing: mark the points
        plt.plot(steps, vals, color="#1f77b4", alpha=0.4, label="original", **dot)
        plt.plot(steps, smooth(list(vals)), color="#1f77b4", label="smoothed", **dot)
        plt.title(f"training {key} of {Path(output_dir).name}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = Path(output_dir) / f"training_{key}.png"
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    return written
