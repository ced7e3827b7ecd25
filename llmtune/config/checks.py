"""Building and checking a :class:`~llmtune.config.keys.TrainConfig`: types, normalisation, limits, relations.

:func:`build` runs once while a config is constructed (``TrainConfig.__post_init__``): it converts each value
to its field type, normalises it (value aliases such as stage ``pretrain`` -> ``pt``, lower-case choices,
``packing`` unset -> true for stage pt) and then calls :func:`check_values`. :func:`check_values` and
:func:`validate` only read: they never change the config they are given.

Every refusal is one :class:`llmtune.errors.LLMTuneError` naming the key, the bad value and what to use.
Refused because they would make training a no-op or mean something else (issue 15): ``lora_alpha <= 0``,
``save_steps <= 0`` with ``save_strategy steps``, negative ``logging_steps``/``warmup_*``/``weight_decay``,
``warmup_ratio > 1``, Adam betas outside [0, 1), ``adam_epsilon <= 0``, ``max_grad_norm < 0``,
``lora_dropout`` outside [0, 1), ``val_size`` neither a fraction in [0, 1) nor a whole count, ``temperature
<= 0`` while sampling, ``top_p`` outside (0, 1], grpo with ``num_generations < 2`` or a batch that is not a
whole number of groups, NaN/inf numbers, and every value outside a key's ``choices``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Union

from llmtune.config.schema import KeyedConfig, coerce_value, field_types, user_fields
from llmtune.errors import LLMTuneError, nearest

#: a config built from :mod:`llmtune.config.keys` (this module never imports the table: it reads the fields of
#: the config it is given, through :mod:`llmtune.config.schema`)
TrainConfig = Any

#: the keys each command needs, with what to give
REQUIRED = {
    "model_name_or_path": "a local folder, a Hugging Face Hub id, a .gguf file, or the output folder of an "
                          "earlier llmtune run",
    "dataset": "a name from dataset_info.json in dataset_dir, or a path to a .json/.jsonl file; several joined "
               "with commas",
    "output_dir": "the folder to write the adapter or model, logs and checkpoints to",
    "export_dir": "the folder to write the merged model to",
}
#: commands parse_config knows: "train", "chat", "export" (the CLI's), "trainer" (a Trainer built in Python:
#: only output_dir is needed) and None (no key required: a config for data or stage helpers)
COMMANDS = ("train", "chat", "export", "trainer", None)


def build(cfg: TrainConfig) -> None:
    """Convert, normalise and check a config being constructed (called by ``TrainConfig.__post_init__``).

    Raises: :class:`LLMTuneError` naming the first bad key.
    """
    keys, types = user_fields(type(cfg)), field_types(type(cfg))
    for name in keys:
        value = coerce_value(types[name], name, getattr(cfg, name), name)
        meta = keys[name].metadata
        if meta["choices"] and isinstance(value, str):
            value = _normalise_choice(name, value, meta)
        object.__setattr__(cfg, name, value)
    if cfg.packing is None:           # LLaMA-Factory: packing defaults to true for pre-training only
        cfg.packing = cfg.stage == "pt"
    if cfg.deepspeed and cfg.fsdp is None and not cfg.is_set("fsdp"):   # ZeRO stage -> FSDP2 (issue 25)
        object.__setattr__(cfg, "fsdp", deepspeed_as_fsdp(cfg.deepspeed))
    check_values(cfg)


def _world_size() -> int:
    """Processes of the run: the initialised process group's size, else ``WORLD_SIZE`` (torchrun), else 1. The
    completions of a grpo step number per_device_train_batch_size x gradient_accumulation_steps x this (TRL)."""
    import os
    import sys

    dist = getattr(sys.modules.get("torch"), "distributed", None)  # torch is not imported for this alone
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _normalise_choice(name: str, value: str, meta: dict) -> Any:
    words = [w for w in value.replace(",", " ").split()] if meta["multi"] else [value]
    out = []
    for word in words:
        w = word.strip().lower()
        w = meta["value_aliases"].get(w, w)
        out.append(w)
    if name == "fsdp" and (not out or out in (["false"], ["no"], ["none"])):
        return None
    if name == "report_to" and not out:
        return "none"
    return (" " if name == "fsdp" else ",").join(out) if meta["multi"] else out[0]


def _num(x: Any) -> str:
    """A bound as the user writes it: an integer stays an integer (``18446744073709551616``, not ``1.84467e+19``)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds_text(meta: dict) -> str:
    lo = f"[{_num(meta['ge'])}" if meta["ge"] is not None else f"({_num(meta['gt'])}" if meta["gt"] is not None else None
    hi = f"{_num(meta['le'])}]" if meta["le"] is not None else f"{_num(meta['lt'])})" if meta["lt"] is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]


