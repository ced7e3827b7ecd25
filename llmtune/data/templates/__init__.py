"""Chat templates: how a conversation becomes token ids, and which tokens the model is trained on.

A template turns ``messages`` (a list of ``{"role", "content"}`` with roles ``user``, ``assistant``,
``observation`` (a tool's answer) and ``function`` (an assistant tool call whose content is
``{"name", "arguments"}`` JSON), alternating user/observation then assistant/function), an optional
``system`` string and optional ``tools`` (JSON list) into *turns*: pairs ``(prompt_ids, response_ids)``.
Prompt tokens are never trained (label -100) unless ``train_on_prompt``; response tokens are, and every
response ends with the template's end-of-turn token (``stop_token_ids[0]``), so the fine-tuned model learns to
stop; the same ids are the stop tokens of generation.

Two kinds:

* **Built-in templates** (:data:`TEMPLATES`), named as in LLaMA-Factory (``default``, ``empty``,
  ``alpaca``, ``chatml``, ``llama2``, ``llama3``, ``mistral``, ``qwen``, ``qwen3``, ``qwen3_nothink``,
  ``qwen2_vl``, ``qwen3_vl``, ``qwen3_vl_nothink``,
  ``smollm2``). Each is a list of *slots* per role: strings in which ``{{content}}`` is replaced, and the
  markers :data:`BOS` / :data:`EOS` for the tokenizer's bos/eos ids. Every string slot is tokenized on its
  own (``encode(text, add_special_tokens=False)``), special tokens written in the text (``<|im_end|>``)
  become their ids. Facts (slots, default system prompts, stop words) are LLaMA-Factory's
  ``data/template.py``.
* **The model's own Jinja chat template** (``get_template(None, tokenizer)``): see :class:`JinjaTemplate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from llmtune.errors import LLMTuneError, nearest, notice
from llmtune.data.templates.tools import _as_list, check_tool_format, format_call, format_tools, parse_tools


class _Special:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<{self.kind}>"


#: Slot marker: the tokenizer's bos id (skipped when the tokenizer has none).
BOS = _Special("bos")
#: Slot marker: the tokenizer's eos id.
EOS = _Special("eos")

USER, ASSISTANT, OBSERVATION, FUNCTION = "user", "assistant", "observation", "function"
PROMPT_ROLES = (USER, OBSERVATION)
RESPONSE_ROLES = (ASSISTANT, FUNCTION)


def check_messages(messages: Sequence[dict], need_response_last: bool) -> Optional[str]:
    """Return a reason string when ``messages`` do not alternate prompt roles / response roles, else None.

    Even positions must be ``user``/``observation``, odd ones ``assistant``/``function``; the list ends with a
    response when ``need_response_last`` else with a prompt.
    """
    if not messages:
        return "no messages"
    for i, m in enumerate(messages):
        allowed = PROMPT_ROLES if i % 2 == 0 else RESPONSE_ROLES
        if m.get("role") not in allowed:
            return f"message {i} has role {m.get('role')!r}, expected one of {allowed}"
    if need_response_last != (len(messages) % 2 == 0):
        return "the conversation must end with an assistant message" if need_response_last else \
            "the prompt must end with a user/observation message"
    return None


@dataclass
class Template:
    """A built-in chat template bound to a tokenizer (see the module docstring).

    Attributes:
        name: LLaMA-Factory's template name.
        user, assistant, system, function, observation, prefix: slot lists (strings with ``{{content}}``,
            :data:`BOS`, :data:`EOS`). ``function`` defaults to ``assistant``, ``observation`` to ``user``.
        default_system: system prompt used when a conversation has none.
        stop_words: end-of-turn token strings; the first one ends every assistant turn.
        tool_format: ``default``/``qwen``/``llama3``/``mistral`` (:mod:`llmtune.data.templates.tools`).
        fuse_system: Llama 2 style: the system text is put inside the first user message.
        thought_words: for reasoning templates (``qwen3``), the empty-thought text added in front of every
            response that has none (trained), as LLaMA-Factory does with ``enable_thinking`` on.
        tokenizer: set by :func:`get_template`.
    """

    name: str
    user: tuple = ("{{content}}",)
    assistant: tuple = ("{{content}}", EOS)
    system: Optional[tuple] = None
    function: Optional[tuple] = None
    observation: Optional[tuple] = None
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    tool_format: str = "default"
    fuse_system: bool = False
    thought_words: Optional[tuple] = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    _stop_ids: Optional[list] = field(default=None, repr=False, compare=False)

    # -- token ids -----------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-turn ids: the first stop word (or eos when the template has none) first, then the other
        stop words the tokenizer knows, then eos. Also the generation stops.

        Raises:
            LLMTuneError: the template's end-of-turn token is not a token of this tokenizer.
        """
        if self._stop_ids is None:
            tok = self.tokenizer
            ids: list[int] = []
            for i, word in enumerate(self.stop_words):
                tid = _token_id(tok, word)
                if tid is None:
                    if i == 0:
                        raise LLMTuneError(
                            f"template: {self.name!r} ends assistant turns with {word!r}, which is not a token of "
                            f"the tokenizer of {getattr(tok, 'name_or_path', 'this model')}; use the model's own "
                            "chat template (leave template unset) or a template made for this model.")
                    continue
                ids.append(tid)
            for eos in [tok.eos_token_id] + _as_list(getattr(tok, "eos_token_ids", None)):
                if eos is not None:
                    ids.append(int(eos))
            if not ids:
                raise LLMTuneError(f"template: {self.name!r} needs an eos token, and the tokenizer has none.")
            self._stop_ids = list(dict.fromkeys(ids))
        return self._stop_ids

    def _slot_ids(self, slots: Sequence, content: str = "") -> list[int]:
        ids: list[int] = []
        for slot in slots:
            if isinstance(slot, str):
                text = slot.replace("{{content}}", content, 1)
                if text:
                    ids += self.tokenizer.encode(text, add_special_tokens=False)
            elif slot is BOS:
                if self.tokenizer.bos_token_id is not None:
                    ids.append(self.tokenizer.bos_token_id)
            elif slot is EOS:
                ids.append(self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None
                           else self.stop_token_ids[0])
        return ids

    def _slot_text(self, slots: Sequence, content: str) -> str:
        return "".join(s.replace("{{content}}", content, 1) for s in slots if isinstance(s, str))

    def encode_turns(self, messages: Sequence[dict], system: Optional[str] = None,
                     tools: Any = None) -> list[tuple[list[int], list[int]]]:
        """Encode a conversation into ``[(prompt_ids, response_ids), ...]``, one pair per assistant turn.

        ``messages`` alternate user/observation and assistant/function and end with a response. The first
        prompt holds the prefix, the system message (``system`` or the template's default, plus the tools
        text) and the first user message. ``response_ids`` end with the end-of-turn token (and whatever the
        template writes after it, e.g. ``"\\n"`` in ChatML).

        Raises:
            ValueError: a function message whose content is not ``{"name", "arguments"}`` JSON, or tools
                that are not JSON (callers name the dataset and row).
        """
        system = system or self.default_system
        tool_text = format_tools(parse_tools(tools), self.tool_format)
        encoded: list[list[int]] = []
        for i, msg in enumerate(messages):
            ids: list[int] = []
            content, role = msg["content"] or "", msg["role"]
            if i == 0:
                ids += self._slot_ids(self.prefix)
                if system or tool_text:
                    sys_slots = self.system or ("{{content}}",)
                    if self.fuse_system:
                        content = self._slot_text(sys_slots, system + tool_text) + content
                    else:
                        ids += self._slot_ids(sys_slots, system + tool_text)
            if role == USER:
                ids += self._slot_ids(self.user, content)
            elif role == ASSISTANT:
                ids += self._slot_ids(self.assistant, content)
            elif role == OBSERVATION:
                ids += self._slot_ids(self.observation or self.user, content)
            elif role == FUNCTION:
                ids += self._slot_ids(self.function or self.assistant, format_call(content, self.tool_format))
            else:
                raise ValueError(f"unexpected role {role!r}")
            encoded.append(ids)
        pairs = [(encoded[i], encoded[i + 1] if i + 1 < len(encoded) else []) for i in range(0, len(encoded), 2)]
        if self.thought_words:
            think_ids = self.tokenizer.encode("".join(self.thought_words), add_special_tokens=False)
            open_w, close_w = (w.strip() for w in self.thought_words)
            for k, i in enumerate(range(1, len(messages), 2)):
                c = messages[i]["content"] or ""
                if open_w not in c and close_w not in c:
                    pairs[k] = (pairs[k][0], think_ids + pairs[k][1])
        return pairs

    def encode_prompt(self, messages: Sequence[dict], system: Optional[str] = None, tools: Any = None) -> list[int]:
        """Token ids of a prompt for generation: the whole conversation, ending with the assistant header.

        ``messages`` end with a user/observation message. Returns ``list[int]``.

        Raises:
            LLMTuneError: the messages do not alternate roles or do not end with a user message.
        """
        reason = check_messages(messages, need_response_last=False)
        if reason:
            raise LLMTuneError(f"cannot build a generation prompt: {reason}.")
        pairs = self.encode_turns(list(messages) + [{"role": ASSISTANT, "content": ""}], system, tools)
        ids: list[int] = []
        for p, r in pairs[:-1]:
            ids += p + r
        return ids + pairs[-1][0]


