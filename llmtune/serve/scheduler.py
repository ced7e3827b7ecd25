"""The serving scheduler: one thread that drives one :class:`llmtune.engine.Engine` for many clients.

Clients (the asyncio handlers of :mod:`llmtune.serve.app`) call :meth:`Scheduler.submit` and read
:class:`~llmtune.engine.TokenEvent` objects from the returned :class:`Job`'s asyncio queue; the scheduler thread
alone touches the engine. Each loop iteration it (1) applies cancellations (a disconnected client's rows leave
the engine at once, their slots free for the same step), (2) moves new submissions into the engine's queue,
(3) runs one :meth:`Engine.step` (running rows decode one token; queued rows join within the engine's
``max_prefill_tokens`` budget: the token budget per step), and (4) hands each event to its job's event loop.

Limits: at most ``max_queue`` requests wait for a slot (beyond that :meth:`submit` raises :class:`QueueFull`,
the server's 429); after :meth:`close` new work is refused (:class:`Closed`, the server's 503) and what runs
is given ``drain_s`` seconds to finish before it is cancelled (each cancelled job gets a ``None`` event).

Source: continuous batching (Orca, Yu et al., OSDI 2022) with a bounded waiting queue as vLLM's
``AsyncLLMEngine`` front end; the engine's step API (docs/internals.md, "Generation engine").
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, Optional

from llmtune.engine import Engine, Request, TokenEvent
from llmtune.errors import LLMTuneError

__all__ = ["Scheduler", "Job", "QueueFull", "Closed"]


class QueueFull(Exception):
    """More requests wait for a slot than the scheduler's ``max_queue`` allows (HTTP 429)."""


class Closed(Exception):
    """The scheduler is shutting down and takes no new work (HTTP 503)."""