def _refuse(name: str, value: Any, rule: str, hint: str = "") -> LLMTuneError:
    if isinstance(value, float) and value.is_integer():
        value = int(value)   # save_steps: 0, not 0.0 (a whole number given for a float-typed key)
    return LLMTuneError(f"{name}: {value!r} is not allowed; it must be {rule}" + (f" ({hint})" if hint else ""))


def check_values(cfg: TrainConfig) -> None:
    """Check every key's allowed values and bounds and the relations between keys; changes nothing.

    Raises: :class:`LLMTuneError` naming the first bad key, its value and what to use.
    """
    for name, f in user_fields(type(cfg)).items():
        value, meta = getattr(cfg, name), f.metadata
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise _refuse(name, value, "a finite number", meta["hint"])
        choices = meta["choices"]
        if choices:
            words = value.split("," if name != "fsdp" else " ") if meta["multi"] else [value]
            for word in words:
                if word not in choices:
                    extra = f"; {meta['hint']}" if meta["hint"] else ""
                    raise LLMTuneError(f"{name}: {word!r} is not one of {', '.join(map(str, choices))}{extra}."
                                       + nearest(str(word), [str(c) for c in choices]))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and any(
                meta[b] is not None for b in ("ge", "gt", "le", "lt")):
            ok = ((meta["ge"] is None or value >= meta["ge"]) and (meta["gt"] is None or value > meta["gt"])
                  and (meta["le"] is None or value <= meta["le"]) and (meta["lt"] is None or value < meta["lt"]))
            if not ok:
                raise _refuse(name, value, _bounds_text(meta), meta["hint"])
    _check_relations(cfg)
    _check_added_keys(cfg)


def _check_relations(cfg: TrainConfig) -> None:
    """The checks that involve more than one key (or more than a range)."""
    if cfg.save_strategy == "steps" and not cfg.save_steps > 0:
        raise _refuse("save_steps", cfg.save_steps, "> 0 with save_strategy steps",
                      "a positive number of steps, or save_strategy no or epoch")
    for name in ("logging_steps", "save_steps", "eval_steps"):   # Hugging Face's rule: below 1 is a fraction
        value = getattr(cfg, name)
        if value is not None and value >= 1 and not float(value).is_integer():
            raise _refuse(name, value, "a whole number of steps, or a fraction of all steps in (0, 1)",
                          "e.g. 10 or 0.1")
    if cfg.max_steps != -1 and cfg.max_steps < 1:   # issue 25: -5 and 0 trained by epochs without a word
        raise _refuse("max_steps", cfg.max_steps, "-1 (train num_train_epochs) or a number of steps >= 1")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:   # -1 and 0 kept every checkpoint
        raise _refuse("save_total_limit", cfg.save_total_limit, ">= 1", "leave it unset to keep every checkpoint")
    if cfg.val_size >= 1 and not float(cfg.val_size).is_integer():
        raise _refuse("val_size", cfg.val_size, "a fraction in [0, 1) or a whole number of examples",
                      "e.g. 0.1 or 100")
    if cfg.do_sample and not cfg.temperature > 0:
        raise _refuse("temperature", cfg.temperature, "> 0 when sampling",
                      "use e.g. 0.7, or do_sample false for greedy decoding")
    if cfg.export_legacy_format:
        raise LLMTuneError("export_legacy_format: True asks for pickled .bin files, which llmtune never writes; "
                           "use export_legacy_format false (safetensors)")
    if cfg.stage in ("ppo", "grpo") and cfg.max_new_tokens < 1:
        raise _refuse("max_new_tokens", cfg.max_new_tokens, f">= 1 for stage {cfg.stage}",
                      "the rollouts need completions to score")
    if cfg.stage == "grpo":
        if cfg.num_generations < 2:
            raise _refuse("num_generations", cfg.num_generations, ">= 2 for stage grpo",
                          "advantages compare the completions of one prompt; use e.g. 8")
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * _world_size()
        if per_step % cfg.num_generations:
            raise LLMTuneError(
                f"num_generations: {cfg.num_generations} does not divide the {per_step} completions of a step "
                f"(per_device_train_batch_size {cfg.per_device_train_batch_size} x gradient_accumulation_steps "
                f"{cfg.gradient_accumulation_steps} x {_world_size()} process(es)); make that product a multiple "
                "of num_generations")
    if cfg.epsilon_high is not None and cfg.epsilon_high < cfg.epsilon:
        raise _refuse("epsilon_high", cfg.epsilon_high, f">= epsilon ({cfg.epsilon:g})",
                      "leave it unset to use epsilon")
    if cfg.reward_weights is not None:
        weights = [w.strip() for w in cfg.reward_weights.split(",") if w.strip()]
        for w in weights:
            try:
                ok = math.isfinite(float(w))
            except ValueError:
                ok = False
            if not ok:
                raise _refuse("reward_weights", cfg.reward_weights, "a comma list of finite numbers", "e.g. 1,0.5")
        funcs = [f for f in (cfg.reward_funcs or "").split(",") if f.strip()]
        if funcs and len(weights) != len(funcs):
            raise LLMTuneError(f"reward_weights: {len(weights)} weights for {len(funcs)} reward_funcs; give one "
                               "weight per function (or leave reward_weights unset for 1 each)")


