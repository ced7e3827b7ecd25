"""Model configuration: one dataclass that names every architecture difference we support.

Built from a Hugging Face ``config.json`` (the format written by ``transformers``'
``PretrainedConfig.save_pretrained``); field names are the Hugging Face ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from llmtune.errors import LLMTuneError

#: architectures (``config.json: architectures[0]``) -> family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
#: vision-language architectures -> family (:mod:`llmtune.models.qwen_vl`; the language model is Qwen2 / Qwen3)
VL_ARCHITECTURES = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
                    "Qwen3VLForConditionalGeneration": "qwen3_vl"}
_VL_MODEL_TYPES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                   "qwen3_vl": "Qwen3VLForConditionalGeneration"}
#: the mixture-of-experts keys of Qwen2-MoE / Qwen3-MoE ``config.json`` (Hugging Face names)
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3, and the
    Qwen2-MoE / Qwen3-MoE mixtures of experts).

    Attributes follow Hugging Face ``config.json`` names. Family differences:

    * ``attention_bias``: bias on q/k/v/o projections (Llama option). Qwen2 has bias on q/k/v only,
      expressed as ``qkv_bias=True, attention_bias=False``.
    * ``qk_norm``: Qwen3's per-head RMSNorm of q and k before RoPE.
    * ``tie_word_embeddings``: ``lm_head.weight`` is ``model.embed_tokens.weight``.
    * ``rope_scaling``: ``None`` or a dict with ``rope_type`` in ``default``, ``linear``, ``llama3``.
    * ``sliding_window``: Mistral's attention window in tokens (``None`` = full causal attention).
    * Mixture of experts (``num_experts > 0``; :mod:`llmtune.models.moe`): layer ``i`` has a sparse MoE block
      instead of the dense MLP when ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``; each
      token goes to ``num_experts_per_tok`` of ``num_experts`` SwiGLU experts of width
      ``moe_intermediate_size`` (softmax routing, renormalised over the chosen ones when ``norm_topk_prob``);
      ``shared_expert_intermediate_size > 0`` adds Qwen2-MoE's always-on shared expert with its sigmoid gate.
      ``router_aux_loss_coef`` weighs the load-balancing loss in training.
    """

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    #: vision-language models only (else None): ``family``, ``architecture``, ``vision_config`` (the dict),
    #: ``mrope_section``, ``image_token_id``, ``video_token_id``, ``vision_start_token_id``,
    #: ``vision_end_token_id``; ``architecture`` above is then the language model's (Qwen2/Qwen3ForCausalLM)
    vision: dict | None = None
    #: the original config.json dict (kept so export can write it back with few changes)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise LLMTuneError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts:
            if self.moe_intermediate_size is None:
                self.moe_intermediate_size = self.intermediate_size
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise LLMTuneError(f"config: num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 "
                                   f"and num_experts ({self.num_experts})")
            if self.decoder_sparse_step < 1:
                raise LLMTuneError(f"config: decoder_sparse_step ({self.decoder_sparse_step}) must be >= 1")

    @property
    def family(self) -> str:
        """``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``qwen2_moe`` or ``qwen3_moe``."""
        return SUPPORTED_ARCHITECTURES[self.architecture]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True when decoder layer ``layer_idx`` has a sparse MoE block (Qwen2-MoE / Qwen3-MoE rule:
        ``num_experts > 0``, ``layer_idx`` not in ``mlp_only_layers`` and ``(layer_idx + 1) %
        decoder_sparse_step == 0``), False for a dense MLP."""
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict.

        Raises:
            LLMTuneError: the architecture is not one of :data:`SUPPORTED_ARCHITECTURES`, or a
                required key is missing.
        """
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _MODEL_TYPES.get(cfg.get("model_type", ""), "")
        arch = arch or _VL_MODEL_TYPES.get(cfg.get("model_type", ""), "")
        if arch in VL_ARCHITECTURES:
            return _vl_config(cls, cfg, arch, source)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LLMTuneError(
                f"{source}: unsupported architecture {arch or cfg.get('model_type')!r}; llmtune supports "
                + ", ".join(SUPPORTED_ARCHITECTURES))
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            kw: dict[str, Any] = dict(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
            )
        except KeyError as e:
            raise LLMTuneError(f"{source}: missing key {e.args[0]!r}") from None
        kw["num_key_value_heads"] = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        for key in ("head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "torch_dtype",
                    "bos_token_id", "eos_token_id", "pad_token_id"):
            if cfg.get(key) is not None:
                kw[key] = cfg[key]
        if kw.get("torch_dtype") is None and cfg.get("dtype") is not None:
            kw["torch_dtype"] = cfg["dtype"]
        rope_params = cfg.get("rope_parameters") or {}
        kw["rope_theta"] = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        scaling = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default"
                                              else None)
        if scaling:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] not in ("default", "linear", "llama3"):
                raise LLMTuneError(f"{source}: rope_scaling type {scaling['rope_type']!r} is not supported "
                                   "(supported: default, linear, llama3)")
            if scaling["rope_type"] == "default":
                scaling = None
        kw["rope_scaling"] = scaling
        kw["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", family in ()))
        if family == "qwen2":
            kw["qkv_bias"] = True
        elif family == "qwen2_moe":
            kw["qkv_bias"] = bool(cfg.get("qkv_bias", True))
        elif family in ("llama", "qwen3", "qwen3_moe"):
            kw["attention_bias"] = bool(cfg.get("attention_bias", False))
            kw["mlp_bias"] = bool(cfg.get("mlp_bias", False)) and family != "qwen3_moe"
        if family in ("qwen3", "qwen3_moe"):
            kw["qk_norm"] = True
        if family == "mistral":
            kw["sliding_window"] = cfg.get("sliding_window")
        if family in ("qwen2", "qwen2_moe") and cfg.get("use_sliding_window"):
            kw["sliding_window"] = cfg.get("sliding_window")
        if family in ("qwen2_moe", "qwen3_moe"):
            kw.update(_moe_kwargs(cfg, family, source))
        hidden_act = kw.get("hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise LLMTuneError(f"{source}: hidden_act {hidden_act!r} is not supported (only silu)")
        return cls(**kw, raw=dict(cfg))

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` at ``path``; raises :class:`LLMTuneError` on a missing or malformed file."""
        path = Path(path)
        try:
            from llmtune.fileio import read_text

            cfg = json.loads(read_text(path, "config.json", "re-save it as UTF-8 (or copy it again from the model)"))
        except FileNotFoundError:
            raise LLMTuneError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise LLMTuneError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(cfg, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict for this architecture (starting from ``raw``; a vision-language
        model's ``raw`` unchanged)."""
        if self.vision:
            return dict(self.raw)
        out = dict(self.raw)
        model_type = self.family
        out.update(
            architectures=[self.architecture], model_type=model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if model_type in ("llama", "qwen3", "qwen3_moe"):
            out["attention_bias"] = self.attention_bias
        if model_type == "qwen2_moe":
            out["qkv_bias"] = self.qkv_bias
        if model_type in ("qwen2_moe", "qwen3_moe"):
            out.update({k: getattr(self, k) for k in MOE_KEYS})
            out["mlp_only_layers"] = list(self.mlp_only_layers)
            out.pop("num_local_experts", None)
            if model_type == "qwen3_moe":
                out.pop("shared_expert_intermediate_size")
        if model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if model_type == "mistral" or self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.pop("rope_parameters", None)
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def _moe_kwargs(cfg: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    """The :class:`ModelConfig` MoE fields from a ``qwen2_moe`` / ``qwen3_moe`` ``config.json`` dict.

    Defaults where a key is absent are transformers' ``Qwen2MoeConfig`` / ``Qwen3MoeConfig`` defaults.

    Raises:
        LLMTuneError: ``num_experts`` or ``moe_intermediate_size`` missing, or ``mlp_only_layers`` not a list.
    """
    out: dict[str, Any] = {}
    cfg = dict(cfg)
    if cfg.get("num_experts") is None and cfg.get("num_local_experts") is not None:
        cfg["num_experts"] = cfg["num_local_experts"]  # transformers 5 writes Qwen3-MoE's count under this name
    for key in ("num_experts", "moe_intermediate_size"):
        if cfg.get(key) is None:
            raise LLMTuneError(f"{source}: missing key {key!r} (required for model_type {family})")
        out[key] = int(cfg[key])
    out["num_experts_per_tok"] = int(cfg.get("num_experts_per_tok") or (4 if family == "qwen2_moe" else 8))
    out["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    out["decoder_sparse_step"] = int(cfg.get("decoder_sparse_step") or 1)
    layers = cfg.get("mlp_only_layers") or []
    if not isinstance(layers, list):
        raise LLMTuneError(f"{source}: mlp_only_layers must be a list of layer indices, got {layers!r}")
    out["mlp_only_layers"] = [int(i) for i in layers]
    coef = cfg.get("router_aux_loss_coef")
    out["router_aux_loss_coef"] = 0.001 if coef is None else float(coef)
    if family == "qwen2_moe":
        shared = cfg.get("shared_expert_intermediate_size")
        out["shared_expert_intermediate_size"] = 5632 if shared is None else int(shared)
    return out


def _vl_config(cls, cfg: dict[str, Any], arch: str, source: str) -> "ModelConfig":
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``config.json`` dict -> :class:`ModelConfig` of its language model
    with ``vision`` set. Text keys are read from ``text_config`` (transformers >= 4.52 and Qwen3-VL) or from
    the top level (the original Qwen2-VL / Qwen2.5-VL files); ``mrope_section`` from ``rope_scaling`` or
    ``rope_parameters``.

    Raises:
        LLMTuneError: no ``vision_config``, no ``mrope_section``, or ``mrope_section`` not summing to
            ``head_dim / 2``.
    """
    family = VL_ARCHITECTURES[arch]
    sub = cfg.get("text_config") or {}
    text = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    text.update(sub)
    rope = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    section = rope.get("mrope_section")
    if not isinstance(cfg.get("vision_config"), dict):
        raise LLMTuneError(f"{source}: {arch} needs a vision_config section; the file is incomplete")
    if not section:
        raise LLMTuneError(f"{source}: {arch} needs rope_scaling.mrope_section (multimodal RoPE split of the "
                           "rotary frequencies into temporal, height and width parts)")
    # absent keys: transformers' Qwen2VLTextConfig / Qwen2_5_VLTextConfig / Qwen3VLTextConfig defaults
    qwen3 = family == "qwen3_vl"
    text.setdefault("rms_norm_eps", 1e-6 if qwen3 else 1e-5)
    text.setdefault("max_position_embeddings", 128000 if qwen3 else 32768)
    text.update(architectures=["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"],
                rope_scaling=None, rope_parameters=None,
                rope_theta=rope.get("rope_theta") or text.get("rope_theta") or (5e5 if qwen3 else 1e6),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings") or sub.get("tie_word_embeddings")))
    base = cls.from_hf_dict(text, source)
    if sum(section) * 2 != base.head_dim:
        raise LLMTuneError(f"{source}: mrope_section {section} must sum to head_dim / 2 = {base.head_dim // 2}")
    ids = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653}
    vision = dict(family=family, architecture=arch, vision_config=dict(cfg["vision_config"]),
                  mrope_section=[int(s) for s in section],
                  **{k: int(cfg[k] if cfg.get(k) is not None else v) for k, v in ids.items()})
    return dataclasses.replace(base, vision=vision, raw=dict(cfg))


@dataclass
class CheckpointSource:
    """A checkpoint ready to stream into a model: what one source format (a GGUF file,
    :func:`llmtune.models.gguf.gguf_source`; a model folder, :func:`llmtune.models.folder.folder_source`) gives
    :func:`llmtune.models.loader.load_model`, which builds the :class:`ModelConfig` and the model from it.

    Attributes:
        hf_config: the model's Hugging Face ``config.json`` dict (for GGUF: mapped from its metadata).
        config_name: where ``hf_config`` came from, named in config errors (``.../config.json``, the ``.gguf``).
        shapes: Hugging Face tensor name -> ``(shape, file)`` for every tensor the checkpoint holds.
        tensors: ``() -> iterator of (name, CPU tensor)``, one tensor at a time (the loader casts it).
        name: the source named in error messages (the folder or file).
        placer: for a pre-quantized bitsandbytes 4-bit checkpoint, ``(model, dtype) -> placer`` whose
            ``place(name, tensor)`` takes the packed tensors and ``finish()`` builds the 4-bit layers; else None.
        release: called once the tensors are loaded (drops cached readers), or None.
        mapped: ``(dtype) -> iterator`` like ``tensors``, where tensors already of ``dtype`` may come as views of
            a copy-on-write memory map of the checkpoint (no copy; the loader keeps them as they are), or None.
    """

    hf_config: dict[str, Any]
    config_name: str
    shapes: dict[str, tuple[tuple[int, ...], Path]]
    tensors: Callable[[], Iterator[tuple[str, Any]]]
    name: str
    placer: Optional[Callable[[Any, Any], Any]] = None
    release: Optional[Callable[[], None]] = None
    mapped: Optional[Callable[[Any], Iterator[tuple[str, Any]]]] = None
