"""Import of llama-architecture GGUF files (llama.cpp's format) as a Hugging Face config and tensors.

Source: the GGUF specification (ggml ``docs/gguf.md``: header, metadata key/value pairs, tensor infos)
and llama.cpp's ``convert_hf_to_gguf.py`` (tensor names, and the q/k row permutation it applies for its
RoPE layout, undone here). Files are read with the ``gguf`` package (``GGUFReader``, memory-mapped) and
dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x, K-quants, ...), one
tensor at a time, so peak memory is the final model plus one float32 tensor.

Public API: :func:`gguf_config`, :func:`iter_gguf_tensors`, :func:`gguf_tensor_names`,
:func:`read_gguf_metadata`, :func:`reverse_permute`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llmtune.errors import LLMTuneError
from llmtune.models.config import CheckpointSource

#: GGUF ``general.architecture`` values we import (llama.cpp writes Llama, Mistral and SmolLM as "llama";
#: Qwen's mixtures of experts as "qwen2moe" / "qwen3moe").
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2moe", "qwen3moe")

#: GGUF MoE architecture -> (Hugging Face architecture, model_type, llama.cpp's fixed ``norm_topk_prob``).
MOE_GGUF_ARCHITECTURES = {"qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe", False),
                          "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe", True)}
#: ``{arch}.<key>`` -> Hugging Face config key, for the MoE architectures (llama.cpp's ``LLM_KV_*`` names).
_MOE_CONFIG_KEYS = {
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "attention.key_length": "head_dim",
}

#: ``{arch}.<key>`` -> Hugging Face config key.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}

#: GGUF tensor name (after ``blk.N.``) -> Hugging Face name (after ``model.layers.N.``).
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
#: MoE tensors (gguf ``MODEL_TENSORS[QWEN2MOE / QWEN3MOE]``) and Qwen3's q/k norms, after ``blk.N.``.
MOE_LAYER_TENSORS = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
#: stacked expert tensors ``(num_experts, out, in)`` -> the per-expert projection name.
EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
#: tensors llama.cpp adds that have no Hugging Face parameter (rope_freqs: see :func:`gguf_config`).
_SKIPPED_TENSORS = {"rope_freqs.weight"}
#: rows dequantized at once (keeps temporaries of the 49k-row embedding small).
_CHUNK_ROWS = 4096
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
#: both per-layer tables in one (their keys are disjoint), for :func:`map_tensor_name`.
_ALL_LAYER_TENSORS = {**LAYER_TENSORS, **MOE_LAYER_TENSORS}


def _reader(path: str | Path):
    """A (cached) GGUF reader for ``path`` (:class:`llmtune.models.gguf_fast.FastGGUFReader`, the interface of
    ``gguf.GGUFReader`` that llmtune uses); the loader and the tokenizer share one reader per file version."""
    path = Path(path)
    if not path.is_file():
        raise LLMTuneError(f"{path}: no such GGUF file")
    st = path.stat()
    return _cached_reader(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    from llmtune.models.gguf_fast import FastGGUFReader

    try:
        return FastGGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/struct.error/... on corrupt files
        raise LLMTuneError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                           "re-download it or convert the model again with llama.cpp") from None


def release_readers() -> None:
    """Drop the cached GGUF readers (their parsed metadata holds ~150 MB for a 49k-token vocabulary)."""
    _cached_reader.cache_clear()


def _field_value(field) -> Any:
    """A GGUF metadata field as a Python value (str, int, float, bool or list)."""
    return field.contents()


def read_gguf_metadata(path: str | Path, skip_arrays: bool = True) -> dict[str, Any]:
    """All metadata key/value pairs of a GGUF file as Python values.

    Args:
        path: the ``.gguf`` file.
        skip_arrays: leave out the large tokenizer arrays (``tokenizer.ggml.tokens``, ``merges``,
            ``token_type``, ``scores``), which are only needed to build a tokenizer.

    Raises:
        LLMTuneError: the file is missing or not a readable GGUF file.
    """
    reader = _reader(path)
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
           "tokenizer.ggml.scores"}
    return {k: _field_value(f) for k, f in reader.fields.items()
            if not k.startswith("GGUF.") and not (skip_arrays and k in big)}


def gguf_tensor_names(path: str | Path) -> list[str]:
    """The tensor names stored in a GGUF file (llama.cpp names, e.g. ``blk.0.attn_q.weight``)."""
    return [t.name for t in _reader(path).tensors]


def _llama3_rope_scaling(rope_freqs: np.ndarray, config: dict) -> dict:
    """Recover Llama 3.1's ``rope_scaling`` from llama.cpp's ``rope_freqs`` tensor (per-band divisors).

    llama.cpp stores the Llama 3.1 frequency scaling as a ``(head_dim/2,)`` tensor of factors that divide
    the default inverse frequencies. We take ``factor = max(rope_freqs)`` and Llama 3.1's published
    ``low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192``, and check that they
    reproduce the tensor.

    Raises:
        LLMTuneError: the tensor is not reproduced by those parameters.
    """
    from llmtune.models.config import ModelConfig
    from llmtune.models.transformer import rope_inv_freq

    freqs = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    scaling = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = ModelConfig.from_hf_dict({**config, "rope_scaling": None}, source="gguf")
    scaled = ModelConfig.from_hf_dict({**config, "rope_scaling": scaling}, source="gguf")
    ratio = (rope_inv_freq(base) / rope_inv_freq(scaled)).double().numpy()
    if ratio.shape != freqs.shape or not np.allclose(ratio, freqs, rtol=1e-3):
        raise LLMTuneError("GGUF tensor rope_freqs.weight holds a RoPE frequency scaling that is not "
                           "Llama 3.1's; llmtune cannot import it (use the Hugging Face checkpoint instead)")
    return scaling


def gguf_config(path: str | Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict (LlamaForCausalLM, or Qwen2MoeForCausalLM / Qwen3MoeForCausalLM for
    ``qwen2moe`` / ``qwen3moe`` files, see :func:`_moe_config`) from a GGUF file's ``{arch}.*`` metadata.

    Mapping (as transformers' GGUF loader does): ``llama.context_length -> max_position_embeddings``,
    ``block_count -> num_hidden_layers``, ``feed_forward_length -> intermediate_size``,
    ``embedding_length -> hidden_size``, ``rope.dimension_count -> head_dim``,
    ``rope.freq_base -> rope_theta``, ``attention.head_count(_kv) -> num_(key_value_)heads``,
    ``attention.layer_norm_rms_epsilon -> rms_norm_eps``; ``tie_word_embeddings`` is true when the file
    has no ``output.weight``; ``bos/eos/pad_token_id`` come from ``tokenizer.ggml.*``; rope scaling from
    ``llama.rope.scaling.*`` (linear) or the ``rope_freqs`` tensor (Llama 3.1). MoE files add
    ``expert_count -> num_experts``, ``expert_used_count -> num_experts_per_tok``,
    ``expert_feed_forward_length -> moe_intermediate_size``, ``expert_shared_feed_forward_length ->
    shared_expert_intermediate_size``, ``attention.key_length -> head_dim``.

    Raises:
        LLMTuneError: missing/corrupt file, or ``general.architecture`` is not a supported one.
    """
    reader = _reader(path)
    meta = {k: f for k, f in reader.fields.items()}
    arch = _field_value(meta["general.architecture"]) if "general.architecture" in meta else None
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise LLMTuneError(
            f"{path}: GGUF architecture {arch!r} is not supported; llmtune imports GGUF files of "
            f"architecture {', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Llama, Mistral, SmolLM, Qwen2-MoE, "
            "Qwen3-MoE). For other models use the Hugging Face safetensors checkpoint")
    cfg: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                           "torch_dtype": "float32"}
    keys = dict(_CONFIG_KEYS)
    if arch in MOE_GGUF_ARCHITECTURES:
        keys.update(_MOE_CONFIG_KEYS)
    for key, hf_key in keys.items():
        if f"{arch}.{key}" in meta:
            cfg[hf_key] = _field_value(meta[f"{arch}.{key}"])
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in meta:
        cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"].data)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in cfg:
            raise LLMTuneError(f"{path}: GGUF metadata lacks {arch}.* key for {key}; the file is incomplete")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    names = {t.name for t in reader.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    if arch in MOE_GGUF_ARCHITECTURES:
        cfg.update(_moe_config(path, arch, meta, reader, cfg))
    for hf_key, gg in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gg}" in meta:
            cfg[hf_key] = int(_field_value(meta[f"tokenizer.ggml.{gg}"]))
    kind = _field_value(meta[f"{arch}.rope.scaling.type"]) if f"{arch}.rope.scaling.type" in meta else None
    if kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear",
                               "factor": float(_field_value(meta[f"{arch}.rope.scaling.factor"]))}
    elif kind not in (None, "none"):
        raise LLMTuneError(f"{path}: GGUF rope scaling type {kind!r} is not supported (supported: linear, "
                           "and Llama 3.1's rope_freqs)")
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        cfg["rope_scaling"] = _llama3_rope_scaling(_dequantize(t), cfg)
    return cfg