def _token_id(tok, word: str) -> Optional[int]:
    """Id of ``word`` when it is a single token of ``tok`` (round-trips through decode), else None."""
    tid = tok.convert_tokens_to_ids(word)
    if tid is None or isinstance(tid, list):
        return None
    try:
        if tok.decode([tid], skip_special_tokens=False) != word:
            return None
    except Exception:  # noqa: BLE001 - an id outside the vocabulary
        return None
    return int(tid)


_CHATML_USER = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
_CHATML_ASSISTANT = ("{{content}}<|im_end|>\n",)
_CHATML_SYSTEM = ("<|im_start|>system\n{{content}}<|im_end|>\n",)
_QWEN_OBS = ("<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",)
_L3_USER = ("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",)
#: the Qwen chat format (ChatML, tool calls and results in Qwen's tags), shared by its text and VL templates
_QWEN = dict(user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, function=_CHATML_ASSISTANT,
             observation=_QWEN_OBS, tool_format="qwen", stop_words=("<|im_end|>",))
#: Qwen3's reasoning delimiters
_THINK = ("<think>\n", "\n</think>\n\n")

#: Built-in templates by LLaMA-Factory's names (facts from its ``data/template.py``).
TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("default", user=("Human: {{content}}", EOS, "\nAssistant:"), assistant=("{{content}}", EOS, "\n"),
             system=("System: {{content}}", EOS, "\n")),
    Template("empty", assistant=("{{content}}",)),
    Template("alpaca", user=("### Instruction:\n{{content}}\n\n### Response:\n",), assistant=("{{content}}", EOS, "\n\n"),
             default_system="Below is an instruction that describes a task. "
                            "Write a response that appropriately completes the request.\n\n"),
    Template("chatml", user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM,
             observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
             stop_words=("<|im_end|>", "<|im_start|>")),
    Template("llama2", user=(BOS, "[INST] {{content}} [/INST]"), system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
             fuse_system=True),
    Template("llama3", user=_L3_USER, assistant=("{{content}}<|eot_id|>",),
             system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
             function=("{{content}}<|eot_id|>",),
             observation=("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n",),
             prefix=(BOS,), stop_words=("<|eot_id|>", "<|eom_id|>"), tool_format="llama3"),
    Template("mistral", user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS),
             system=("{{content}}\n\n",), function=("[TOOL_CALLS] {{content}}", EOS),
             observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',), prefix=(BOS,),
             tool_format="mistral", fuse_system=True),
    Template("qwen", **_QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    Template("qwen3", **_QWEN, thought_words=_THINK),
    Template("qwen3_nothink", **_QWEN),
    # vision-language: the text format of qwen / qwen3; <image> placeholders are expanded by llmtune.data.multimodal
    Template("qwen2_vl", **_QWEN, default_system="You are a helpful assistant."),
    Template("qwen3_vl", **_QWEN, thought_words=_THINK),
    Template("qwen3_vl_nothink", **_QWEN),
    Template("smollm2", user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM,
             default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
             stop_words=("<|im_end|>",)),
]}