class Job:
    """One client request: ``n`` rows sharing a prompt (``Engine.add_group``).

    Attributes:
        request: the engine :class:`~llmtune.engine.Request`; n: its number of completions (>= 1).
        ids: the engine's row ids (set by the scheduler thread when the job enters the engine; [] before).
        events: an :class:`asyncio.Queue` of lists of :class:`TokenEvent` (one list per step, this job's rows
            only), then ``None`` when the job was cancelled by a shutdown, or an :class:`Exception` when the
            engine refused the request.
        index: ``{row id: choice index 0..n-1}``.
    """

    def __init__(self, request: Request, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request, self.n, self.loop = request, n, loop
        self.ids: list[int] = []
        self.index: dict[int, int] = {}
        self.events: asyncio.Queue = asyncio.Queue()
        self.open_rows = n
        self.cancelled = False

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:   # the client's event loop is closed: nobody reads any more
            pass


class Scheduler:
    """A thread that steps one engine while clients join and leave (see the module docstring).

    Args:
        engine: the :class:`Engine` (its ``max_slots`` is ``--max_num_seqs``, ``max_len`` ``--max_model_len``,
            ``max_prefill_tokens`` the per-step prompt-token budget).
        max_queue: requests (jobs) allowed to wait for a slot; one more raises :class:`QueueFull`.

    Thread-safety: :meth:`submit`, :meth:`cancel`, :meth:`close` and :meth:`stats` may be called from any thread.
    """

    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._new: deque[Job] = deque()
        self._cancel: deque[Job] = deque()
        self._jobs: dict[int, Job] = {}          # engine row id -> job
        self._live: set[Job] = set()              # jobs inside the engine
        self._closing = False
        self._stop = False
        self._snapshot = {"running": 0, "waiting": 0, "waiting_jobs": 0}
        self.counters = {"requests": 0, "cancelled": 0, "steps": 0, "tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="llmtune-scheduler", daemon=True)
        self._thread.start()

    # -- client side ----------------------------------------------------------------------------------------
    def submit(self, request: Request, n: int = 1) -> Job:
        """Queue ``n`` completions of ``request`` for the calling event loop; returns the :class:`Job`.

        Raises:
            QueueFull: ``max_queue`` jobs already wait for a slot.
            Closed: the scheduler is shutting down.
        """
        job = Job(request, n, asyncio.get_running_loop())
        with self._lock:
            if self._closing:
                raise Closed("the server is shutting down")
            waiting = len(self._new) + self._snapshot["waiting_jobs"]
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting for a slot (the limit is {self.max_queue}); "
                                "retry later")
            self._new.append(job)
            self.counters["requests"] += 1
            self._wake.notify()
        return job

    def cancel(self, job: Job, row: Optional[int] = None) -> None:
        """Drop ``job`` (a client left), or only its row ``row`` (an engine row id: that choice met a stop
        string): the rows leave the engine before the next step, their slots free at once. Idempotent."""
        with self._lock:
            if job.cancelled or job.open_rows == 0:
                return
            if row is None:
                job.cancelled = True
            self._cancel.append((job, row))
            self._wake.notify()

    def stats(self) -> dict:
        """``{"running": rows holding a slot, "waiting": rows queued, "requests", "cancelled", "steps",
        "tokens"}`` (ints; counters since start)."""
        with self._lock:
            return dict(self.counters, running=self._snapshot["running"],
                        waiting=self._snapshot["waiting"] + sum(j.n for j in self._new))

    def close(self, drain_s: float = 10.0) -> None:
        """Refuse new work, let running jobs finish for up to ``drain_s`` seconds, cancel the rest (their
        clients get ``None``), and stop the thread. Idempotent."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        deadline = time.monotonic() + max(0.0, drain_s)
        while time.monotonic() < deadline:
            with self._lock:
                if not self._live and not self._new:
                    break
            time.sleep(0.02)
        with self._lock:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the thread -----------------------------------------------------------------------------------------
    def _snap(self) -> None:
        """Record the engine's row counts for other threads (lock held, engine idle)."""
        running = {r.rid for r in self.engine.rows}
        self._snapshot = {"running": len(running), "waiting": self.engine.num_waiting,
                          "waiting_jobs": sum(1 for j in self._live if not any(i in running for i in j.ids))}

    def _apply(self) -> None:
        """Cancellations and new jobs into the engine (lock held)."""
        while self._cancel:
            job, row = self._cancel.popleft()
            if job in self._new:
                self._new.remove(job)
                self.counters["cancelled"] += 1
                continue
            rows = job.ids if row is None else [row]
            freed = False
            for rid in rows:
                if self._jobs.pop(rid, None) is not None:
                    freed = self.engine.cancel(rid) or freed
                    job.open_rows -= 1
            if freed and row is None:
                self.counters["cancelled"] += 1
            if job.open_rows <= 0:
                self._live.discard(job)
        while self._new:
            job = self._new.popleft()
            try:
                job.ids = self.engine.add_group(job.request, job.n)
            except LLMTuneError as e:      # the server checks requests first; this is a last guard
                job.open_rows = 0
                job._put(e)
                continue
            job.index = {rid: k for k, rid in enumerate(job.ids)}
            for rid in job.ids:
                self._jobs[rid] = job
            self._live.add(job)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        per_job: dict[Job, list[TokenEvent]] = {}
        for e in events:
            job = self._jobs.get(e.request_id)
            if job is None:
                continue
            per_job.setdefault(job, []).append(e)
            if e.finish_reason is not None:
                self._jobs.pop(e.request_id, None)
                job.open_rows -= 1
                if job.open_rows == 0:
                    self._live.discard(job)
        for job, evs in per_job.items():
            job._put(evs)

    def _abort_all(self) -> None:
        for job in list(self._live) + list(self._new):
            for rid in job.ids:
                self.engine.cancel(rid)
                self._jobs.pop(rid, None)
            job.open_rows = 0
            job._put(None)
        self._live.clear()
        self._new.clear()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._new and not self._cancel and not self.engine.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    self._abort_all()
                    return
                self._apply()
                self._snap()
                if not self.engine.has_work():
                    continue
            # the step runs without the lock: clients may submit and cancel meanwhile
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a model error fails the jobs in the batch, not the server
                with self._lock:
                    for job in list(self._live):
                        for rid in job.ids:
                            self.engine.cancel(rid)
                            self._jobs.pop(rid, None)
                        job.open_rows = 0
                        job._put(LLMTuneError(f"generation failed: {type(e).__name__}: {e}"))
                    self._live.clear()
                    self._snap()
                continue
            with self._lock:
                self.counters["steps"] += 1
                self.counters["tokens"] += len(events)
                self._dispatch(events)
                self._snap()
