"""Model wrapping for scale-out: DDP or FSDP2, gradient sync and clipping, gathering the full state.

:func:`wrap_model` wraps the model for the running process group (:mod:`llmtune.train.distributed`); without
one the model is returned unchanged.

* **loss normalisation**: the trainer back-propagates ``loss_sum / step_items`` with ``step_items`` summed
  over all micro-batches and all ranks. DDP would then average (divide by the world size); we register a
  communication hook that SUMS instead (:func:`sum_allreduce_hook`), and FSDP2 gets
  ``set_gradient_divide_factor(1.0)``. So N ranks x batch b give exactly the gradient of one rank x batch
  N*b (tested to 1e-5).
* **strategies**: DDP (default; only ``requires_grad`` parameters enter its reducer, so with LoRA only the
  adapters are all-reduced) or FSDP2 ``fully_shard`` (``fsdp: full_shard`` in the config; full, freeze, LoRA
  and QLoRA): every decoder layer is sharded, then the root; frozen and trainable parameters share a unit
  (FSDP2 reduces gradients of the trainable ones only); a 4-bit layer's packed NF4 storage becomes frozen
  flat parameters first (``Linear4bit.shardable_storage``) so it shards too; ``bf16`` gives FSDP2's
  ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``.
* **outputs**: rank 0 alone logs, plots and writes the final adapter/model; with FSDP2 every rank takes
  part in gathering the full state dict (:func:`gather_full_state_dict`; with a LoRA adapter, the
  trainable tensors only) and rank 0 writes it (:func:`full_parameters` puts the gathered adapters in place).

Sources: PyTorch documentation of ``DistributedDataParallel`` (DDP communication hooks), FSDP2
(``torch.distributed.fsdp.fully_shard``, ``MixedPrecisionPolicy``, ``CPUOffloadPolicy``),
``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict``); ZeRO (Rajbhandari et al., 2020) for
the memory arithmetic in docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from llmtune.compat import FSDP_INTEGER_PARAMS_TORCH, torch_version
from llmtune.config.keys import FSDP_TOKENS
from llmtune.errors import LLMTuneError, nearest
from llmtune.train.distributed import is_initialized, rank, world_size


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
    checkpoints then hold the trainable tensors only, in the single-process format
    (:mod:`llmtune.train.ckpt_parallel`)."""
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
    """True when ``model`` has been through FSDP2 ``fully_shard``.

    A process that never imported ``torch.distributed.fsdp`` has no FSDP2 module (``fully_shard`` lives there):
    then False without importing it (the import takes 0.3-1 s of CPU: DTensor, sympy), so a single-process run
    never pays for it."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
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


# -- gathering the full state ------------------------------------------------------------------
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


def full_tensor(t: torch.Tensor) -> torch.Tensor:
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
            full = full_tensor(p)
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
