"""One configuration object for ``llmtune train``, ``chat`` and ``export``.

Field names are LLaMA-Factory's (so its YAML recipes work unchanged); the seed document's spellings are
aliases (``--max_seq_length`` -> ``cutoff_len``, ``--dpo_beta`` -> ``pref_beta``, ``--stage pretrain`` -> ``pt``,
``--stage rlhf`` -> ``ppo``, ``--rm_path`` -> ``reward_model``, ``--load_in_4bit True`` -> ``quantization_bit 4``,
...). An unknown key is an error naming the nearest known keys; LLaMA-Factory keys that mean nothing here
are accepted with a one-line notice.

Sources: LLaMA-Factory's ``hparams`` argument groups (key names and defaults); Hugging Face
``TrainingArguments`` (trainer keys).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from llmtune.errors import LLMTuneError, nearest, notice

STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto", "grpo")
STAGE_ALIASES = {"pretrain": "pt", "pre-train": "pt", "pretraining": "pt", "rlhf": "ppo", "reward": "rm",
                 "supervised": "sft"}
FINETUNING_TYPES = ("lora", "freeze", "full")


@dataclass
class TrainConfig:
    """Every setting of a run, flat, with LLaMA-Factory's key names.

    Build it with :func:`parse_config` (argv, YAML file or dict), which applies aliases, converts string
    values to the field types and validates. ``to_dict()`` gives a YAML-ready dict (``training_args.yaml``).
    """

    # -- stage -------------------------------------------------------------------------------
    stage: str = "sft"
    do_train: bool = True
    do_eval: bool = False
    do_predict: bool = False
    predict_with_generate: bool = False

    # -- model ---------------------------------------------------------------------------------
    model_name_or_path: Optional[str] = None
    adapter_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    cache_dir: Optional[str] = None
    infer_dtype: str = "auto"
    quantization_bit: Optional[int] = None
    quantization_type: str = "nf4"
    double_quantization: bool = True
    device: Optional[str] = None

    # -- fine-tuning method ----------------------------------------------------------------------
    finetuning_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_target: str = "all"
    additional_target: Optional[str] = None
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: Optional[float] = None
    value_head_lr: Optional[float] = None
    create_new_adapter: bool = False
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: str = "all"
    freeze_extra_modules: Optional[str] = None

    # -- data ------------------------------------------------------------------------------------
    dataset: Optional[str] = None
    eval_dataset: Optional[str] = None
    dataset_dir: str = "data"
    template: Optional[str] = None
    default_system: Optional[str] = None
    cutoff_len: int = 2048
    max_samples: Optional[int] = None
    val_size: float = 0.0
    packing: bool = False
    neat_packing: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    overwrite_cache: bool = False
    tool_format: Optional[str] = None
    data_cache_dir: Optional[str] = None

    # -- trainer -------------------------------------------------------------------------------
    output_dir: Optional[str] = None
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_steps: int = 10
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    save_only_model: bool = False
    eval_strategy: str = "no"
    eval_steps: Optional[int] = None
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    report_to: str = "none"
    plot_loss: bool = False
    resume_from_checkpoint: Optional[str] = None
    disable_tqdm: bool = False

    # -- distributed -----------------------------------------------------------------------------
    fsdp: Optional[str] = None
    ddp_timeout: int = 1800

    # -- preference / RLHF ---------------------------------------------------------------------
    pref_beta: float = 0.1
    pref_loss: str = "sigmoid"
    pref_ftx: float = 0.0
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    kto_alpha: Optional[float] = None
    ref_model: Optional[str] = None
    ref_model_adapters: Optional[str] = None
    reward_model: Optional[str] = None
    reward_model_adapters: Optional[str] = None
    reward_model_type: str = "lora"
    ppo_buffer_size: int = 1
    ppo_epochs: int = 4
    ppo_score_norm: bool = False
    ppo_target: Optional[float] = None
    ppo_whiten_rewards: bool = False
    ppo_clip_ratio: float = 0.2
    ppo_value_clip: float = 0.2
    ppo_kl_coeff: float = 0.05
    ppo_gamma: float = 1.0
    ppo_lam: float = 0.95
    ppo_vf_coef: float = 0.1
    num_generations: int = 8
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    reward_funcs: Optional[str] = None
    reward_weights: Optional[str] = None

    # -- generation ------------------------------------------------------------------------------
    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0
    system: Optional[str] = None

    # -- export ----------------------------------------------------------------------------------
    export_dir: Optional[str] = None
    export_size: float = 5.0
    export_legacy_format: bool = False
    export_quantization_bit: Optional[int] = None
    export_format: str = "safetensors"
    gguf_type: str = "f16"
    overwrite_export_dir: bool = False

    # -- bookkeeping (not a user key) ----------------------------------------------------------
    _explicit: set = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """All user-visible keys and values (for ``training_args.yaml``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def is_set(self, key: str) -> bool:
        """Whether ``key`` was given by the user (YAML, flag or dict) rather than defaulted."""
        return key in self._explicit

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (they count as set by the user)."""
        new = dataclasses.replace(self, **changes)
        new._explicit = set(self._explicit) | set(changes)
        return new


#: seed-document and LLaMA-Factory-legacy spellings -> our key
ALIASES = {
    "max_seq_length": "cutoff_len",
    "max_length": "cutoff_len",
    "evaluation_strategy": "eval_strategy",
    "dpo_beta": "pref_beta",
    "dpo_loss": "pref_loss",
    "dpo_ftx": "pref_ftx",
    "rm_path": "reward_model",
    "export_dtype": "infer_dtype",
    "lora_r": "lora_rank",
    "data_dir": "dataset_dir",
    "system_prompt": "default_system",
    "kto_desirable_weight": "kto_chosen_weight",
    "kto_undesirable_weight": "kto_rejected_weight",
    "cliprange": "ppo_clip_ratio",
    "init_kl_coef": "ppo_kl_coeff",
    "max_completion_length": "max_new_tokens",
    "tokenized_path": "data_cache_dir",
}

#: LLaMA-Factory / transformers keys accepted with a notice because they change nothing here
IGNORED_KEYS = {
    "preprocessing_num_workers", "trust_remote_code", "flash_attn", "dataloader_num_workers",
    "ddp_find_unused_parameters", "use_fast_tokenizer", "enable_liger_kernel", "use_unsloth",
    "upcast_layernorm", "upcast_lmhead_output", "use_cache", "low_cpu_mem_usage", "split_special_tokens",
    "new_special_tokens", "model_revision", "hf_hub_token", "ms_hub_token", "om_hub_token",
    "print_param_status", "include_num_input_tokens_seen", "streaming", "buffer_size", "mix_strategy",
    "interleave_probs", "preprocessing_batch_size", "dataloader_pin_memory", "remove_unused_columns",
    "logging_dir", "run_name", "push_to_hub", "hub_model_id", "deepspeed", "ddp_backend", "local_rank",
    "tf32", "disable_gradient_checkpointing", "use_reentrant_gc", "shift_attn", "rope_scaling",
    "moe_aux_loss_coef", "infer_backend", "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager",
    "save_safetensors", "ignore_pad_token_for_loss", "log_level", "logging_first_step", "eval_on_start",
    "dataloader_persistent_workers", "use_llama_pro", "pissa_init", "pissa_convert", "pissa_iter",
    "export_device", "export_hub_model_id", "adapter_folder", "offload_folder",
}

#: the value of a ``--flag`` given with no value: true for a boolean key, an error for any other
BARE_FLAG = object()

_SEED_COMMENT_HINT = ("a lone ' ' argument: the command still has the seed document's inline '\\  # comment' "
                      "line endings, which no shell can run; remove the '# ...' comments (keep the '\\' at "
                      "the very end of each line) and run it again")


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig) if not f.name.startswith("_")}


_TYPES = _field_types()


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) of a field annotation."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert ``value`` (often a string from the command line) to the type of field ``key``."""
    tp, optional = _base_type(_TYPES[key])
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if optional or tp is str:
            return None if optional else value
        raise LLMTuneError(f"{source}: {key} needs a value of type {tp.__name__}, got {value!r}")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            number = float(str(value).strip())
            if not number.is_integer():
                raise ValueError
            return int(number)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise LLMTuneError(f"{source}: {key} expects {'true/false' if tp is bool else tp.__name__}, got {value!r}")


def _normalise_key(raw: str, source: str, notices: list[str]) -> Optional[str]:
    key = raw.strip().lstrip("-").replace("-", "_")
    if key in ALIASES:
        return ALIASES[key]
    if key in _TYPES:
        return key
    if key in IGNORED_KEYS:
        notices.append(f"{source}: '{key}' has no effect in llmtune and is ignored")
        return None
    if key in ("load_in_4bit", "load_in_8bit"):
        return key
    shown = f"--{key}" if source == "command line" else f"'{raw.strip()}'"
    raise LLMTuneError(f"{source}: unknown key {shown}."
                       + (nearest(key, list(_TYPES) + list(ALIASES)) or " Run `llmtune train --help` for the keys."))


def _apply(values: dict[str, Any], key: str, value: Any, source: str, explicit: set) -> None:
    if value is BARE_FLAG:
        is_bool = key in ("load_in_4bit", "load_in_8bit") or _base_type(_TYPES[key])[0] is bool
        if not is_bool:
            raise LLMTuneError(f"{source}: needs a value (--{key} VALUE); a flag alone means true only for "
                               "true/false keys")
        value = True
    if key == "load_in_4bit":
        if _coerce("double_quantization", value, source):  # a boolean
            values["quantization_bit"] = 4
            explicit.add("quantization_bit")
        return
    if key == "load_in_8bit":
        if _coerce("double_quantization", value, source):
            raise LLMTuneError(f"{source}: load_in_8bit: llmtune quantizes to 4 bits only (NF4/FP4); use "
                               "--quantization_bit 4 (or --load_in_4bit True)")
        return
    values[key] = _coerce(key, value, source)
    explicit.add(key)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LLMTuneError(f"{path}: config file not found") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise LLMTuneError(f"{path}: cannot parse config ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LLMTuneError(f"{path}: a config file must be a mapping of keys to values")
    return data


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split command-line words into config files and ``key -> value`` pairs.

    Accepts ``--key value``, ``--key=value``, ``key=value`` and a bare ``--flag`` (meaning true).

    Raises:
        LLMTuneError: a lone ``' '`` word or a ``#`` comment word (the seed's inline comments pasted), or a
            stray word that is no key.
    """
    files: list[str] = []
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.strip() == "" or word.startswith("#"):
            raise LLMTuneError(f"argument {i + 1} is {word!r}: {_SEED_COMMENT_HINT}")
        if word.startswith("--"):
            body = word[2:]
            if "=" in body:
                k, v = body.split("=", 1)
                pairs.append((k, v))
                i += 1
                continue
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt == "":
                raise LLMTuneError(f"--{body}: the value is empty; give one (--{body} VALUE) or leave the key out "
                                   "for its default")
            if nxt is not None and nxt.strip() == "":
                raise LLMTuneError(f"the value of --{body} is {nxt!r}: {_SEED_COMMENT_HINT}")
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                pairs.append((body, BARE_FLAG))
                i += 1
            else:
                pairs.append((body, nxt))
                i += 2
            continue
        if "=" in word and not word.endswith((".yaml", ".yml", ".json")):
            k, v = word.split("=", 1)
            pairs.append((k, v))
        elif word.endswith((".yaml", ".yml", ".json")):
            files.append(word)
        else:
            raise LLMTuneError(f"unexpected argument {word!r}: give keys as --key value (or key=value), and a "
                               "config file as a .yaml/.json path")
        i += 1
    return files, dict(pairs) if len({k for k, _ in pairs}) == len(pairs) else _last_wins(pairs)


def _last_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        out[k] = v
    return out


def parse_config(source: Union[list[str], dict, str, Path, "TrainConfig", None] = None,
                 command: str = "train", **overrides: Any) -> TrainConfig:
    """Build a validated :class:`TrainConfig`.

    Args:
        source: command-line words (``["config.yaml", "--lora_rank", "16"]``; flags override the file),
            a dict, a YAML/JSON path, or an existing TrainConfig.
        command: ``train``, ``chat`` or ``export`` (decides which keys are required).
        overrides: more keys, applied last.

    Raises:
        LLMTuneError: unknown key (nearest ones suggested), a value of the wrong type, an invalid choice or
            a missing required key.
    """
    if isinstance(source, TrainConfig):
        cfg = source.replace(**overrides) if overrides else source
        validate(cfg, command)
        return cfg
    values: dict[str, Any] = {}
    explicit: set = set()
    notices: list[str] = []
    layers: list[tuple[str, dict[str, Any]]] = []
    if source is None:
        pass
    elif isinstance(source, (str, Path)):
        layers.append((str(source), _read_file(Path(source))))
    elif isinstance(source, dict):
        layers.append(("config", dict(source)))
    else:
        files, pairs = split_argv(list(source))
        for f in files:
            layers.append((f, _read_file(Path(f))))
        layers.append(("command line", pairs))
    if overrides:
        layers.append(("arguments", overrides))
    for where, data in layers:
        for raw_key, value in data.items():
            key = _normalise_key(str(raw_key), where, notices)
            if key is not None:
                _apply(values, key, value, where if where != "command line" else f"--{raw_key}", explicit)
    for msg in dict.fromkeys(notices):
        notice(msg)
    cfg = TrainConfig(**values)
    cfg._explicit = explicit
    validate(cfg, command)
    return cfg


def validate(cfg: TrainConfig, command: str = "train") -> None:
    """Normalise aliases in values and check choices; raises :class:`LLMTuneError` naming the key."""
    stage = (cfg.stage or "").strip().lower()
    stage = STAGE_ALIASES.get(stage, stage)
    if stage not in STAGES:
        raise LLMTuneError(f"stage: unknown stage {cfg.stage!r}; choose one of {', '.join(STAGES)} "
                           "(the seed's 'pretrain' means pt and 'rlhf' means ppo)." + nearest(stage, STAGES))
    cfg.stage = stage
    if cfg.finetuning_type not in FINETUNING_TYPES:
        raise LLMTuneError(f"finetuning_type: {cfg.finetuning_type!r} is not one of {', '.join(FINETUNING_TYPES)}")
    if cfg.quantization_bit is not None and cfg.quantization_bit != 4:
        raise LLMTuneError(f"quantization_bit: {cfg.quantization_bit} is not supported; llmtune quantizes to 4 "
                           "bits (NF4 or FP4): use --quantization_bit 4")
    if cfg.quantization_type not in ("nf4", "fp4"):
        raise LLMTuneError(f"quantization_type: {cfg.quantization_type!r} is not one of nf4, fp4")
    if cfg.export_quantization_bit is not None and cfg.export_quantization_bit != 4:
        raise LLMTuneError(f"export_quantization_bit: {cfg.export_quantization_bit} is not supported; use 4 "
                           "(bitsandbytes NF4 layout). Note: --export_size is the shard size in GB, not a bit width")
    if cfg.export_legacy_format:
        raise LLMTuneError("export_legacy_format: True asks for pickled .bin files, which llmtune never writes; "
                           "use --export_legacy_format False (safetensors)")
    if cfg.lr_scheduler_type not in ("linear", "cosine", "constant", "constant_with_warmup"):
        raise LLMTuneError(f"lr_scheduler_type: {cfg.lr_scheduler_type!r} is not one of linear, cosine, constant, "
                           "constant_with_warmup")
    if cfg.eval_strategy not in ("no", "steps", "epoch"):
        raise LLMTuneError(f"eval_strategy: {cfg.eval_strategy!r} is not one of no, steps, epoch")
    if cfg.save_strategy not in ("no", "steps", "epoch"):
        raise LLMTuneError(f"save_strategy: {cfg.save_strategy!r} is not one of no, steps, epoch")
    if cfg.report_to not in ("none", "tensorboard", "all"):
        raise LLMTuneError(f"report_to: {cfg.report_to!r} is not supported; use none or tensorboard")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise LLMTuneError(f"max_samples: must be at least 1, got {cfg.max_samples} (leave it unset for all samples)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "cutoff_len", "lora_rank"):
        if getattr(cfg, key) < 1:
            raise LLMTuneError(f"{key}: must be at least 1, got {getattr(cfg, key)}")
    if not math.isfinite(cfg.learning_rate) or cfg.learning_rate < 0:
        raise LLMTuneError(f"learning_rate: must be a finite number >= 0, got {cfg.learning_rate}")
    if cfg.value_head_lr is not None and not (math.isfinite(cfg.value_head_lr) and cfg.value_head_lr > 0):
        raise LLMTuneError(f"value_head_lr: must be a finite number > 0, got {cfg.value_head_lr} (leave it unset "
                           "to use learning_rate)")
    if command == "train" and cfg.bf16 and cfg.fp16:
        raise LLMTuneError("bf16 and fp16 are both true; set only one of them")
    if cfg.infer_dtype not in ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"):
        raise LLMTuneError(f"infer_dtype: {cfg.infer_dtype!r} is not one of auto, float32, float16, bfloat16")
    if command in ("train", "chat", "export") and not cfg.model_name_or_path:
        raise LLMTuneError(f"model_name_or_path: required for `llmtune {command}` (a local folder, a Hugging Face "
                           "Hub id, a .gguf file, or the output folder of an earlier llmtune run)")
    if command == "train":
        if cfg.do_train and not cfg.dataset:
            raise LLMTuneError("dataset: required for training (a name from dataset_info.json in dataset_dir, "
                               "or a path to a .json/.jsonl file; several joined with commas)")
        if not cfg.output_dir:
            raise LLMTuneError("output_dir: required for `llmtune train` (the folder to write the adapter or "
                               "model, logs and checkpoints to)")
    if command == "export" and not cfg.export_dir:
        raise LLMTuneError("export_dir: required for `llmtune export` (the folder to write the merged model to)")


def config_help() -> str:
    """A text listing every key with its default, grouped as in :class:`TrainConfig`."""
    lines = ["Keys (as --key value, key=value, or in a YAML file); LLaMA-Factory names:"]
    for f in fields(TrainConfig):
        if f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  --{f.name} (default: {default})")
    lines.append("Aliases: " + ", ".join(f"{a} -> {b}" for a, b in sorted(ALIASES.items()))
                 + ", load_in_4bit True -> quantization_bit 4, stage pretrain -> pt, stage rlhf -> ppo")
    return "\n".join(lines)