def _moe_config(path, arch: str, meta: dict, reader, cfg: dict) -> dict[str, Any]:
    """The Hugging Face keys of a ``qwen2moe`` / ``qwen3moe`` GGUF file beyond the llama ones.

    llama.cpp's Qwen MoE graphs put a sparse block in every layer (``decoder_sparse_step 1``, no
    ``mlp_only_layers``) and fix the top-k renormalisation (off for qwen2moe, on for qwen3moe) unless
    ``{arch}.expert_weights_norm`` says otherwise; q/k/v biases are present when the file holds them.

    Raises:
        LLMTuneError: ``expert_count`` / ``expert_feed_forward_length`` missing.
    """
    hf_arch, model_type, norm = MOE_GGUF_ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    out: dict[str, Any] = {"architectures": [hf_arch], "model_type": model_type, "decoder_sparse_step": 1,
                           "mlp_only_layers": []}
    for key in ("num_experts", "moe_intermediate_size"):
        if key not in cfg:
            raise LLMTuneError(f"{path}: GGUF metadata lacks the {arch}.* key for {key}; the file is incomplete")
    key = f"{arch}.expert_weights_norm"
    out["norm_topk_prob"] = bool(_field_value(meta[key])) if key in meta else norm
    cfg.setdefault("num_experts_per_tok", 1)
    if model_type == "qwen2_moe":
        out["qkv_bias"] = "blk.0.attn_q.bias" in names
        if "shared_expert_intermediate_size" not in cfg:
            shexp = next((t for t in reader.tensors if t.name.endswith(".ffn_up_shexp.weight")), None)
            out["shared_expert_intermediate_size"] = int(shexp.shape[-1]) if shexp is not None else 0
    else:
        out["attention_bias"] = "blk.0.attn_q.bias" in names
    return out


