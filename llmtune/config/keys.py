"""Every configuration key of llmtune, in one place: name, type, default, allowed values, one-line help.

:class:`TrainConfig` is a flat dataclass whose field names are LLaMA-Factory's (so its YAML recipes work
unchanged). Each field is declared with :func:`key`, which stores in the field's ``metadata``:

* ``help``: one line, shown by ``llmtune <command> --help``;
* ``group``: the topic it is listed under (:data:`GROUPS`);
* ``choices``: the allowed values of a string/int key (checked when the config is built), with
  ``value_aliases`` (e.g. stage ``pretrain`` -> ``pt``) and ``multi`` (a comma list of choices);
* ``ge``/``gt``/``le``/``lt``: bounds of a number (an unset ``None`` is never checked), and ``hint``: what a
  refused value means and what to use instead.

Building a config (``TrainConfig(...)``, :func:`llmtune.config.parse_config`, :meth:`TrainConfig.replace`)
converts the values to the field types, normalises them (aliases of values, lower-case choices) and
checks them (:mod:`llmtune.config.checks`, which knows keys only through :mod:`llmtune.config.schema`,
where :func:`key` and :data:`GROUPS` live); a bad value raises one :class:`llmtune.errors.LLMTuneError`
naming the key. Which keys a command requires is checked by ``parse_config(..., command=...)``.

Sources: LLaMA-Factory's ``hparams`` argument groups (names, defaults, meanings); Hugging Face
``TrainingArguments`` (trainer keys); TRL ``GRPOConfig`` (GRPO keys).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from llmtune.config.checks import build
from llmtune.config.schema import BOOL_WORDS, GROUPS, KeyedConfig, field_types, key, user_fields  # noqa: F401

STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto", "grpo")
STAGE_ALIASES = {"pretrain": "pt", "pre-train": "pt", "pretraining": "pt", "rlhf": "ppo", "reward": "rm",
                 "supervised": "sft"}
FINETUNING_TYPES = ("lora", "freeze", "full")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("no", "steps", "epoch")
PREF_LOSSES = ("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "all")
FSDP_TOKENS = ("full_shard", "shard_grad_op", "auto_wrap", "offload")


model = functools.partial(key, group="model")
tune = functools.partial(key, group="finetuning")
data = functools.partial(key, group="data")
train = functools.partial(key, group="training")
pref = functools.partial(key, group="preference")
rl = functools.partial(key, group="rl")
gen = functools.partial(key, group="generation")
chat = functools.partial(key, group="chat")
export = functools.partial(key, group="export")
dist = functools.partial(key, group="distributed")


@dataclass
class TrainConfig(KeyedConfig):
    """Every setting of a run, flat, with LLaMA-Factory's key names (help and limits in each field's metadata).

    Build it with :func:`llmtune.config.parse_config` (argv, YAML/JSON file or dict: applies key aliases and
    the command's required keys) or directly (``TrainConfig(stage="dpo", ...)``); both convert, normalise and
    check every value and raise :class:`llmtune.errors.LLMTuneError` naming the key. ``to_dict()`` gives a
    YAML-ready dict (``training_args.yaml``); ``replace(**changes)`` a new, re-checked config.
    """

    # -- model -------------------------------------------------------------------------------------
    model_name_or_path: Optional[str] = model(None, "local folder, Hugging Face Hub id, .gguf file, or the output "
                                              "folder of an earlier llmtune run")
    adapter_name_or_path: Optional[str] = model(None, "LoRA adapter folder(s), comma-separated, applied in order")
    revision: Optional[str] = model(None, "Hub revision (branch, tag or commit) of model_name_or_path")
    cache_dir: Optional[str] = model(None, "folder for downloaded models (and the dataset cache unless "
                                     "data_cache_dir is set)")
    infer_dtype: str = model("auto", "dtype of the weights in chat and export (auto = the checkpoint's)",
                             choices=DTYPES, value_aliases=DTYPE_ALIASES)
    quantization_bit: Optional[int] = model(None, "load the base weights in 4 bits (QLoRA); unset = no "
                                            "quantization", choices=(4,),
                                            hint="llmtune quantizes to 4 bits (NF4 or FP4)")
    quantization_type: str = model("nf4", "4-bit data type", choices=("nf4", "fp4"))
    double_quantization: bool = model(True, "quantize the 4-bit scales too (QLoRA's double quantization)")
    device: Optional[str] = model(None, "cpu, cuda or cuda:N (unset: cuda when available, else cpu)")
    use_kernels: bool = model(True, "fused Triton kernels on CUDA when triton is installed (PyTorch code "
                              "elsewhere)")
    moe_aux_loss_coef: Optional[float] = model(None, "weight of the MoE router's load-balancing loss (unset = "
                                               "the model's router_aux_loss_coef)", ge=0)
    flash_attn: str = model("auto", "LLaMA-Factory's attention choice: every value runs llmtune's attention, "
                            "torch's scaled_dot_product_attention (FlashAttention-2 kernels on CUDA in bf16/fp16); "
                            "fa2 and disabled get a notice saying so",
                            choices=("auto", "sdpa", "fa2", "disabled"),
                            value_aliases={"flash_attention_2": "fa2", "eager": "disabled", "off": "disabled"})

    # -- fine-tuning method ----------------------------------------------------------------------------
    finetuning_type: str = tune("lora", "which weights train: LoRA adapters, the last layers (freeze) or all",
                                choices=FINETUNING_TYPES)
    lora_rank: int = tune(8, "LoRA rank r", ge=1)
    lora_alpha: Optional[float] = tune(None, "LoRA scale numerator (update = alpha/r x B A)", gt=0,
                                       show_default="2 x lora_rank",
                                       hint="lora_alpha 0 scales the adapters to nothing, so nothing trains; "
                                            "leave it unset for 2 x lora_rank")
    lora_dropout: float = tune(0.0, "dropout on the LoRA input", ge=0, lt=1)
    lora_target: str = tune("all", "modules that get LoRA: all, or names such as q_proj,v_proj")
    additional_target: Optional[str] = tune(None, "modules trained in full besides LoRA (e.g. embed_tokens,lm_head)")
    use_rslora: bool = tune(False, "rank-stabilised LoRA: scale alpha/sqrt(r)")
    use_dora: bool = tune(False, "weight-decomposed LoRA (DoRA)")
    loraplus_lr_ratio: Optional[float] = tune(None, "LoRA+: lora_B learns at learning_rate x this ratio", gt=0)
    value_head_lr: Optional[float] = tune(None, "learning rate of the value head (rm, ppo); unset = "
                                          "learning_rate", gt=0, hint="leave it unset to use learning_rate")
    create_new_adapter: bool = tune(False, "accepted for LLaMA-Factory recipes: llmtune always merges "
                                    "adapter_name_or_path into the base and trains a new adapter on top (false: a "
                                    "notice says so)")
    freeze_trainable_layers: int = tune(2, "freeze: train the last N layers (negative: the first N)")
    freeze_trainable_modules: str = tune("all", "freeze: modules trained inside those layers")
    freeze_extra_modules: Optional[str] = tune(None, "freeze: modules trained besides the layers (e.g. embed_tokens)")
    freeze_vision_tower: bool = tune(True, "vision-language models: keep the vision tower (visual.patch_embed, "
                                     "visual.blocks) frozen; false with lora_target all also puts LoRA on the "
                                     "vision blocks")
    freeze_multi_modal_projector: bool = tune(True, "vision-language models: keep the patch merger(s) "
                                              "(visual.merger, DeepStack mergers) frozen")
    freeze_language_model: bool = tune(False, "vision-language models: keep the language model frozen")

    # -- data ------------------------------------------------------------------------------------------
    dataset: Optional[str] = data(None, "training data: names from dataset_info.json or .json/.jsonl paths, "
                                  "comma-separated")
    eval_dataset: Optional[str] = data(None, "evaluation data, as dataset")
    dataset_dir: str = data("data", "folder holding dataset_info.json")
    template: Optional[str] = data(None, "chat template name (unset: the one recorded by training, else the "
                                   "model's own)")
    default_system: Optional[str] = data(None, "system prompt used where an example has none")
    cutoff_len: int = data(2048, "maximum tokens per example (longer ones are cut)", ge=1)
    image_max_pixels: Optional[int] = data(None, "vision-language models: at most this many pixels per image "
                                           "after resizing (unset: the model's preprocessor_config.json)", ge=1)
    image_min_pixels: Optional[int] = data(None, "vision-language models: at least this many pixels per image "
                                           "after resizing (unset: the model's preprocessor_config.json)", ge=1)
    max_samples: Optional[int] = data(None, "use only the first N examples of each dataset", ge=1,
                                      hint="leave it unset for all examples")
    val_size: float = data(0.0, "examples held out for evaluation: a fraction in [0, 1) or a count", ge=0)
    packing: Optional[bool] = data(None, "pack examples into cutoff_len-token sequences (unset: true for "
                                   "stage pt, false otherwise)", show_default="true for pt, else false")
    neat_packing: bool = data(False, "pack without attention across examples")
    padding_free: bool = data(True, "pack each micro-batch into segments where that is exact (no padding work)")
    train_on_prompt: bool = data(False, "compute the loss on the prompt tokens too")
    mask_history: bool = data(False, "train on the last turn of a conversation only")
    overwrite_cache: bool = data(False, "re-encode the datasets even when a cached encoding exists")
    tool_format: Optional[str] = data(None, "tool-call format of the template (e.g. default, qwen)")
    data_cache_dir: Optional[str] = data(None, "folder of the encoded-dataset cache")

    # -- training loop ---------------------------------------------------------------------------------
    stage: str = train("sft", "what to train: pt (pre-training), sft, rm (reward model), dpo, kto, ppo, grpo",
                       choices=STAGES, value_aliases=STAGE_ALIASES,
                       hint="the seed's 'pretrain' means pt and 'rlhf' means ppo")
    do_train: bool = train(True, "train (false: only evaluate or predict)")
    do_eval: bool = train(False, "evaluate on the evaluation data after training")
    do_predict: bool = train(False, "write predictions for the evaluation data")
    predict_with_generate: bool = train(False, "do_predict generates answers (else scores the references)")
    output_dir: Optional[str] = train(None, "folder for the adapter or model, logs and checkpoints")
    overwrite_output_dir: bool = train(False, "replace an earlier run's files in output_dir")
    per_device_train_batch_size: int = train(1, "examples per micro-batch on each device", ge=1)
    per_device_eval_batch_size: int = train(1, "examples per evaluation batch on each device", ge=1)
    gradient_accumulation_steps: int = train(1, "micro-batches per optimizer step", ge=1)
    learning_rate: float = train(5e-5, "peak learning rate of AdamW", ge=0)
    weight_decay: float = train(0.0, "AdamW weight decay (matrices only)", ge=0)
    adam_beta1: float = train(0.9, "AdamW beta1", ge=0, lt=1, hint="use a value such as 0.9")
    adam_beta2: float = train(0.999, "AdamW beta2", ge=0, lt=1, hint="use a value such as 0.999")
    adam_epsilon: float = train(1e-8, "AdamW epsilon", gt=0, hint="use a small positive value such as 1e-8")
    optim: str = train("adamw_torch", "optimizer (llmtune uses torch AdamW)", choices=("adamw_torch",
                                                                                      "adamw_torch_fused"))
    max_grad_norm: float = train(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    num_train_epochs: float = train(3.0, "passes over the training data (max_steps overrides)", ge=0)
    max_steps: int = train(-1, "optimizer steps to run; -1 = from num_train_epochs")
    lr_scheduler_type: str = train("linear", "learning-rate schedule after warm-up", choices=SCHEDULERS)
    warmup_ratio: float = train(0.0, "warm-up as a fraction of all steps", ge=0, le=1)
    warmup_steps: int = train(0, "warm-up steps (overrides warmup_ratio when > 0)", ge=0)
    logging_steps: float = train(10, "log every N steps (a value in (0, 1): that fraction of all steps)", gt=0)
    save_strategy: str = train("steps", "when to save checkpoints", choices=STRATEGIES)
    save_steps: float = train(500, "save a checkpoint every N steps (save_strategy steps; a value in (0, 1): "
                                   "that fraction of all steps)")
    save_total_limit: Optional[int] = train(None, "keep at most N checkpoints (the best is always kept)")
    save_only_model: bool = train(False, "checkpoints without optimizer state (cannot resume exactly)")
    eval_strategy: str = train("no", "when to evaluate", choices=STRATEGIES)
    eval_steps: Optional[float] = train(None, "evaluate every N steps (unset: logging_steps; a value in (0, 1): "
                                        "that fraction of all steps)", gt=0)
    load_best_model_at_end: bool = train(False, "finish with the checkpoint of the best evaluation metric")
    metric_for_best_model: Optional[str] = train(None, "metric for load_best_model_at_end (default eval_loss)")
    greater_is_better: Optional[bool] = train(None, "whether a larger metric is better (default: false for "
                                              "losses)")
    bf16: bool = train(False, "bfloat16 mixed precision")
    fp16: bool = train(False, "float16 mixed precision (bfloat16 on a CPU, which is faster there)")
    gradient_checkpointing: bool = train(False, "recompute activations in backward to save memory")
    offload_activations: bool = train(False, "gradient checkpointing whose kept layer inputs wait in pinned CPU "
                                      "memory (CUDA; implies gradient_checkpointing; no effect on a CPU)")
    torch_compile: bool = train(False, "compile each decoder layer once (regional torch.compile, dynamic lengths)")
    seed: int = train(42, "random seed (data order, initialisation, sampling)", ge=0, lt=2**64,
                      hint="torch seeds are unsigned 64-bit integers")
    report_to: str = train("none", "loggers besides trainer_log.jsonl (comma list)", choices=REPORT_TO,
                           multi=True)
    plot_loss: bool = train(False, "write training_loss.png at the end")
    resume_from_checkpoint: Optional[str] = train(None, "a checkpoint folder, or true for the last one in "
                                                  "output_dir")
    disable_tqdm: bool = train(False, "no progress bar")
    nonfinite_policy: str = train("stop", "a step with a non-finite loss or gradient norm stops the run, or is "
                                  "skipped", choices=("stop", "skip"))
    push_to_hub: bool = train(False, "at the end, upload output_dir (checkpoints left out) to the Hugging Face "
                              "Hub repo hub_model_id with huggingface_hub's upload_folder (needs a Hub token)")
    hub_model_id: Optional[str] = train(None, "the Hub repo push_to_hub uploads to (owner/name, or name in your "
                                        "own namespace); created if missing")

    # -- distributed ---------------------------------------------------------------------------------
    fsdp: Optional[str] = dist(None, "FSDP2 sharding (full, LoRA, QLoRA): full_shard, shard_grad_op, offload, "
                               "auto_wrap (space-separated); unset = DDP", choices=FSDP_TOKENS, multi=True)
    ddp_timeout: int = dist(1800, "seconds to wait for the other ranks", gt=0)
    deepspeed: Optional[str] = dist(None, "a DeepSpeed config (LLaMA-Factory's key): llmtune shards with FSDP2 "
                                    "instead, its ZeRO stage sets fsdp when fsdp is unset (3: full_shard, 2: "
                                    "shard_grad_op, offload_*: + offload, 0/1: DDP), with a notice")

    # -- preference ----------------------------------------------------------------------------------
    pref_beta: float = pref(0.1, "beta of the preference loss (DPO's KL strength, KTO's, ORPO's lambda)", gt=0,
                            hint="a usual value is 0.1")
    pref_loss: str = pref("sigmoid", "dpo loss: sigmoid (DPO), hinge, ipo, kto_pair, orpo, simpo",
                          choices=PREF_LOSSES)
    pref_ftx: float = pref(0.0, "weight of an SFT loss on the chosen answers", ge=0)
    dpo_label_smoothing: float = pref(0.0, "conservative DPO: probability that a label is flipped", ge=0, lt=0.5)
    simpo_gamma: float = pref(0.5, "SimPO target reward margin", ge=0)
    kto_chosen_weight: float = pref(1.0, "KTO weight of desirable examples", ge=0)
    kto_rejected_weight: float = pref(1.0, "KTO weight of undesirable examples", ge=0)
    kto_alpha: Optional[float] = pref(None, "dpo: weight of the NLL on plain SFT examples mixed into the "
                                      "dataset (the seed's knowledge-constrained DPO)", ge=0)
    ref_model: Optional[str] = pref(None, "reference model (unset: the policy with adapters off, or a frozen "
                                    "copy)")
    ref_model_adapters: Optional[str] = pref(None, "adapters of ref_model")

    # -- online RL (ppo, grpo) -------------------------------------------------------------------------
    reward_model: Optional[str] = rl(None, "ppo: the output_dir of an rm run")
    reward_model_adapters: Optional[str] = rl(None, "ppo: adapters of reward_model")
    reward_model_type: str = rl("lora", "ppo: lora (the rm adapter on the policy's weights) or full (a "
                                "separate model)", choices=("lora", "full"))
    ppo_buffer_size: int = rl(1, "ppo: mini-batches of rollouts per PPO update", ge=1)
    ppo_epochs: int = rl(4, "ppo: optimisation epochs per batch of rollouts", ge=1)
    ppo_score_norm: bool = rl(False, "ppo: normalise rewards with running moments")
    ppo_target: Optional[float] = rl(None, "ppo: target KL of the adaptive KL controller (unset: fixed)", gt=0)
    ppo_whiten_rewards: bool = rl(False, "ppo: whiten the rewards of each batch")
    ppo_clip_ratio: float = rl(0.2, "ppo: policy clip range", gt=0)
    ppo_value_clip: float = rl(0.2, "ppo: value clip range", gt=0)
    ppo_kl_coeff: float = rl(0.05, "ppo: initial KL penalty coefficient", ge=0)
    ppo_gamma: float = rl(1.0, "ppo: discount factor", ge=0, le=1)
    ppo_lam: float = rl(0.95, "ppo: GAE lambda", ge=0, le=1)
    ppo_vf_coef: float = rl(0.1, "ppo: weight of the value loss", ge=0)
    reward_funcs: Optional[str] = rl(None, "grpo: reward functions, comma list of path/file.py:fn, pkg.mod:fn, "
                                     "built-in names or an rm output folder")
    reward_weights: Optional[str] = rl(None, "grpo: weights of reward_funcs, comma list of numbers (unset: 1 "
                                       "each)")
    num_generations: int = rl(8, "grpo: completions sampled per prompt (the group)", ge=1)
    beta: float = rl(0.0, "grpo: KL coefficient (0 = no reference model)", ge=0)
    epsilon: float = rl(0.2, "grpo: lower clip range of the importance ratio", gt=0)
    epsilon_high: Optional[float] = rl(None, "grpo: upper clip range (unset: epsilon)", gt=0)
    loss_type: str = rl("dapo", "grpo: loss normalisation", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    importance_sampling_level: str = rl("token", "grpo: importance ratio per token or per sequence",
                                        choices=("token", "sequence"))
    scale_rewards: str = rl("group", "grpo: divide advantages by the reward std of the group, the batch, or not",
                            choices=("group", "batch", "none"), value_aliases={"true": "group", "false": "none"})
    num_iterations: int = rl(1, "grpo: optimisation passes per batch of completions", ge=1)
    mask_truncated_completions: bool = rl(False, "grpo: leave completions cut by max_new_tokens out of the loss")
    max_tokens_per_micro_batch: Optional[int] = rl(None, "grpo: most prompt + completion tokens in one micro-batch "
                                                   "(larger ones are split; unset = no limit)", ge=1)
    use_vllm: bool = rl(False, "TRL's key: grpo/ppo rollouts always run on llmtune's own engine (KV cache, rows "
                        "joining and leaving); true gets a notice")
    tools: Optional[str] = rl(None, "grpo: functions the policy may call in rollouts, comma list of "
                              "path/file.py:fn or pkg.mod:fn (schemas from signatures and docstrings)")
    max_tool_turns: int = rl(2, "grpo: most tool-calling turns per completion (0 = tools described but never run)",
                             ge=0)
    tool_timeout: float = rl(5.0, "grpo: seconds a tool call may run before the model gets a timeout error",
                             gt=0, hint="e.g. 5")

    # -- generation ----------------------------------------------------------------------------------
    do_sample: bool = gen(True, "sample (false: greedy decoding)")
    temperature: float = gen(0.95, "sampling temperature (> 0 when do_sample)", ge=0,
                             hint="for greedy decoding set do_sample false")
    top_p: float = gen(0.7, "nucleus sampling: keep the smallest token set of this probability", gt=0, le=1)
    top_k: int = gen(50, "sample among the k most likely tokens (0 = all)", ge=0)
    max_new_tokens: int = gen(512, "most tokens generated per answer (grpo: max_completion_length)", ge=0)
    repetition_penalty: float = gen(1.0, "penalty on tokens already generated (1 = none)", gt=0)
    infer_backend: str = gen("huggingface", "LLaMA-Factory's generation engine choice: llmtune always generates "
                             "with its own engine (chat, predict, api, rollouts); vllm and sglang get a notice",
                             choices=("huggingface", "vllm", "sglang"), value_aliases={"hf": "huggingface"})

    # -- chat ------------------------------------------------------------------------------------------
    system: Optional[str] = chat(None, "system prompt of the conversation (unset: default_system)")
    history: bool = chat(False, "piped input: keep one conversation across lines (else each line is a new "
                         "question)")

    # -- export ----------------------------------------------------------------------------------------
    export_dir: Optional[str] = export(None, "folder (or .gguf file) to write the merged model to")
    export_size: float = export(5.0, "shard size of the exported safetensors, in GB", gt=0,
                                hint="e.g. 2 or 0.5; it is not a bit width")
    export_legacy_format: bool = export(False, "pickled .bin files (refused: llmtune writes safetensors)")
    export_quantization_bit: Optional[int] = export(None, "write 4-bit (bitsandbytes NF4) safetensors",
                                                    choices=(4,), hint="--export_size is the shard size in GB, "
                                                    "not a bit width")
    export_format: str = export("safetensors", "safetensors (a Hugging Face folder) or gguf",
                                choices=("safetensors", "gguf"))
    gguf_type: str = export("f16", "tensor type of a GGUF export", choices=GGUF_TYPES)
    overwrite_export_dir: bool = export(False, "replace files an earlier export wrote in export_dir")

    # -- bookkeeping (not a user key) ------------------------------------------------------------------
    _explicit: set = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        build(self)

    def to_dict(self) -> dict[str, Any]:
        """All user-visible keys and values (for ``training_args.yaml``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def is_set(self, key: str) -> bool:
        """Whether ``key`` was given by the user (YAML, flag or dict) rather than defaulted."""
        return key in self._explicit

    def replace(self, **changes: Any) -> "TrainConfig":
        """A new, re-checked config with ``changes`` applied (they count as set by the user).

        Raises: :class:`llmtune.errors.LLMTuneError` for a bad value, as when building.
        """
        unknown = [k for k in changes if k not in KEYS]
        if unknown:
            from llmtune.errors import LLMTuneError, nearest

            raise LLMTuneError(f"unknown key {unknown[0]!r}." + nearest(unknown[0], list(KEYS)))
        explicit = set(self._explicit) | set(changes)
        for derived in DERIVED:   # computed from other keys: computed again unless the user set them
            if derived not in changes and not self.is_set(derived):
                changes[derived] = None
        return dataclasses.replace(self, **changes, _explicit=explicit)


#: keys whose unset value is computed from others when the config is built
DERIVED = ("packing",)

#: every user key -> its dataclass field
KEYS: dict[str, dataclasses.Field] = user_fields(TrainConfig)
#: every user key -> its annotated type (``Optional[int]`` etc.)
TYPES: dict[str, Any] = field_types(TrainConfig)

#: seed-document and LLaMA-Factory/TRL spellings -> our key
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
    "tokenized_path": "data_cache_dir",
    "max_completion_length": "max_new_tokens",
    "max_tool_calling_iterations": "max_tool_turns",   # TRL's GRPOConfig name
    "use_unsloth_gc": "offload_activations",    # Unsloth's gradient checkpointing = offloaded checkpointing
}

#: why some ignored keys change nothing here (appended to their notice)
IGNORED_WHY = {
    "enable_liger_kernel": ": what Liger's kernels fuse is built in (RMSNorm, RoPE and SwiGLU kernels on CUDA, "
                           "see use_kernels; a chunked loss that never stores the logits; tiled MLP and "
                           "offload_activations for long context)",
}

#: LLaMA-Factory / transformers keys accepted with a notice because they change nothing here
IGNORED_KEYS = {
    "preprocessing_num_workers", "trust_remote_code", "dataloader_num_workers",
    "ddp_find_unused_parameters", "use_fast_tokenizer", "enable_liger_kernel", "use_unsloth",
    "upcast_layernorm", "upcast_lmhead_output", "use_cache", "low_cpu_mem_usage", "split_special_tokens",
    "new_special_tokens", "model_revision", "hf_hub_token", "ms_hub_token", "om_hub_token",
    "print_param_status", "include_num_input_tokens_seen", "streaming", "buffer_size", "mix_strategy",
    "interleave_probs", "preprocessing_batch_size", "dataloader_pin_memory", "remove_unused_columns",
    "logging_dir", "run_name", "ddp_backend", "local_rank",
    "tf32", "disable_gradient_checkpointing", "use_reentrant_gc", "shift_attn", "rope_scaling",
    "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager",
    "save_safetensors", "ignore_pad_token_for_loss", "log_level", "logging_first_step", "eval_on_start",
    "dataloader_persistent_workers", "use_llama_pro", "pissa_init", "pissa_convert", "pissa_iter",
    "export_device", "export_hub_model_id", "adapter_folder", "offload_folder",
}
