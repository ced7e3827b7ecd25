"""Model configuration: one dataclass that names every architecture difference we support.

Built from a Hugging Face ``config.json`` (the format written by ``transformers``'
``PretrainedConfig.save_pretrained``); field names are the Hugging Face ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.errors import LLMTuneError

#: architectures (``config.json: architectures[0]``) -> family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3).

    Attributes follow Hugging Face ``config.json`` names. Family differences:

    * ``attention_bias``: bias on q/k/v/o projections (Llama option). Qwen2 has bias on q/k/v only,
      expressed as ``qkv_bias=True, attention_bias=False``.
    * ``qk_norm``: Qwen3's per-head RMSNorm of q and k before RoPE.
    * ``tie_word_embeddings``: ``lm_head.weight`` is ``model.embed_tokens.weight``.
    * ``rope_scaling``: ``None`` or a dict with ``rope_type`` in ``default``, ``linear``, ``llama3``.
    * ``sliding_window``: Mistral's attention window in tokens (``None`` = full causal attention).
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
    #: the original config.json dict (kept so export can write it back with few changes)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise LLMTuneError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def family(self) -> str:
        """``llama``, ``mistral``, ``qwen2`` or ``qwen3``."""
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict.

        Raises:
            LLMTuneError: the architecture is not one of :data:`SUPPORTED_ARCHITECTURES`, or a
                required key is missing.
        """
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _MODEL_TYPES.get(cfg.get("model_type", ""), "")
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
        elif family in ("llama", "qwen3"):
            kw["attention_bias"] = bool(cfg.get("attention_bias", False))
            kw["mlp_bias"] = bool(cfg.get("mlp_bias", False))
        if family == "qwen3":
            kw["qk_norm"] = True
        if family == "mistral":
            kw["sliding_window"] = cfg.get("sliding_window")
        if family == "qwen2" and cfg.get("use_sliding_window"):
            kw["sliding_window"] = cfg.get("sliding_window")
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
        """A Hugging Face ``config.json`` dict for this architecture (starting from ``raw``)."""
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
        if model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
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