def gguf_source(path: Path) -> CheckpointSource:
    """A ``.gguf`` file as a checkpoint, read in one pass: its Hugging Face config (:func:`gguf_config`), every
    tensor's Hugging Face name and shape (:func:`hf_tensor_shapes`), the
    dequantizing tensor stream (:func:`iter_gguf_tensors`) and :func:`release_readers` for afterwards.

    Raises:
        LLMTuneError: a missing, corrupt or unsupported GGUF file (architecture, tensor type).
    """
    cfg_dict = gguf_config(path)
    shapes = {name: (shape, path) for name, shape in hf_tensor_shapes(path).items()}
    tensors = functools.partial(iter_gguf_tensors, path, cfg_dict)
    return CheckpointSource(cfg_dict, str(path), shapes, tensors, str(path), release=release_readers)


def hf_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter name -> shape for every weight of a GGUF file, as :func:`iter_gguf_tensors`
    yields them (a stacked ``ffn_*_exps`` tensor gives one ``mlp.experts.{e}.*_proj.weight`` per expert)."""
    out: dict[str, tuple[int, ...]] = {}
    for t in _reader(path).tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        m = _BLOCK.match(t.name)
        if m and m.group(2) in EXPERT_TENSORS:
            for e in range(shape[0]):
                out[f"model.layers.{m.group(1)}.mlp.experts.{e}.{EXPERT_TENSORS[m.group(2)]}.{m.group(3)}"] = shape[1:]
            continue
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            continue
        if hf.endswith("mlp.shared_expert_gate.weight") and len(shape) == 1:
            shape = (1,) + shape
        out[hf] = shape
    return out


def reverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``).

    llama.cpp reorders each head's rows from the rotate-half layout (first half, second half) to
    interleaved pairs: HF row ``(h, j, i)`` -> GGUF row ``(h, i, j)`` for ``j in {0, 1}`` (half),
    ``i < head_dim/2``. This maps back. ``w``: ``(n_head * head_dim, ...)``; ``n_head`` is the number of
    query heads for ``attn_q`` and of key/value heads for ``attn_k``. Returns a tensor of the same shape.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
    """One GGUF tensor as a float32 numpy array with the logical (row-major, HF) shape."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if t.tensor_type == Q.F32:
        arr = np.array(t.data, dtype=np.float32)
    elif t.tensor_type == Q.F16:
        arr = np.asarray(t.data).astype(np.float32)
    else:
        try:
            data = t.data
            if data.ndim == 2 and data.shape[0] > _CHUNK_ROWS:  # bound the dequantizer's temporaries
                first = quants.dequantize(data[:1], t.tensor_type)
                arr = np.empty((data.shape[0], first.shape[-1]), dtype=np.float32)
                for i in range(0, data.shape[0], _CHUNK_ROWS):
                    arr[i:i + _CHUNK_ROWS] = quants.dequantize(data[i:i + _CHUNK_ROWS], t.tensor_type)
            else:
                arr = quants.dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise LLMTuneError(f"GGUF tensor {t.name}: quantization type {t.tensor_type.name} cannot be "
                               "dequantized by the installed gguf package; upgrade it (pip install -U gguf)"
                               ) from None
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    return arr.reshape(shape).astype(np.float32, copy=False)


