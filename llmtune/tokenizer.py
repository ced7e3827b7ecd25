"""Tokenizers: a thin wrapper over the ``tokenizers`` library, loaded from a Hugging Face folder, a Hub id, a
GGUF file or an llmtune output folder, with the model's own Jinja chat template.

Sources: Hugging Face ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` /
``generation_config.json`` formats; GPT-2 byte-level BPE (Radford et al. 2019, the ``bytes_to_unicode``
byte alphabet); llama.cpp's GGUF tokenizer metadata (``tokenizer.ggml.tokens|merges|token_type|pre``,
token type 3 = control, 4 = user-defined); chat templates rendered as transformers does, in jinja2's sandbox
(:mod:`llmtune.templating`).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from llmtune.errors import LLMTuneError
from llmtune.fileio import read_json
from llmtune.sampling import eos_id_list
from llmtune.templating import RENDER_SECONDS, render_bounded
from llmtune.templating import compile_template as _compile_template  # noqa: F401 - the old private name

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_EOS_WHERE = " in the model's generation_config.json/config.json"

#: pre-tokenizer split regexes by GGUF ``tokenizer.ggml.pre`` (from the models' published tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A text tokenizer: ``tokenizers.Tokenizer`` plus special tokens and a chat template.

    Attributes:
        bos_token, eos_token, pad_token, unk_token: strings or ``None``.
        bos_token_id, eos_token_id, pad_token_id: ints or ``None``. When the tokenizer has no pad token,
            the eos token is used (as LLaMA-Factory does); ``pad_token_id`` never changes a loss because
            padding is masked.
        eos_token_ids: list of ints: ``eos_token_id`` plus ``generation_config.json``'s ``eos_token_id``
            (int or list), de-duplicated, in that order. Generation stops on any of them.
        chat_template: the Jinja chat template string, or ``None``.
        add_bos_token, add_eos_token: whether ``encode(..., add_special_tokens=True)`` adds them.
        model_max_length: int (tokens).
        name_or_path: where it was loaded from.
    """

    def __init__(self, backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, add_bos_token: bool = False,
                 add_eos_token: bool = False, chat_template: str | None = None,
                 model_max_length: int | None = None, generation_eos_token_ids: Iterable[int] = (),
                 name_or_path: str = "") -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        if pad_token is None:
            pad_token = eos_token
        self.pad_token = pad_token
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.chat_template = chat_template
        self.model_max_length = int(model_max_length) if model_max_length else 1 << 30
        self.name_or_path = name_or_path
        self.eos_token_ids: list[int] = eos_id_list(self.eos_token_id, list(generation_eos_token_ids))

    # -- ids ---------------------------------------------------------------------------------------
    def _special_id(self, key: str) -> int | None:
        """The id of special token ``key`` (``bos_token``...), or None when unset."""
        token = getattr(self, key)
        return self.convert_tokens_to_ids(token) if token else None

    bos_token_id = property(lambda self: self._special_id("bos_token"), doc="id of ``bos_token`` or None")
    eos_token_id = property(lambda self: self._special_id("eos_token"), doc="id of ``eos_token`` or None")
    pad_token_id = property(lambda self: self._special_id("pad_token"), doc="id of ``pad_token`` or None")
    unk_token_id = property(lambda self: self._special_id("unk_token"), doc="id of ``unk_token`` or None")

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as transformers' ``vocab_size``."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str | list[str]) -> int | None | list:
        """Id of ``token`` (or a list of ids for a list), ``None`` for a token not in the vocabulary."""
        if isinstance(token, (list, tuple)):
            return [self.backend.token_to_id(t) for t in token]
        return self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list:
        """Token string(s) of id(s) (byte-level spelling for BPE vocabularies)."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    @property
    def added_special_ids(self) -> list[int]:
        """Ids of all added tokens marked special (control tokens such as ``<|im_start|>``; the ones
        ``decode(..., skip_special_tokens=True)`` drops). A superset of transformers' ``all_special_ids``,
        which lists only the named bos/eos/unk/pad/additional tokens."""
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # -- text <-> ids ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids (list of int) of ``text``.

        Special-token strings in the text (``<|im_start|>``) become their single ids. With
        ``add_special_tokens`` the tokenizer.json post-processor runs, then bos is prepended when
        ``add_bos_token`` (and eos appended when ``add_eos_token``) unless already there.
        """
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            bos, eos = self.bos_token_id, self.eos_token_id
            if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if self.add_eos_token and eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
        return ids

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        """``{"input_ids": [...], "attention_mask": [1, ...]}`` for one text."""
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list of int or a 1-D tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str | list[int]:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the model's chat template.

        Renders as transformers does: jinja2 ``ImmutableSandboxedEnvironment(trim_blocks=True,
        lstrip_blocks=True)`` with ``loopcontrols``, a ``tojson`` filter that does not HTML-escape,
        ``raise_exception(msg)`` and ``strftime_now(fmt)``; the template sees ``messages``, ``tools``,
        ``add_generation_prompt``, the special tokens (``bos_token``, ``eos_token``, ...) and ``kwargs``.

        Returns:
            the rendered string, or its token ids (no special tokens added) with ``tokenize=True``.

        Rendering is bounded (:func:`llmtune.templating.render_bounded`): :data:`RENDER_SECONDS` of time (this
        module's value, read at each call), ``RENDER_MAX_CHARS`` of output, ``range`` up to ``RENDER_MAX_RANGE``
        items; ``include``/``import``/``extends`` refused.

        Raises:
            LLMTuneError: the tokenizer has no chat template, or the template failed or passed a limit (one
                line naming the file the template came from).
        """

        template = chat_template or self.chat_template
        if isinstance(template, list):  # [{"name": ..., "template": ...}] (named templates)
            named = {t["name"]: t["template"] for t in template}
            template = named.get("tool_use" if tools and "tool_use" in named else "default") or next(iter(named.values()))
        if not template:
            raise LLMTuneError(f"tokenizer {self.name_or_path}: has no chat_template; choose a template with "
                               "--template (e.g. chatml, llama3, qwen)")
        context = {k: getattr(self, k) for k in _SPECIAL_KEYS if getattr(self, k) is not None}
        context.update(kwargs)
        source = getattr(self, "chat_template_source", None) or self.name_or_path
        try:
            compiled = _compile_template(template)
        except LLMTuneError as e:
            raise LLMTuneError(f"{source}: {e}") from None
        text = render_bounded(compiled, source, seconds=RENDER_SECONDS, messages=messages, tools=tools,
                              add_generation_prompt=add_generation_prompt, **context)
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    # -- files ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, ``add_bos_token``,
        ``chat_template``, ``model_max_length``) and ``special_tokens_map.json`` into ``save_directory``
        (created if needed), so both :func:`load_tokenizer` and transformers' ``AutoTokenizer`` load it.

        Returns:
            the written file paths.
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        specials = {k: getattr(self, k) for k in _SPECIAL_KEYS if getattr(self, k) is not None}
        added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                          "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                 for i, t in sorted(self.backend.get_added_tokens_decoder().items())}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": added,
            **specials,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        files = [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]
        files[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        files[2].write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [str(f) for f in files]

    def __repr__(self) -> str:
        return (f"Tokenizer(name_or_path={self.name_or_path!r}, vocab={len(self)}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r}, eos_token_ids={self.eos_token_ids})")


# -- loading --------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    return read_json(path, "tokenizer", fix="copy the file again from the model's source", missing={})


def _load_folder(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        from llmtune.ckpt_weights import checkpoint_kind
        from llmtune.runs import is_adapter_folder, resolve_model_chain

        if is_adapter_folder(folder) or checkpoint_kind(folder):  # no tokenizer files here: use its base's
            base, _ = resolve_model_chain(folder)
            return load_tokenizer(base)
        raise LLMTuneError(f"{folder}: no tokenizer.json; llmtune reads fast-tokenizer files. Create it once "
                           "with transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    try:
        backend = Backend.from_file(str(tj))
    except Exception as e:  # noqa: BLE001
        raise LLMTuneError(f"{tj}: cannot be read by the tokenizers library ({e})") from None
    cfg = _read_json(folder / "tokenizer_config.json")
    stm = _read_json(folder / "special_tokens_map.json")
    specials = {k: _token_str(cfg.get(k)) or _token_str(stm.get(k)) for k in _SPECIAL_KEYS}
    template = cfg.get("chat_template")
    source = folder / "tokenizer_config.json"
    if (folder / "chat_template.jinja").is_file():
        from llmtune.fileio import read_text

        source = folder / "chat_template.jinja"
        template = read_text(source, "chat template", "re-save it as UTF-8")
    elif not template and (folder / "chat_template.json").is_file():
        source = folder / "chat_template.json"
        template = _read_json(source).get("chat_template")
    gen = _read_json(folder / "generation_config.json")
    gen_eos = gen.get("eos_token_id") if gen else _read_json(folder / "config.json").get("eos_token_id")
    tok = Tokenizer(backend, **specials, add_bos_token=cfg.get("add_bos_token", False),
                    add_eos_token=cfg.get("add_eos_token", False), chat_template=template,
                    model_max_length=cfg.get("model_max_length"), generation_eos_token_ids=eos_id_list(gen_eos, where=_EOS_WHERE),
                    name_or_path=str(folder))
    tok.chat_template_source = str(source)  # named in template errors
    return tok


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _load_gguf(path: Path) -> Tokenizer:
    """Rebuild the tokenizer a GGUF file describes (GPT-2 byte-level BPE: ``tokenizer.ggml.model == gpt2``)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from llmtune.models.gguf import _reader

    reader = _reader(path)
    fields = reader.fields

    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LLMTuneError(f"{path}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, "
                           "'gpt2', as in Llama 3, Qwen and SmolLM); load the tokenizer from the model's "
                           "Hugging Face folder instead")
    tokens: list[str] = get("tokenizer.ggml.tokens")
    types: list[int] = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges") or []]
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for i, tok in enumerate(tokens):  # tokens outside the byte alphabet are stored as text: re-spell them
        key = tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab[key] = i  # a duplicate spelling keeps the last id, as transformers does
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                 continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                 byte_fallback=False))
    split = _GGUF_SPLITS.get(get("tokenizer.ggml.pre"))
    if split is None:  # GPT-2's own split regex inside ByteLevel (smollm, gpt2, starcoder, ...)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == 3 and set(t) <= spelled]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == 4 and t in vocab]
    if user:
        backend.add_tokens(user)

    def token_of(key):
        i = get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos_id = get("tokenizer.ggml.eos_token_id")
    return Tokenizer(backend, bos_token=token_of("bos_token_id"), eos_token=token_of("eos_token_id"),
                     pad_token=token_of("padding_token_id"), unk_token=token_of("unknown_token_id"),
                     add_bos_token=bool(get("tokenizer.ggml.add_bos_token", False)),
                     add_eos_token=bool(get("tokenizer.ggml.add_eos_token", False)),
                     chat_template=get("tokenizer.chat_template"),
                     model_max_length=get(f"{get('general.architecture')}.context_length"),
                     generation_eos_token_ids=eos_id_list(eos_id, where=_EOS_WHERE), name_or_path=str(path))


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None) -> Tokenizer:
    """Load the tokenizer of a model.

    Args:
        name_or_path: a folder with ``tokenizer.json`` (+ ``tokenizer_config.json``,
            ``special_tokens_map.json``, ``generation_config.json``, ``chat_template.jinja``), a Hub repo id,
            a ``.gguf`` file (byte-level BPE rebuilt from ``tokenizer.ggml.*``), or an llmtune output /
            adapter folder (its own tokenizer files, else its base model's).
        revision: Hub revision for a repo id.

    Raises:
        LLMTuneError: missing path, no ``tokenizer.json``, unsupported GGUF tokenizer type.
    """
    from llmtune.models.hub import resolve_path

    path = resolve_path(name_or_path, revision, what="tokenizer")
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path)
        if path.name == "tokenizer.json":
            return _load_folder(path.parent)
        raise LLMTuneError(f"tokenizer {str(name_or_path)!r}: a file that is neither a .gguf model nor "
                           "tokenizer.json; give the model folder")
    return _load_folder(path)


__all__ = ["Tokenizer", "load_tokenizer"]
