"""Start a test's ranks as processes with a deadline (multi-process tests on 2 shared CPU cores).

``torch.multiprocessing.spawn(join=True)`` waits for ever when one rank hangs. Once in a full suite run we saw
one rank of a two-rank gloo test idle inside its worker for minutes after its peer had exited (not
reproduced alone, 8 reruns). :func:`spawn_ranks` waits up to ``deadline_s``; a run that passes it is killed
and started once more with a new rendezvous file, so an unlucky start costs minutes instead of the CI run. A
rank that raises still fails the test at once (``ProcessRaisedException``).

Each rank collects its garbage when ``fn`` returns (:func:`_run_rank`): FSDP2 state kept alive by reference
cycles until interpreter shutdown made a gloo rank abort after its work was done (SIGABRT, "terminate called
without an active exception"; 4 runs in 40 of the NaN-checkpoint test, none in 100 with the collection).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable


def _run_rank(rank: int, fn: Callable, *args) -> None:
    """``fn(rank, *args)``, then free what it left in reference cycles while the interpreter is alive."""
    fn(rank, *args)
    gc.collect()


def spawn_ranks(fn: Callable, tmp_path: Path, *args, nprocs: int = 2, deadline_s: float = 300.0,
                attempts: int = 2) -> None:
    """Run ``fn(rank, init_file, str(tmp_path), *args)`` on ``nprocs`` spawned ranks and wait for them.

    ``init_file`` is a fresh ``file://`` rendezvous path per attempt. Raises ``TimeoutError`` when every
    attempt passes ``deadline_s`` seconds, and whatever a rank raised otherwise.
    """
    import torch.multiprocessing as mp

    for attempt in range(attempts):
        init_file = tmp_path / f"rdzv-{attempt}"
        ctx = mp.start_processes(_run_rank, args=(fn, str(init_file), str(tmp_path), *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if ctx.join(timeout=2):
                return
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    raise TimeoutError(f"{getattr(fn, '__name__', fn)}: {nprocs} ranks did not finish within {deadline_s} s "
                       f"in {attempts} attempts")
