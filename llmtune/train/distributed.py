"""Scale-out with PyTorch's own engine: ``torchrun`` + ``torch.distributed`` + DDP or FSDP2.

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
* **loss normalisation**: the trainer back-propagates ``loss_sum / step_items`` with ``step_items`` summed
  over all micro-batches and all ranks. DDP would then average (divide by the world size); we register a
  communication hook that SUMS instead (:func:`sum_allreduce_hook`), and FSDP2 gets
  ``set_gradient_divide_factor(1.0)``. So N ranks x batch b give exactly the gradient of one rank x batch
  N*b (tested to 1e-5).
* **strategies** (:func:`wrap_model`): DDP (default; only ``requires_grad`` parameters enter its reducer,
  so with LoRA only the adapters are all-reduced) or FSDP2 ``fully_shard`` (``fsdp: full_shard`` in the
  config; full, freeze, LoRA and QLoRA): every decoder layer is sharded, then the root; frozen and
  trainable parameters share a unit (FSDP2 reduces gradients of the trainable ones only); a 4-bit layer's
  packed NF4 storage becomes frozen flat parameters first (``Linear4bit.shardable_storage``) so it shards
  too; ``bf16`` gives FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``.
* **outputs**: rank 0 alone logs, plots and writes the final adapter/model; with FSDP2 every rank takes
  part in gathering the full state dict (:func:`gather_full_state_dict`; with a LoRA adapter, the
  trainable tensors only) and rank 0 writes it (:func:`full_parameters` puts the gathered adapters in place).
* **checkpoints**: DDP ones, and FSDP2 ones of a model with frozen parameters (LoRA/QLoRA/freeze: the
  trainable tensors and their AdamW state all-gathered), are the single-process format, written by rank 0
  and resumable on any world size. FSDP2 full fine-tuning ones are sharded: :func:`save_fsdp_checkpoint` writes each rank's shards of the model
  and optimizer with ``torch.distributed.checkpoint`` in its safetensors storage (no pickles, also for
  the metadata), and resumes on the same number of ranks.

Sources: PyTorch documentation of ``torch.distributed`` (``init_process_group``), ``torchrun``,
``DistributedDataParallel`` (DDP communication hooks), FSDP2 (``torch.distributed.fsdp.fully_shard``),
``torch.distributed.checkpoint`` (``state_dict.get_state_dict``, ``HuggingFaceStorageWriter``); ZeRO
(Rajbhandari et al., 2020) for the memory arithmetic in docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from llmtune.compat import FSDP_INTEGER_PARAMS_TORCH, torch_version
from llmtune.errors import LLMTuneError, notice
from llmtune.fileio import publish_dir

#: environment variables torchrun sets for every worker
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: tokens accepted in the ``fsdp`` config value (Hugging Face ``TrainingArguments.fsdp`` spellings)
FSDP_TOKENS = ("full_shard", "shard_grad_op", "auto_wrap", "offload")
FSDP_DIR = "fsdp_shards"


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


# -- strategies -----------------------------------------------------------------------------------
def fsdp_options(config: Any) -> Optional[dict[str, Any]]:
    """Parse the ``fsdp`` config value (Hugging Face spellings, space separated) or return None (DDP).

    ``full_shard`` (ZeRO-3: parameters, gradients, optimizer state sharded; parameters re-gathered for
    backward), ``shard_grad_op`` (ZeRO-2-like: parameters kept gathered between forward and backward),
    ``offload`` (parameters, gradients and optimizer state on the CPU: FSDP2 ``CPUOffloadPolicy``),
    ``auto_wrap`` (accepted; every decoder layer is always its own FSDP unit). Empty / ``false`` -> None.

    Raises:
        LLMTuneError: an unknown token (e.g. ``hybrid_shard``), naming the accepted ones.
    """
    raw = config.fsdp
    if raw in (None, False, "", []):
        return None
    tokens = raw if isinstance(raw, (list, tuple)) else str(raw).replace(",", " ").split()
    tokens = [str(t).strip().lower() for t in tokens if str(t).strip()]
    if not tokens or tokens in (["false"], ["no"], ["none"]):
        return None
    bad = [t for t in tokens if t not in FSDP_TOKENS]
    if bad:
        from llmtune.errors import nearest

        raise LLMTuneError(f"fsdp: {bad[0]!r} is not supported (use one of: {', '.join(FSDP_TOKENS)}, space "
                           "separated, e.g. fsdp: full_shard)." + nearest(bad[0], FSDP_TOKENS))
    if "full_shard" not in tokens and "shard_grad_op" not in tokens:
        tokens.append("full_shard")
    return {"reshard_after_forward": "shard_grad_op" not in tokens, "offload": "offload" in tokens}


def choose_strategy(model: torch.nn.Module, config: Any) -> str:
    """``"fsdp"`` when ``fsdp`` is set, else ``"ddp"``.

    FSDP2 shards full fine-tuning, LoRA/freeze tuning (frozen and trainable parameters share each decoder
    layer's FSDP unit; only the trainable ones get gradients and optimizer state) and 4-bit models whose
    :class:`~llmtune.quant.linear4bit.Linear4bit` layers keep their packed storage in parameters (FSDP2
    shards parameters only: :func:`apply_fsdp` calls ``Linear4bit.shardable_storage`` first).
    """
    if fsdp_options(config) is None:
        return "ddp"
    return "fsdp"


def has_frozen(model: torch.nn.Module) -> bool:
    """True when some parameter of ``model`` does not require grad (LoRA, freeze tuning, QLoRA): its FSDP2
    checkpoints then hold the trainable tensors only, in the single-process format."""
    return any(not p.requires_grad for p in model.parameters())


class DDPModel(torch.nn.parallel.DistributedDataParallel):
    """``DistributedDataParallel`` that forwards unknown attributes to the wrapped model.

    Stages call ``model(input_ids, ...)`` (through DDP, so its reducer is prepared) and read
    ``model.lm_head``, ``model.config``, ``model.v_head``...; those resolve on ``model.module``.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def sum_allreduce_hook(state, bucket):  # no annotations: DDP checks them (and they would be strings here)
    """DDP communication hook: all-reduce a gradient bucket with SUM (DDP's default divides by world size).

    ``state``: a process group or None (the default group); ``bucket``: ``dist.GradBucket``; returns a
    ``torch.futures.Future`` of the summed flat gradient tensor.

    The trainer already divides every loss by the item count of the whole step over all ranks, so the
    plain sum of the ranks' gradients is the gradient of the global batch.
    """
    group = state if state is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_model(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """Wrap ``model`` for the running process group: :class:`DDPModel` or FSDP2 (in place); unchanged
    without a process group.

    DDP: ``gradient_as_bucket_view`` (gradients are views into the all-reduce buckets, no second copy),
    no buffer sync in forward (``broadcast_buffers=False``; the model's buffers are RoPE tables computed
    identically on every rank; syncing them would add a collective to every forward, evaluation
    included), and the :func:`sum_allreduce_hook`. FSDP2: see :func:`apply_fsdp`. Call before building the optimizer (FSDP2
    replaces the parameters by sharded ``DTensor`` ones).
    """
    if not is_initialized() or isinstance(model, DDPModel) or is_fsdp(model):
        return model
    if choose_strategy(model, config) == "fsdp":
        return apply_fsdp(model, config)
    if not any(p.requires_grad for p in model.parameters()):
        raise LLMTuneError("no trainable parameters: check finetuning_type, lora_target and freeze_trainable_layers")
    device = next(model.parameters()).device
    import inspect

    sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in
               inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters else "broadcast_buffers")
    ddp = DDPModel(model, device_ids=[device.index] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True, **{sync_kw: False})  # grads live in the buckets: no 2nd copy
    ddp.register_comm_hook(None, sum_allreduce_hook)
    return ddp


def apply_fsdp(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer (``model.model.layers[i]``), then the root; in place.

    Gradients are SUMMED over ranks (``set_gradient_divide_factor(1.0)`` with sum-only reductions, so
    gloo works too). ``bf16`` -> ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``
    (sharded master weights stay float32); ``fp16`` on CUDA -> float16 parameters, float32 reduction.
    Returns the same module object (now an ``FSDPModule``). Raises LLMTuneError for 4-bit layers on torch < 2.12.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    opts = fsdp_options(config) or {"reshard_after_forward": True, "offload": False}
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    param_dtype = None
    if config.bf16:
        param_dtype = torch.bfloat16
    elif config.fp16 and device.type == "cuda":
        param_dtype = torch.float16
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload = CPUOffloadPolicy() if opts["offload"] else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise LLMTuneError("fsdp: the model has no decoder layers at model.layers; FSDP2 here supports the "
                           "llmtune Transformer (remove fsdp to train with DDP)")
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()) and torch_version() < FSDP_INTEGER_PARAMS_TORCH:
        raise LLMTuneError(f"fsdp with 4-bit (QLoRA) layers needs torch >= 2.12; this is torch {torch.__version__}, "
                           "whose FSDP2 cannot shard the uint8 NF4 storage: upgrade torch, or remove fsdp (DDP)")
    for layer in layers:
        for mod in layer.modules():
            if type(mod).__name__ == "Linear4bit":
                # packed NF4 storage as frozen parameters of the layer's unit. FSDP2 never casts integer
                # parameters (the uint8 codes and double-quantized scales); float32 scales (double_quant off)
                # stay a replicated buffer under a bf16/fp16 param_dtype, which would round them.
                mod.shardable_storage(absmax=param_dtype is None or not mod.absmax.is_floating_point())
        fully_shard(layer, reshard_after_forward=opts["reshard_after_forward"], **kw)
    fully_shard(model, **kw)
    for mod in model.modules():
        if hasattr(mod, "set_gradient_divide_factor"):
            mod.set_gradient_divide_factor(1.0)
            mod.set_force_sum_reduction_for_comms(True)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    """True when ``model`` has been through FSDP2 ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Whether the next forward+backward all-reduces gradients (False for all but the last micro-batch
    of a step: gradient accumulation then communicates once per optimizer step). No-op for plain models."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = sync
    elif is_fsdp(model):
        model.set_requires_gradient_sync(sync)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` returning a Python float, also for FSDP2 ``DTensor`` gradients
    (the norm is then reduced over the shards of all ranks). Units: L2 norm of all gradients."""
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# -- saving ---------------------------------------------------------------------------------------
def gather_full_state_dict(model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The full (unsharded) CPU state dict of an FSDP2 model on rank 0, ``{}`` on other ranks; None for a
    model that is not FSDP2. A collective: every rank must call it.

    Full fine-tuning: every tensor, via ``torch.distributed.checkpoint.state_dict.get_model_state_dict(
    full_state_dict=True, cpu_offload=True)``. A model with frozen parameters (LoRA, QLoRA, freeze tuning
    with a LoRA adapter): its trainable parameters only (:func:`gather_trainable`), so rank 0 never holds the
    whole frozen base. Keys are the model's Hugging Face names.
    """
    if not is_fsdp(model):
        return None
    if has_frozen(model) and _has_adapter(model):
        return gather_trainable(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _has_adapter(model: torch.nn.Module) -> bool:
    return any(".lora_" in n for n, _ in model.named_parameters())


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` shard (a collective), detached on the CPU; plain tensors as they are."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


def gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full CPU tensor}`` of the ``requires_grad`` parameters (tied ones once) on rank 0, ``{}``
    elsewhere. A collective: every rank all-gathers each sharded parameter in the same (registration) order."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            full = _full(p)
            if rank() == 0:
                out[name] = full
    return out


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module, state: Optional[dict[str, torch.Tensor]]) -> Iterator[torch.nn.Module]:
    """Within the context, the FSDP2 ``DTensor`` parameters named in ``state`` are replaced by the full tensors
    of ``state`` (from :func:`gather_full_state_dict` on rank 0), so code that reads parameters directly
    (``save_adapter``, ``save_value_head``) sees whole tensors; the sharded ones are put back on exit.
    ``state`` None or a model that is not FSDP2: nothing changes. Not a collective."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        if state and is_fsdp(model):
            names: dict[int, str] = {}
            for n, q in model.named_parameters(remove_duplicate=False):
                names.setdefault(id(q), n)
            for mod in model.modules():
                for leaf, p in list(mod._parameters.items()):
                    if p is None or not hasattr(p, "full_tensor"):
                        continue
                    name = names.get(id(p))
                    if name in state:
                        swapped.append((mod, leaf, p))
                        mod._parameters[leaf] = torch.nn.Parameter(state[name], requires_grad=p.requires_grad)
        yield model
    finally:
        for mod, leaf, p in swapped:
            mod._parameters[leaf] = p


def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                ) -> tuple[dict[str, torch.Tensor], list, dict[str, str]]:
    """``{"model.<fqn>": DTensor, "optim.<fqn>.<key>": tensor}``, the optimizer's param groups, and the
    aliases left out (tied weights: ``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    flat: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in msd.items():
        local = v.to_local() if hasattr(v, "to_local") else v
        key = (local.data_ptr(), tuple(local.shape), local.dtype) if local.numel() else ("empty", k)
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        flat[f"model.{k}"] = v
    for fqn, st in osd["state"].items():
        for key, val in st.items():
            if not isinstance(val, torch.Tensor):
                val = torch.tensor(val)
            flat[f"optim.{fqn}.{key}"] = val
    return flat, osd["param_groups"], aliases


def save_fsdp_checkpoint(trainer: Any, rng_state: dict[str, Any]) -> Optional[Path]:
    """Write ``output_dir/checkpoint-<step>`` of an FSDP2 run (every rank calls it; rank 0 returns the path).

    Layout: ``fsdp_shards/`` (``torch.distributed.checkpoint`` safetensors storage, one file per rank
    holding its shards of the model and AdamW state, the shard offsets in the safetensors metadata),
    ``optimizer.json`` (param groups), ``scheduler.json``, ``rng_state.*`` per rank
    (``rank<r>/`` for r > 0), and ``trainer_state.json`` written last by rank 0 after a barrier, then the
    folder is renamed from ``tmp-checkpoint-<step>`` (atomic, as single-process checkpoints).
    """
    if has_frozen(trainer.model):
        return _save_trainable_checkpoint(trainer, rng_state)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from llmtune.train import checkpoint as ckpt

    out, step, r = Path(trainer.output_dir), trainer.global_step, rank()
    tmp, final = out / f"tmp-checkpoint-{step}", out / f"checkpoint-{step}"
    if r == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    flat, groups, _ = _flat_state(trainer.model, trainer.optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / FSDP_DIR), save_distributed=True))
    rng_dir = tmp if r == 0 else tmp / f"rank{r}"
    rng_dir.mkdir(exist_ok=True)
    ckpt.save_rng_state(rng_state, rng_dir)
    barrier()
    if r == 0:
        (tmp / "optimizer.json").write_text(json.dumps(ckpt._jsonable(groups), indent=1))
        (tmp / "scheduler.json").write_text(json.dumps(ckpt._jsonable(trainer.scheduler.state_dict())))
        if trainer.scaler is not None and trainer.scaler.is_enabled():
            (tmp / "scaler.json").write_text(json.dumps(ckpt._jsonable(trainer.scaler.state_dict())))
        state = dict(trainer.state_dict(), strategy="fsdp")
        (tmp / ckpt.TRAINER_STATE).write_text(ckpt.strict_dumps(state, indent=1))  # written last, strict JSON
        publish_dir(tmp, final)
    barrier()
    return final if r == 0 else None


def is_fsdp_checkpoint(folder: Path) -> bool:
    """True when ``folder`` was written by :func:`save_fsdp_checkpoint`."""
    return (Path(folder) / FSDP_DIR).is_dir()


def load_fsdp_checkpoint(trainer: Any, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore an FSDP2 checkpoint into ``trainer.model``/``optimizer``/``scheduler``; return
    ``(trainer_state, rng_state)`` like ``checkpoint.load_checkpoint``. Every rank calls it.

    Raises:
        LLMTuneError: the checkpoint was written with a different number of ranks, or the model is not
        sharded with FSDP2 (resume an ``fsdp`` checkpoint with the same ``fsdp`` setting).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from llmtune.train import checkpoint as ckpt

    folder = Path(folder)
    if is_fsdp(trainer.model) and not is_fsdp_checkpoint(folder):
        return _load_trainable_checkpoint(trainer, folder)
    state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
    saved_world = int(state.get("world_size", 1))
    if not is_fsdp(trainer.model):
        raise LLMTuneError(f"resume_from_checkpoint: {folder} is a sharded FSDP checkpoint; resume it with the same "
                           f"fsdp setting and torchrun --nproc_per_node {saved_world}")
    if saved_world != world_size():
        raise LLMTuneError(f"resume_from_checkpoint: {folder} was written by {saved_world} ranks, this run has "
                           f"{world_size()}; resume with torchrun --nproc_per_node {saved_world}")
    flat, _, aliases = _flat_state(trainer.model, trainer.optimizer)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / FSDP_DIR)))
    msd = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    msd.update({alias: msd[kept] for alias, kept in aliases.items()})
    osd_state: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        if k.startswith("optim."):
            fqn, key = k[len("optim."):].rsplit(".", 1)
            osd_state.setdefault(fqn, {})[key] = v
    groups = ckpt._from_json(json.loads((folder / "optimizer.json").read_text()))
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=msd,
                   optim_state_dict={"state": osd_state, "param_groups": groups})
    trainer.scheduler.load_state_dict(ckpt._from_json(json.loads((folder / "scheduler.json").read_text())))
    if trainer.scaler is not None and trainer.scaler.is_enabled() and (folder / "scaler.json").is_file():
        trainer.scaler.load_state_dict(ckpt._from_json(json.loads((folder / "scaler.json").read_text())))
    r = rank()
    rng_dir = folder if r == 0 else folder / f"rank{r}"
    return state, ckpt.load_rng_state(rng_dir if rng_dir.is_dir() else folder)


# -- FSDP2 with frozen parameters: checkpoints of the trainable state, in the single-process format ---------
class _TensorsView:
    """Stands in for a model in ``llmtune.train.checkpoint``: ``named_parameters`` yields the given tensors."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.named = named

    def named_parameters(self, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        seen: set[int] = set()
        for n, t in self.named:
            if remove_duplicate and id(t) in seen:
                continue
            seen.add(id(t))
            yield n, t


class _OptimizerView:
    """Stands in for the optimizer in ``llmtune.train.checkpoint``: ``state_dict`` returns ``sd`` (full tensors)
    and ``load_state_dict`` keeps what it is given in ``loaded``."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd, self.loaded = sd, None

    def state_dict(self) -> dict[str, Any]:
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loaded = sd


def _gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every ``DTensor`` state (AdamW's ``exp_avg``/``exp_avg_sq``) replaced by
    its full tensor. A collective: ranks iterate the same parameters and keys in the same order."""
    sd = optimizer.state_dict()
    state = {idx: {k: (_full(v) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for idx, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _save_trainable_checkpoint(trainer: Any, rng_state: dict[str, Any]) -> Optional[Path]:
    """FSDP2 with frozen parameters: every rank all-gathers the trainable parameters and their AdamW state,
    rank 0 writes ``checkpoint-<step>`` in the single-process format (``llmtune.train.checkpoint``:
    ``trainable.safetensors``, ``optimizer.*``, ``scheduler.json``, ``rng_state.*``, ``trainer_state.json``;
    small for LoRA, and it resumes on any number of ranks or in one process); then ranks r > 0 add their RNG
    state in ``rank<r>/``. Returns the path on rank 0, None elsewhere."""
    from llmtune.train import checkpoint as ckpt

    model = trainer.model
    names = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    full = gather_trainable(model)
    osd = _gather_optimizer_state(trainer.optimizer)
    step, r = trainer.global_step, rank()
    path, error = None, None
    if r == 0:
        ids = {id(p): n for n, p in reversed(names)}
        named = [(n, full[ids[id(p)]].requires_grad_(True)) for n, p in names if p.requires_grad and ids[id(p)] in full]
        try:
            path = ckpt.save_checkpoint(trainer.output_dir, step, model=_TensorsView(named),
                                        optimizer=_OptimizerView(osd), scheduler=trainer.scheduler,
                                        trainer_state=trainer.state_dict(), rng_state=rng_state, scaler=trainer.scaler)
        except LLMTuneError as err:  # NaN weights, disk full: every rank stops with it instead of waiting
            error = err
    dev = next(model.parameters()).device  # nccl reduces CUDA tensors only
    failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], device=dev))
    if error is not None:
        raise error
    if float(failed) > 0:
        raise LLMTuneError(f"rank {r}: rank 0 could not write checkpoint-{step} (its message says why)")
    if r > 0:
        rng_dir = Path(trainer.output_dir) / f"checkpoint-{step}" / f"rank{r}"
        rng_dir.mkdir(exist_ok=True)
        ckpt.save_rng_state(rng_state, rng_dir)
    barrier()
    return path


def save_online_checkpoint(trainer: Any, rng_state: dict[str, Any],
                           online: tuple[dict[str, Any], list]) -> Optional[Path]:
    """``checkpoint-<step>`` of a data-parallel (DDP, no FSDP) online run (ppo, grpo): every rank calls it at the
    same step; rank 0 writes the single-process checkpoint with its own rollout state, every rank r > 0 adds
    ``rank<r>/`` (its RNG state, ``online_state.json`` and ``online_queue.safetensors``: each rank samples and
    queues its own rollouts) inside the temporary folder, and only then is it published. Returns the path on
    rank 0, None elsewhere. ``output_dir`` must be on a file system every rank sees (as for any torchrun run
    whose ranks save).

    Every rank joins three small all-reduces whatever happens (rank 0's folder is ready; the other ranks have
    written; rank 0 has published), so a failure on one rank (NaN weights, a full disk) stops all of them with
    a message instead of leaving the others waiting.

    Raises:
        LLMTuneError: this rank, or another (then: its message says why), could not write its part; nothing is
            published then.
    """
    from llmtune.train import checkpoint as ckpt

    step, r = trainer.global_step, rank()
    dev = next(trainer.model.parameters()).device  # nccl reduces CUDA tensors only

    def failed_anywhere(failed: bool) -> bool:
        return float(all_reduce_sum(torch.tensor([1.0 if failed else 0.0], device=dev))) > 0

    if r > 0:
        rank0_failed = failed_anywhere(False)                      # 1. rank 0's temporary folder is ready
        error = None
        if not rank0_failed:
            part = Path(trainer.output_dir) / f"tmp-checkpoint-{step}" / f"rank{r}"
            try:
                part.mkdir()
                ckpt.save_rng_state(rng_state, part)
                ckpt.save_online_state(online, part)
            except OSError as err:
                error = LLMTuneError(f"rank {r}: could not write {part} ({err.strerror or err}); free space on "
                                     "its disk or make output_dir writable, then resume from the last complete "
                                     "checkpoint")
        others_failed = failed_anywhere(error is not None)          # 2. every rank has written its part
        published = not failed_anywhere(False)                      # 3. rank 0 has published the folder
        if error is not None:
            raise error
        if rank0_failed or others_failed or not published:
            raise LLMTuneError(f"rank {r}: checkpoint-{step} was not saved (another rank's message says why)")
        return None

    joined = 0

    def ranks_write(tmp: Path) -> None:
        nonlocal joined
        joined = 1
        failed_anywhere(False)                                      # 1. ready
        joined = 2
        if failed_anywhere(False):                                  # 2. the other ranks have written
            raise LLMTuneError(f"checkpoint-{step}: another rank could not write its rollout state (its message "
                               "says why), so the checkpoint is not saved")

    path, error = None, None
    try:
        path = ckpt.save_checkpoint(trainer.output_dir, step, model=unwrap(trainer.model), optimizer=trainer.optimizer,
                                    scheduler=trainer.scheduler, trainer_state=trainer.state_dict(),
                                    rng_state=rng_state, scaler=trainer.scaler, online=online,
                                    before_publish=ranks_write, with_optimizer=not trainer.config.save_only_model)
    except LLMTuneError as err:
        error = err
    for _ in range(joined, 2):                                      # the rounds the other ranks still wait in
        failed_anywhere(True)
    failed_anywhere(error is not None)                              # 3. published (or not)
    if error is not None:
        raise error
    return path


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut to ``like``'s ``DTensor`` layout (this rank's chunk, no communication); plain tensors
    are returned on ``like``'s device and dtype."""
    full = full.to(like.device, like.dtype)
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _load_trainable_checkpoint(trainer: Any, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore a single-process-format checkpoint (:func:`_save_trainable_checkpoint`, or one written by a
    single process or DDP) into an FSDP2 model: every rank reads the files and keeps its own shard of each
    trainable parameter and AdamW state; any world size. Errors as ``checkpoint.load_checkpoint``."""
    from llmtune.train import checkpoint as ckpt

    model, opt = trainer.model, trainer.optimizer
    named = list(model.named_parameters(remove_duplicate=False))
    holders: dict[int, torch.Tensor] = {}
    view = []
    for n, p in named:
        if id(p) not in holders:
            holders[id(p)] = torch.empty(tuple(p.shape), dtype=p.dtype).requires_grad_(p.requires_grad)
        view.append((n, holders[id(p)]))
    trainable = {n: holders[id(p)] for n, p in named if p.requires_grad}
    optv = _OptimizerView({"state": {}, "param_groups": opt.state_dict()["param_groups"]})
    state, rng = ckpt.load_checkpoint(folder, model=_TensorsView(view), optimizer=optv, scheduler=trainer.scheduler,
                                      scaler=trainer.scaler)
    params = dict(named)
    with torch.no_grad():
        for n in trainable:
            params[n].copy_(_shard_like(trainable[n], params[n]))
    order = [p for g in opt.param_groups for p in g["params"]]
    osd = optv.loaded
    osd["state"] = {idx: {k: (_shard_like(v, order[int(idx)]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                          for k, v in st.items()} for idx, st in osd["state"].items()}
    opt.load_state_dict(osd)
    r = rank()
    if r > 0 and (Path(folder) / f"rank{r}").is_dir():
        rng = ckpt.load_rng_state(Path(folder) / f"rank{r}")
    return state, rng
