"""Export of a :class:`~llmtune.models.Transformer` as a GGUF file that llama.cpp, Ollama and transformers read.

Sources: the GGUF specification (ggml ``docs/gguf.md``: metadata keys ``general.*``, ``{arch}.*``,
``tokenizer.ggml.*``, ``tokenizer.chat_template``; tensor types; alignment) and llama.cpp's
``convert_hf_to_gguf.py`` (tensor names, the ``LlamaModel.permute`` of q/k rows, which tensors stay F32,
``general.file_type`` values). Written with the ``gguf`` package's ``GGUFWriter``; quantized types with
``gguf.quants.quantize`` (the package's reference implementation of ggml's Q8_0 / Q4_0 / Q4_1 blocks).

Supported architectures: Llama-family models (Llama, Mistral without sliding window, SmolLM; written as
GGUF architecture ``llama``, which is what llama.cpp itself writes for them), and Qwen2-MoE / Qwen3-MoE
(``qwen2moe`` / ``qwen3moe``: experts stacked into ``ffn_{gate,up,down}_exps`` ``(num_experts, out, in)``,
router ``ffn_gate_inp`` and shared-expert tensors ``ffn_*_shexp``, ``ffn_gate_inp_shexp``; q/k not permuted,
as llama.cpp's Qwen graphs use the rotate-half RoPE layout). Dense Qwen2/Qwen3 are refused with a clear
message (their GGUF layouts are not implemented here).

Public API: :data:`GGUF_TYPES`, :func:`permute`, :func:`hf_to_gguf_name`, :func:`tokenizer_fields_from_json`,
:func:`write_gguf`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from llmtune.errors import LLMTuneError, notice
from llmtune.models.gguf import GLOBAL_TENSORS, LAYER_TENSORS, MOE_LAYER_TENSORS, map_tensor_name

#: ``--gguf_type`` -> (ggml tensor type name, ``general.file_type`` value of llama.cpp's ``LlamaFileType``).
GGUF_TYPES = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2),
    "q4_1": ("Q4_1", 3),
}

#: Hugging Face name (after ``model.layers.N.``) -> llama.cpp name (after ``blk.N.``): the inverse of the
#: importer's tables (:mod:`llmtune.models.gguf`), so one table names each tensor both ways.
#: The MoE and Qwen3 names (gguf ``MODEL_TENSORS[QWEN2MOE / QWEN3MOE]``) are in it too.
_LAYER_NAMES = {hf: gg for gg, hf in {**LAYER_TENSORS, **MOE_LAYER_TENSORS}.items()}
_GLOBAL_NAMES = {hf: gg for gg, hf in GLOBAL_TENSORS.items()}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
#: Hugging Face family -> GGUF ``general.architecture`` of the MoE models.
MOE_GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
#: tensors llama.cpp's converter keeps in F32 whatever the file type (the routers).
_F32_TENSORS = ("ffn_gate_inp", "ffn_gate_inp_shexp")

#: tokenizer.ggml.token_type values (llama.cpp ``llama_token_type``).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Apply llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``).

    Hugging Face stores each head's rows in the rotate-half RoPE layout (first half, second half);
    llama.cpp expects interleaved pairs: HF row ``(h, j, i)`` -> GGUF row ``(h, i, j)`` for half ``j in {0,1}``
    and ``i < head_dim/2``. Inverse of :func:`llmtune.models.gguf.reverse_permute`.

    Args:
        w: ``(n_head * head_dim, ...)`` weight (or bias) of ``q_proj`` / ``k_proj``.
        n_head: number of query heads for q, of key/value heads for k.

    Returns:
        A tensor of the same shape and dtype.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_gguf_name(name: str) -> str:
    """Map a Hugging Face parameter name to llama.cpp's (``model.layers.3.mlp.up_proj.weight ->
    blk.3.ffn_up.weight``, ``model.embed_tokens.weight -> token_embd.weight``, ``lm_head.weight ->
    output.weight``).

    Raises:
        LLMTuneError: a name with no llama.cpp counterpart.
    """
    gguf_name = map_tensor_name(name, _LAYER, _LAYER_NAMES, _GLOBAL_NAMES, "blk")
    if gguf_name is None:
        raise LLMTuneError(f"parameter {name!r} has no llama.cpp GGUF counterpart; GGUF export supports plain "
                           "Llama-architecture models")
    return gguf_name


def tokenizer_fields_from_json(tokenizer_json: dict, vocab_size: int) -> dict[str, Any]:
    """GGUF ``tokenizer.ggml.*`` arrays from a Hugging Face ``tokenizer.json`` of a byte-level BPE model.

    Returns ``{"tokens": [str] * vocab_size, "token_type": [int], "merges": ["a b", ...]}``: tokens ordered
    by id (the BPE vocab plus ``added_tokens``), token types as llama.cpp's convert script sets them
    (special added tokens CONTROL=3, other added tokens USER_DEFINED=4, the rest NORMAL=1), ids the model
    has but the tokenizer lacks filled with ``[PAD{id}]`` of type UNUSED=5; merges as space-joined pairs
    (both ``tokenizer.json`` merge spellings, ``"a b"`` and ``["a", "b"]``, are accepted).

    Raises:
        LLMTuneError: not a BPE tokenizer (llama.cpp's ``gpt2`` tokenizer model), or token ids beyond
            ``vocab_size``.
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise LLMTuneError(f"tokenizer.json: model type {model.get('type')!r} is not supported for GGUF export "
                           "(only byte-level BPE tokenizers, llama.cpp's 'gpt2' model)")
    ids: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: _NORMAL for i in ids}
    for tok in tokenizer_json.get("added_tokens") or []:
        ids[int(tok["id"])] = tok["content"]
        types[int(tok["id"])] = _CONTROL if tok.get("special") else _USER_DEFINED
    if ids and max(ids) >= vocab_size:
        raise LLMTuneError(f"tokenizer.json: token id {max(ids)} does not fit the model's vocab_size "
                           f"{vocab_size}; export the tokenizer that belongs to this model")
    tokens, token_type = [], []
    for i in range(vocab_size):
        tokens.append(ids.get(i, f"[PAD{i}]"))
        token_type.append(types.get(i, _UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "token_type": token_type, "merges": merges}


def _quantize(name: str, w: torch.Tensor, qtype_name: str):
    """``(array, raw_dtype or None)`` for ``GGUFWriter.add_tensor``; falls back to F16 for rows that are not
    a multiple of the quantization block (as llama.cpp does)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    from gguf import quants

    arr = w.detach().to(torch.float32).cpu().numpy()
    if qtype_name == "F32":
        return arr, None
    if qtype_name == "F16":
        return arr.astype(np.float16), None
    qtype = Q[qtype_name]
    block = GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        notice(f"GGUF export: {name} has rows of {arr.shape[-1]} values, not a multiple of the {qtype_name} "
               f"block size {block}; stored as F16")
        return arr.astype(np.float16), None
    return quants.quantize(arr, qtype), qtype


def write_gguf(model: torch.nn.Module, path: str | Path, gguf_type: str = "f16", *,
               tokenizer_json: Optional[dict] = None, chat_template: Optional[str] = None,
               bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
               pad_token_id: Optional[int] = None, eot_token_ids: Iterable[int] = (),
               add_bos_token: Optional[bool] = None, tokenizer_pre: str = "default",
               name: Optional[str] = None) -> Path:
    """Write ``model`` (a Llama-architecture :class:`~llmtune.models.Transformer`) as one GGUF file.

    Tensors get llama.cpp names (``token_embd``, ``blk.N.attn_q/k/v/output``, ``ffn_gate/up/down``,
    ``attn_norm``, ``ffn_norm``, ``output_norm``, and ``output`` unless the embeddings are tied); ``attn_q``
    and ``attn_k`` rows are permuted (:func:`permute`). 2-D weights are stored as ``gguf_type``; 1-D tensors
    (norms, biases) stay F32, as llama.cpp does. Metadata: ``llama.block_count, context_length,
    embedding_length, feed_forward_length, attention.head_count(_kv), rope.freq_base,
    attention.layer_norm_rms_epsilon, rope.dimension_count, vocab_size``, ``rope.scaling.*`` (linear),
    ``general.file_type``; with ``tokenizer_json`` the ``gpt2`` BPE tokenizer (tokens, token_type, merges,
    bos/eos/pad ids, ``tokenizer.ggml.pre``) and ``tokenizer.chat_template``.

    Args:
        model: the merged model (weights of any float dtype; converted per tensor).
        path: the ``.gguf`` file to write (its folder must exist).
        gguf_type: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0`` or ``q4_1`` (case-insensitive).
        tokenizer_json: the parsed ``tokenizer.json`` (omit for a weights-only file).
        chat_template: the Jinja chat template to store.
        bos_token_id, eos_token_id, pad_token_id: special ids (``tokenizer.ggml.*_token_id``).
        eot_token_ids: end-of-turn ids (e.g. ``<|im_end|>``); the first is written as
            ``tokenizer.ggml.eot_token_id`` so llama.cpp stops there.
        add_bos_token: ``tokenizer.ggml.add_bos_token`` (omitted when None).
        tokenizer_pre: llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``, e.g. ``smollm``, ``llama-bpe``).
        name: ``general.name``.

    Returns:
        ``path``.

    Raises:
        LLMTuneError: unknown ``gguf_type``, an architecture other than Llama/Mistral, Llama 3.1 rope
            scaling, a non-BPE tokenizer.
    """
    import gguf

    cfg = model.config
    key = str(gguf_type).lower()
    if key not in GGUF_TYPES:
        from llmtune.errors import nearest

        raise LLMTuneError(f"gguf_type: {gguf_type!r} is not supported; choose one of {', '.join(GGUF_TYPES)}."
                           + nearest(key, GGUF_TYPES))
    moe_arch = MOE_GGUF_ARCH.get(cfg.family)
    if moe_arch is not None:
        _check_moe_exportable(cfg)
    elif cfg.family not in ("llama", "mistral") or cfg.qkv_bias or cfg.qk_norm:
        raise LLMTuneError(f"export_format gguf: architecture {cfg.architecture} is not supported by llmtune's "
                           "GGUF writer (Llama, Mistral and SmolLM are); export safetensors and convert with "
                           "llama.cpp's convert_hf_to_gguf.py")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        raise LLMTuneError("export_format gguf: models with a sliding attention window are not supported by "
                           "llmtune's GGUF writer; export safetensors and convert with llama.cpp")
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") not in (None, "default", "linear"):
        raise LLMTuneError(f"export_format gguf: rope_scaling {scaling.get('rope_type')!r} is not supported by "
                           "llmtune's GGUF writer; export safetensors and convert with llama.cpp")
    qtype_name, file_type = GGUF_TYPES[key]
    path = Path(path)
    arch = moe_arch or "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    if name:
        w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if moe_arch is not None:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if tokenizer_json is not None:
        tok = tokenizer_fields_from_json(tokenizer_json, cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer_pre)
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["token_type"])
        w.add_token_merges(tok["merges"])
    if bos_token_id is not None:
        w.add_bos_token_id(int(bos_token_id))
    if eos_token_id is not None:
        w.add_eos_token_id(int(eos_token_id))
    if pad_token_id is not None:
        w.add_pad_token_id(int(pad_token_id))
    eot = [int(i) for i in eot_token_ids if i is not None and i != eos_token_id]
    if eot:
        w.add_eot_token_id(eot[0])
    if add_bos_token is not None:
        w.add_add_bos_token(bool(add_bos_token))
    if chat_template:
        w.add_chat_template(chat_template)

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    tied = cfg.tie_word_embeddings
    for hf_name, t in _stack_experts(model.state_dict()):
        if tied and hf_name == "lm_head.weight":
            continue
        gg_name = hf_name if hf_name.startswith("blk.") else hf_to_gguf_name(hf_name)
        t = t.detach().to(torch.float32)
        if moe_arch is None and ".self_attn.q_proj." in hf_name:
            t = permute(t, n_head)
        elif moe_arch is None and ".self_attn.k_proj." in hf_name:
            t = permute(t, n_kv)
        if ".ffn_gate_inp_shexp." in gg_name:
            t = t.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
        if t.ndim == 1 or gg_name.split(".")[-2] in _F32_TENSORS:
            arr, raw = t.cpu().numpy(), None
        else:
            arr, raw = _quantize(gg_name, t, qtype_name)
        w.add_tensor(gg_name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _check_moe_exportable(cfg) -> None:
    """Refuse MoE settings that llama.cpp's ``qwen2moe`` / ``qwen3moe`` graphs cannot express.

    llama.cpp puts a sparse block in every layer and fixes the top-k renormalisation (off for qwen2moe, on
    for qwen3moe); its qwen2moe graph always has the shared expert.

    Raises:
        LLMTuneError: ``mlp_only_layers``, ``decoder_sparse_step != 1``, the other ``norm_topk_prob``, a
            Qwen2-MoE without shared expert, a sliding window, or rope scaling.
    """
    problems = []
    if cfg.mlp_only_layers or cfg.decoder_sparse_step != 1:
        problems.append("dense layers among the MoE layers (mlp_only_layers / decoder_sparse_step)")
    if cfg.norm_topk_prob != (cfg.family == "qwen3_moe"):
        problems.append(f"norm_topk_prob {cfg.norm_topk_prob} (llama.cpp's {MOE_GGUF_ARCH[cfg.family]} fixes it "
                        f"to {cfg.family == 'qwen3_moe'})")
    if cfg.family == "qwen2_moe" and not cfg.shared_expert_intermediate_size:
        problems.append("no shared expert")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        problems.append("a sliding attention window")
    if (cfg.rope_scaling or {}).get("rope_type") not in (None, "default"):
        problems.append("rope scaling")
    if problems:
        raise LLMTuneError(f"export_format gguf: this {cfg.architecture} has " + "; ".join(problems)
                           + ", which llama.cpp's GGUF graph for it cannot express; export safetensors instead")


def _stack_experts(state_dict: dict[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of ``state_dict`` in order, with each layer's per-expert projections
    ``model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight`` replaced, where expert 0's appears, by one
    stacked ``(num_experts, out, in)`` tensor named ``blk.N.ffn_{gate,up,down}_exps.weight``."""
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in state_dict.items():
        m = _EXPERT.match(name)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
    for name, t in state_dict.items():
        m = _EXPERT.match(name)
        if m is None:
            yield name, t
        elif m.group(2) == "0":
            experts = groups[(m.group(1), m.group(3))]
            yield (f"blk.{m.group(1)}.ffn_{m.group(3)}_exps.weight",
                   torch.stack([experts[e].detach().to(torch.float32) for e in range(len(experts))]))


def read_tokenizer_json(path: str | Path) -> dict:
    """Parse a ``tokenizer.json`` file; raises :class:`LLMTuneError` when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LLMTuneError(f"{path}: no such file (GGUF export needs the model's tokenizer.json)") from None
    except json.JSONDecodeError as e:
        raise LLMTuneError(f"{path}: not valid JSON ({e})") from None