def _check_added_keys(cfg: TrainConfig) -> None:
    """Relations of keys added in issue 25's round (vision pixel bounds, push_to_hub's repo id)."""
    if (cfg.image_max_pixels is not None and cfg.image_min_pixels is not None
            and cfg.image_max_pixels < cfg.image_min_pixels):
        raise LLMTuneError(f"image_max_pixels: {cfg.image_max_pixels} is below image_min_pixels "
                           f"{cfg.image_min_pixels}, so no image size fits both; make image_max_pixels >= "
                           "image_min_pixels (or unset one)")
    if cfg.hub_model_id is not None:
        check_hub_model_id(cfg.hub_model_id)


def check_hub_model_id(hub_model_id: Any) -> None:
    """Raise one :class:`LLMTuneError` when ``hub_model_id`` is not ``owner/name`` or ``name`` (Hugging Face Hub
    repo names: letters, digits, ``-``, ``_``, ``.``; not ending in ``.`` or ``-``)."""
    import re

    text = str(hub_model_id or "")
    if not re.match(r"^([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$", text) or text.endswith((".", "-")):
        raise LLMTuneError(f"hub_model_id: {hub_model_id!r} is not a Hub repo id; give owner/name (or name, in your "
                           "own namespace), e.g. my-user/smollm2-identity-lora")


def deepspeed_zero(path: str) -> tuple[int, bool]:
    """``(ZeRO stage, offload?)`` of a DeepSpeed config: ``zero_optimization.stage`` and whether
    ``offload_optimizer``/``offload_param`` name a device of the JSON file; where the file is not there,
    LLaMA-Factory's file names (``examples/deepspeed/ds_z3_offload_config.json``: stage 3, offload).

    Source: DeepSpeed's config JSON (``zero_optimization``), LLaMA-Factory's ``examples/deepspeed`` names.

    Raises:
        LLMTuneError: a file that is not JSON, a stage that is not 0-3, or a missing file whose name does
            not say its stage.
    """
    import json
    import re
    from pathlib import Path

    p = Path(os.path.expanduser(str(path)))
    fix = "llmtune shards with FSDP2, not DeepSpeed: remove deepspeed and set fsdp (full_shard for ZeRO-3) under torchrun"
    if p.is_file():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise LLMTuneError(f"deepspeed: {path}: not a readable JSON file ({type(e).__name__}); {fix}") from None
        zero = data.get("zero_optimization", {}) if isinstance(data, dict) else {}
        zero = zero if isinstance(zero, dict) else {}
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise LLMTuneError(f"deepspeed: {path}: zero_optimization.stage {stage!r} is not 0, 1, 2 or 3; {fix}")
        offload = any(isinstance(zero.get(k), dict) and str(zero[k].get("device", "none")).lower() not in ("none", "")
                      for k in ("offload_optimizer", "offload_param"))
        return int(stage), offload
    m = re.search(r"(?:^|[_-])z(?:ero)?[_-]?([0-3])(?:[_.-]|$)", p.name.lower())
    if m is None:
        raise LLMTuneError(f"deepspeed: {path}: no such file, and its name does not say a ZeRO stage; {fix}")
    return int(m.group(1)), "offload" in p.name.lower()


def deepspeed_as_fsdp(path: str) -> Any:
    """The ``fsdp`` value standing for a DeepSpeed config (:func:`deepspeed_zero`): ZeRO-3 shards parameters,
    gradients and optimizer state (FSDP ``full_shard``), ZeRO-2 gradients and optimizer state (``shard_grad_op``:
    parameters stay gathered between forward and backward), ZeRO-0/1 none or the optimizer state only (None:
    DDP); offloading adds ``offload`` (to a sharded mode, ``shard_grad_op`` at least)."""
    stage, offload = deepspeed_zero(path)
    mode = {3: "full_shard", 2: "shard_grad_op"}.get(stage)
    if offload:
        mode = f"{mode or 'shard_grad_op'} offload"
    return mode


