"""What the trainer knows about a stop request (Ctrl-C, SIGTERM) and the step it interrupts.

A checkpoint written on a signal must be of a whole step. :class:`Interrupt` holds the state of the running
step that decides it: the RNG and online-stage state at the step's start (saved with the checkpoint when the
step is interrupted before its first optimizer update, so the resumed run redoes it exactly), how many
optimizer updates the step plans and has applied (a PPO iteration has several), and whether a signal is held
until the step is whole. SIGINT raises ``KeyboardInterrupt``, SIGTERM (a cluster's preemption or time limit,
a container's stop, ``kill``) :class:`~llmtune.errors.Terminated`.

Source: Python's :mod:`signal` (handlers run in the main thread, between bytecodes).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from llmtune.errors import Terminated, notice


@dataclass
class Interrupt:
    """The stop-request state of one :class:`~llmtune.train.trainer.Trainer` (one per trainer, main thread).

    Fields: ``defer`` (a signal now is held until the step is counted: set from the step's first optimizer
    update), ``pending`` (the held stop: ``KeyboardInterrupt`` or ``Terminated``, else None),
    ``updates_planned`` / ``updates_done`` (optimizer updates of the running step), ``rng_at_step_start`` /
    ``online_at_step_start`` (snapshots taken before the step; None once it is counted).
    """

    defer: bool = False
    pending: Optional[type] = None
    updates_planned: int = 0
    updates_done: int = 0
    rng_at_step_start: Optional[dict[str, Any]] = None
    online_at_step_start: Optional[tuple[dict, list]] = None

    def clear(self) -> None:
        """No signal held or deferred (a new training call, or a stop being handled)."""
        self.defer, self.pending = False, None

    def start_step(self, rng: dict[str, Any], online: Optional[tuple[dict, list]]) -> None:
        """A step begins: keep the snapshots a checkpoint of the interrupted step needs; no update applied yet."""
        self.rng_at_step_start, self.online_at_step_start, self.updates_done = rng, online, 0

    def step_counted(self) -> None:
        """The step is whole (``global_step`` counts it): a signal from here on stops at once, with the state as
        it is now."""
        self.rng_at_step_start, self.online_at_step_start, self.updates_done = None, None, 0
        self.defer = False

    def raise_pending(self) -> None:
        """Raise the stop held during the step (call once the step is counted and saved), if any."""
        if self.pending is not None:
            stop, self.pending = self.pending, None
            raise stop

    def on_signal(self, signum: int, next_step: int) -> None:
        """SIGINT raises ``KeyboardInterrupt``, SIGTERM :class:`Terminated`; while ``defer`` the first one is held
        until step ``next_step`` is whole (a PPO iteration's several updates: with a notice), a second one stops
        at once."""
        stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if not self.defer or self.pending is not None:
            raise stop
        self.pending = stop
        if self.updates_planned > 1 and stop is KeyboardInterrupt:
            notice(f"interrupt: finishing the optimizer updates of step {next_step}, then saving a "
                   "checkpoint (press Ctrl-C again to stop now without it)")

    @contextlib.contextmanager
    def handlers(self, next_step: Callable[[], int]) -> Iterator[None]:
        """Within the context, SIGINT and SIGTERM go to :meth:`on_signal` (``next_step()``: the step a held signal
        waits for); the previous handlers come back on exit. Outside the main thread nothing is installed
        (Python allows handlers there only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handler = lambda signum, frame: self.on_signal(signum, next_step())  # noqa: E731
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
                signal.signal(sig, old if old is not None else default)


__all__ = ["Interrupt"]
