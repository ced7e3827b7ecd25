"""Process group and collectives for scale-out with PyTorch's own engine: ``torchrun`` + ``torch.distributed``.

There is no launcher here. ``torchrun --nproc_per_node N -m llmtune train config.yaml`` (or any launcher
that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) starts N copies of
the same command; :func:`distributed_session` turns them into one process group and the trainer's small
helpers (:func:`rank`, :func:`world_size`, :func:`all_reduce_sum`, :func:`is_main`) do the rest:

* **process group**: ``gloo`` on the CPU, ``cpu:gloo,cuda:nccl`` on CUDA (device ``cuda:LOCAL_RANK``), timeout
  ``ddp_timeout`` seconds (Hugging Face's key; default 1800). A collective that does not complete within
  that time (a rank died or hangs) raises on the surviving ranks, and :func:`distributed_session` turns
  the error into one :class:`LLMTuneError` message; the CLI exits non-zero.
* **data**: every rank computes the same epoch order (``randperm`` seeded by ``seed + epoch``) and takes
  every ``world_size``-th index (:func:`shard_indices`); the order is padded with its first indices to a
  multiple of the world size (as ``torch.utils.data.DistributedSampler`` does) so every rank runs the
  same number of steps and no collective waits forever.

The three parts of scale-out (as in torchtitan): this module (process group, collectives, data shards);
:mod:`llmtune.train.wrap` (DDP, FSDP2, gradient clipping, gathering the full state); and the checkpoint face
:mod:`llmtune.train.checkpointer` (``save``/``load``, which pick the format: single process,
:mod:`llmtune.train.checkpoint`; FSDP2 sharded, gathered trainable-only or per-rank online,
:mod:`llmtune.train.ckpt_parallel`).

Sources: PyTorch documentation of ``torch.distributed`` (``init_process_group``, collectives), ``torchrun``,
``torch.utils.data.DistributedSampler`` (the padding rule of :func:`shard_indices`).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from llmtune.errors import LLMTuneError

#: environment variables torchrun sets for every worker
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# -- process group --------------------------------------------------------------------------------
def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset), as torchrun sets it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LLMTuneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with "
                           "torchrun --nproc_per_node N -m llmtune train ...") from None


def is_initialized() -> bool:
    """True when a default ``torch.distributed`` process group exists."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(config: Any = None) -> bool:
    """Create the default process group from torchrun's environment; return True when this call created it.

    Nothing happens (returns False) when ``WORLD_SIZE`` is unset or 1, or when a group already exists
    (a caller that initialised its own keeps it). Backend: ``nccl`` when CUDA is available and the
    config's ``device`` is not ``cpu`` (as ``cpu:gloo,cuda:nccl``: CPU tensors, such as FSDP's offloaded
    parameters and gradients, go through gloo), else ``gloo``; with CUDA the current device becomes
    ``cuda:LOCAL_RANK``. Timeout: ``ddp_timeout`` seconds (default 1800).

    Raises:
        LLMTuneError: ``WORLD_SIZE`` is set but ``RANK``/``MASTER_ADDR``/``MASTER_PORT`` are missing (not
        launched by torchrun), or ``ddp_timeout`` is not a positive number.
    """
    if is_initialized() or env_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LLMTuneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not; "
                           "start distributed runs with torchrun --nproc_per_node N -m llmtune train ... "
                           "(or unset WORLD_SIZE for one process)")
    if config is None:
        from llmtune.config import TrainConfig

        config = TrainConfig()   # the defaults (ddp_timeout 1800 s)
    timeout = float(config.ddp_timeout)
    if timeout <= 0:
        raise LLMTuneError(f"ddp_timeout: {timeout} must be a positive number of seconds")
    device = str(config.device or "")
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kwargs: dict[str, Any] = {}
    if use_cuda:
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    # with CUDA, a gloo group beside NCCL: FSDP offload's CPU DTensors (gradient clipping, checkpoints) reduce on it
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    return True


def destroy_distributed() -> None:
    """Destroy the default process group if one exists.

    Objects left in reference cycles that still hold the group (FSDP2 module state, DDP reducers) are
    collected first: freed later, during interpreter shutdown, a gloo group's worker threads can abort the
    process (SIGABRT, "terminate called without an active exception") after a run that succeeded.
    """
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (the process that logs and writes files), and in a single process."""
    return rank() == 0


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over ranks (a new tensor; the identity in one process)."""
    if is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if is_initialized():
        dist.barrier()


def _is_collective_failure(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset", "Timed out", "timed out",
        "ProcessGroup", "Socket Timeout"))


@contextlib.contextmanager
def distributed_session(config: Any = None) -> Iterator[bool]:
    """Context of one (possibly distributed) run: :func:`init_distributed` on entry, destroy on exit.

    Yields True when distributed. A failed collective (another rank died, or did not answer within
    ``ddp_timeout`` seconds) is re-raised as :class:`LLMTuneError` with one message naming this rank, the
    timeout and what to check, so the CLI prints it and exits non-zero instead of hanging or dumping a
    C++ trace.
    """
    created = init_distributed(config)
    try:
        yield is_initialized()
    except LLMTuneError:
        raise
    except Exception as err:
        if is_initialized() and _is_collective_failure(err):
            timeout = config.ddp_timeout if config is not None else "the default"
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            created = False  # destroying a broken group can block; the process is ending anyway
            raise LLMTuneError(
                f"rank {rank()} of {world_size()}: a collective operation with the other ranks failed "
                f"({type(err).__name__}: {first}). Another rank probably died or hung (its own log shows why) "
                f"or did not answer within ddp_timeout = {timeout} s; fix that rank's error, or raise "
                "ddp_timeout if a rank is just slow (e.g. loading or saving a large model)") from err
        raise
    finally:
        if created:
            destroy_distributed()


# -- data -----------------------------------------------------------------------------------------
def shard_indices(indices: list[int], rank_: int, world: int, pad: bool = True) -> list[int]:
    """This rank's share of an index order: ``indices[rank::world]`` after padding.

    With ``pad`` the order is first extended by its own first indices (wrapping around) to a multiple of
    ``world``, as ``torch.utils.data.DistributedSampler(drop_last=False)`` does, so every rank gets
    ``ceil(len / world)`` indices and runs the same number of steps. The padded rows are seen twice in
    that epoch. ``world == 1`` returns ``indices`` unchanged.
    """
    if world <= 1:
        return list(indices)
    indices = list(indices)
    if pad and indices and len(indices) % world:
        extra = world - len(indices) % world
        indices += (indices * (extra // len(indices) + 1))[:extra]
    return indices[rank_::world]