def gguf_to_hf_name(name: str) -> str | None:
    """Map a llama.cpp tensor name to the Hugging Face one (``None`` for tensors with no HF parameter).

    ``token_embd.weight -> model.embed_tokens.weight``, ``blk.N.attn_q.weight ->
    model.layers.N.self_attn.q_proj.weight``, ``output.weight -> lm_head.weight``, etc.

    Raises:
        LLMTuneError: an unknown tensor name.
    """
    if name in _SKIPPED_TENSORS:
        return None
    hf = map_tensor_name(name, _BLOCK, _ALL_LAYER_TENSORS, GLOBAL_TENSORS, "model.layers")
    if hf is None:
        raise LLMTuneError(f"GGUF tensor {name!r} has no counterpart in a Llama model; the file is not a "
                           "plain llama-architecture model")
    return hf


def map_tensor_name(name: str, block: re.Pattern, layer_names: dict[str, str], global_names: dict[str, str],
                    layer_prefix: str) -> str | None:
    """Rename a tensor between the llama.cpp and Hugging Face spellings with one direction's tables.

    ``name`` matching ``block`` (groups: layer index, module name, ``weight``/``bias``) with a module in
    ``layer_names`` becomes ``{layer_prefix}.{index}.{layer_names[module]}.{weight|bias}``; otherwise a name
    ``{base}.{suffix}`` with ``base`` in ``global_names`` becomes ``{global_names[base]}.{suffix}``. Used by
    :func:`gguf_to_hf_name` (the tables above) and ``gguf_writer.hf_to_gguf_name`` (their inverses).

    Returns:
        The new name, or ``None`` when neither table names the tensor.
    """
    m = block.match(name)
    if m and m.group(2) in layer_names:
        return f"{layer_prefix}.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    base, _, suffix = name.rpartition(".")
    return f"{global_names[base]}.{suffix}" if base in global_names else None


def iter_gguf_tensors(path: str | Path, config: dict[str, Any] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight of a llama GGUF file, one at a time.

    Each tensor is dequantized to float32 (``gguf.quants.dequantize``), shaped as the Hugging Face
    parameter (``(out_features, in_features)`` for linear weights) and, for ``attn_q``/``attn_k`` of the
    llama architecture, has llama.cpp's row permutation undone (:func:`reverse_permute`; the Qwen
    architectures use the rotate-half layout and are not permuted). A stacked expert tensor
    ``ffn_{gate,up,down}_exps`` ``(num_experts, out, in)`` is yielded as one ``mlp.experts.{e}.*_proj.weight``
    per expert; ``ffn_gate_inp_shexp`` ``(hidden,)`` as ``mlp.shared_expert_gate.weight`` ``(1, hidden)``.
    The caller casts it.

    Args:
        path: the ``.gguf`` file.
        config: the dict from :func:`gguf_config` (read again when omitted).

    Raises:
        LLMTuneError: missing/corrupt/unsupported file or tensor type.
    """
    config = config or gguf_config(path)
    reader = _reader(path)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    permuted = config.get("model_type", "llama") == "llama"
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m and m.group(2) in EXPERT_TENSORS:  # stacked experts -> one tensor per expert
            stacked = torch.from_numpy(np.ascontiguousarray(_dequantize(t)))
            proj = EXPERT_TENSORS[m.group(2)]
            for e in range(stacked.shape[0]):
                yield f"model.layers.{m.group(1)}.mlp.experts.{e}.{proj}.{m.group(3)}", stacked[e].clone()
            del stacked
            continue
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            continue
        w = torch.from_numpy(np.ascontiguousarray(_dequantize(t)))
        if hf.endswith("mlp.shared_expert_gate.weight") and w.ndim == 1:
            w = w[None]
        if permuted and (hf.endswith("self_attn.q_proj.weight") or hf.endswith("self_attn.q_proj.bias")):
            w = reverse_permute(w, n_head)
        elif permuted and (hf.endswith("self_attn.k_proj.weight") or hf.endswith("self_attn.k_proj.bias")):
            w = reverse_permute(w, n_kv)
        yield hf, w