def notice_mapped_keys(cfg: TrainConfig, command: Any) -> None:
    """One notice for each LLaMA-Factory/TRL key set that llmtune serves another way (what it does instead;
    ``adapter_name_or_path`` without ``create_new_adapter``: merged, and a new adapter trained on top).
    ``push_to_hub``'s readiness (a repo id, online, a token) is checked by ``run_train`` first thing
    (:func:`llmtune.train.hub.check_ready`)."""
    from llmtune.errors import notice

    if cfg.is_set("flash_attn") and cfg.flash_attn in ("fa2", "disabled"):
        what = ("runs FlashAttention-2 kernels on CUDA by itself (bf16/fp16; the flash-attn package is not used)"
                if cfg.flash_attn == "fa2" else "computes the same softmax(QK^T/sqrt(d))V as eager attention")
        notice(f"flash_attn: {cfg.flash_attn}: llmtune's attention is torch's scaled_dot_product_attention "
               f"(segment-aware for packed rows), which {what}")
    if cfg.is_set("infer_backend") and cfg.infer_backend != "huggingface":
        notice(f"infer_backend: {cfg.infer_backend} is not used; llmtune generates with its own engine (KV cache, "
               "rows joining and leaving) in chat, predict, api and rollouts")
    if command == "train" and cfg.use_vllm and cfg.stage in ("ppo", "grpo"):   # other stages: relevance's notice
        notice("use_vllm: rollouts run on llmtune's own generation engine (KV cache, rows joining and leaving) in "
               "this process; vllm is not used")
    if (command == "train" and cfg.adapter_name_or_path and cfg.finetuning_type == "lora"
            and not cfg.create_new_adapter):
        notice("adapter_name_or_path: the given adapter(s) are merged into the base and a new adapter is trained "
               "on top (as create_new_adapter: true; llmtune does not continue an adapter in place); the output "
               "records them as parent_adapters, which llmtune chat/export apply")
    if command == "train" and cfg.deepspeed:
        stage, offload = deepspeed_zero(cfg.deepspeed)
        now = f"fsdp: {cfg.fsdp}" if cfg.fsdp else "DDP (each process holds the whole model and optimizer)"
        what = "the fsdp you set applies" if cfg.is_set("fsdp") else f"ZeRO-{stage}{' with offload' if offload else ''}"
        notice(f"deepspeed: llmtune does not use DeepSpeed; {what}: {now} under torchrun")


def validate(cfg: TrainConfig, command: Union[str, None] = "train") -> None:
    """Check ``cfg`` for ``command``: every value (:func:`check_values`) and the keys the command needs.

    Never changes ``cfg``. ``command``: see :data:`COMMANDS`.

    Raises: :class:`LLMTuneError` naming the key and how to fix it.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    if not isinstance(cfg, KeyedConfig):
        raise LLMTuneError(f"expected an llmtune.config.TrainConfig, got {type(cfg).__name__}; build one with "
                           "llmtune.config.parse_config")
    check_values(cfg)
    needed: list[str] = []
    if command in ("train", "chat", "export"):
        needed.append("model_name_or_path")
    if command == "train" and cfg.do_train:
        needed.append("dataset")
    if command in ("train", "trainer"):
        needed.append("output_dir")
    if command == "export":
        needed.append("export_dir")
    for name in needed:
        if not getattr(cfg, name):
            what = "training" if name == "dataset" else f"`llmtune {command}`" if command != "trainer" else "Trainer"
            raise LLMTuneError(f"{name}: required for {what} ({REQUIRED[name]})")
    if command == "train" and not (cfg.do_train or cfg.do_eval or cfg.do_predict):
        raise LLMTuneError("do_train: false with do_eval and do_predict false runs nothing; set do_train: true to "
                           "train, or do_eval / do_predict: true to only evaluate")
    if command in ("train", "trainer"):
        if cfg.bf16 and cfg.fp16:
            raise LLMTuneError("bf16 and fp16 are both true; set only one of them")
        if cfg.do_train and cfg.max_steps <= 0 and cfg.num_train_epochs == 0:
            raise LLMTuneError("num_train_epochs: 0 with max_steps unset trains nothing; set num_train_epochs > 0 "
                               "or max_steps > 0 (or do_train false to only evaluate)")