from llmtune.data.templates.jinja import JinjaTemplate  # noqa: E402  (needs the names above)


def get_template(name: Optional[str], tokenizer, tool_format: Optional[str] = None,
                 default_system: Optional[str] = None, enable_thinking: bool = True):
    """Return the chat template ``name`` bound to ``tokenizer``; ``None``: the model's own chat template.

    Args:
        name: a key of :data:`TEMPLATES`, or None for :class:`JinjaTemplate` over ``tokenizer.chat_template``
            (the ``empty`` template, with a notice, when the tokenizer has none).
        tokenizer: an llmtune ``Tokenizer`` (docs/internals.md).
        tool_format: overrides the template's tool format (LLaMA-Factory's ``tool_format``).
        default_system: overrides the template's default system prompt.
        enable_thinking: for reasoning templates (``qwen3``): add the empty thought to responses that lack
            one (trained); False drops that (as ``qwen3_nothink``).

    Returns:
        :class:`Template` or :class:`JinjaTemplate` (both have ``name``, ``stop_token_ids``,
        ``encode_turns``, ``encode_prompt``).

    Raises:
        LLMTuneError: unknown name (nearest names suggested), unknown tool format, or an end-of-turn token the
            tokenizer lacks.
    """
    if tool_format is not None:
        check_tool_format(tool_format)
    if name is None or name == "":
        if getattr(tokenizer, "chat_template", None):
            return JinjaTemplate(tokenizer, tool_format=tool_format or "default", default_system=default_system)
        notice("template: not set and the tokenizer has no chat_template; using the 'empty' template "
               "(plain text, no role markers).")
        name = "empty"
    if name not in TEMPLATES:
        raise LLMTuneError(f"template: unknown template {name!r}; built-in templates: {', '.join(sorted(TEMPLATES))} "
                           "(or leave it unset to use the model's own chat template)." + nearest(name, TEMPLATES))
    changes: dict[str, Any] = {"tokenizer": tokenizer}
    if tool_format:
        changes["tool_format"] = tool_format
    if default_system is not None:
        changes["default_system"] = default_system
    if not enable_thinking:
        changes["thought_words"] = None
    tpl = dataclasses.replace(TEMPLATES[name], **changes)
    tpl.stop_token_ids  # noqa: B018 - validate the end-of-turn token now, with a clear message
    return tpl


__all__ = ["Template", "JinjaTemplate", "TEMPLATES", "get_template", "BOS", "EOS", "check_messages"]
