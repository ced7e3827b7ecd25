"""The model's own chat template (``tokenizer.chat_template``, Jinja) used for training.

How prompt/response spans are found (``template: null``): the conversation is rendered with
``tokenizer.apply_chat_template(..., tokenize=False)`` once per assistant turn ``k``, twice:

* ``P_k`` = the messages before turn ``k`` with ``add_generation_prompt=True`` (ends with the assistant header);
* ``F_k`` = the messages up to and including turn ``k`` with ``add_generation_prompt=False``.

The prompt text of turn ``k`` is ``P_k`` minus ``F_{k-1}`` (``F_0 = ""``) and its response text is ``F_k``
minus ``P_k``; each piece is tokenized on its own, as the built-in templates do. This needs every rendering
to be a prefix of the next one; templates that rewrite earlier turns (some reasoning models drop old thoughts)
fail with a clear error asking for a named template. The end-of-turn token is the first special-looking
token (``<...>``) the template writes after the assistant's content (``<|im_end|>`` for ChatML), else eos.

Tools follow LLaMA-Factory's parsed templates: the tools text (``default`` tool format) is appended to the
system message, a function call is an assistant message holding the formatted call, and a tool's answer
(``observation``) is a ``user`` message.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from llmtune.errors import LLMTuneError
from llmtune.data.templates.tools import _as_list, format_call, format_tools, parse_tools


class JinjaTemplate:
    """A template that renders the tokenizer's own Jinja ``chat_template`` (see module docstring).

    Attributes: ``name`` (None: recorded as ``template: null``), ``stop_token_ids``, ``tool_format``,
    ``default_system`` (None: the Jinja template's own default applies).
    """

    name = None

    def __init__(self, tokenizer, tool_format: str = "default", default_system: Optional[str] = None) -> None:
        self.tokenizer = tokenizer
        self.tool_format = tool_format
        self.default_system = default_system
        self._stop_ids: Optional[list[int]] = None

    def _render(self, chat: list[dict], generation: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(chat, add_generation_prompt=generation, tokenize=False)
        except LLMTuneError:  # already one line naming the template's file (bounded rendering, tokenizer.py)
            raise
        except Exception as err:  # noqa: BLE001 - any template error is the user's model/template choice
            why = f"{type(err).__name__}: {err}" if str(err).strip() else type(err).__name__   # never "()"
            raise LLMTuneError(f"template: the model's own chat_template failed to render a conversation ({why}); "
                               "set template to a built-in name (e.g. chatml, llama3, qwen).") from err

    def _chat(self, messages: Sequence[dict], system: Optional[str], tools: Any) -> list[dict]:
        sys_text = (system or self.default_system or "") + format_tools(parse_tools(tools), self.tool_format)
        chat = [{"role": "system", "content": sys_text}] if sys_text else []
        for m in messages:
            role, content = m["role"], m["content"] or ""
            if role == "function":
                chat.append({"role": "assistant", "content": format_call(content, self.tool_format)})
            elif role == "observation":
                chat.append({"role": "user", "content": content})
            else:
                chat.append({"role": role, "content": content})
        return chat

    def _enc(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _spans(self, messages: Sequence[dict], system: Optional[str], tools: Any):
        chat = self._chat(messages, system, tools)
        off = len(chat) - len(messages)
        prev, texts = "", []
        for k in range(1, len(messages) + 1, 2):
            j = k + off
            p = self._render(chat[:j], True)
            if not p.startswith(prev):
                raise LLMTuneError("template: the model's chat_template renders earlier turns differently once a "
                                   "later turn is added, so prompt/response spans cannot be found; set template "
                                   "to a built-in name (e.g. chatml, qwen3, llama3).")
            if k >= len(messages):  # prompt only (generation)
                texts.append((p[len(prev):], None))
                break
            f = self._render(chat[:j + 1], False)
            if not f.startswith(p):
                raise LLMTuneError("template: the model's chat_template does not render the assistant turn after "
                                   "its generation prompt; set template to a built-in name (e.g. chatml).")
            texts.append((p[len(prev):], f[len(p):]))
            prev = f
        return texts

    def encode_turns(self, messages: Sequence[dict], system: Optional[str] = None,
                     tools: Any = None) -> list[tuple[list[int], list[int]]]:
        """``[(prompt_ids, response_ids), ...]`` per assistant turn (same contract as ``Template.encode_turns``)."""
        return [(self._enc(p), self._enc(r)) for p, r in self._spans(messages, system, tools)]

    def encode_prompt(self, messages: Sequence[dict], system: Optional[str] = None, tools: Any = None) -> list[int]:
        """Generation prompt ids (ends with the assistant header); ``messages`` end with a user message."""
        ids: list[int] = []
        for p, r in self._spans(messages, system, tools):
            ids += self._enc(p) + (self._enc(r) if r is not None else [])
        return ids

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-turn id found after the assistant content (see module docstring), then the eos ids."""
        if self._stop_ids is None:
            tok = self.tokenizer
            marker = "ANSWER"
            chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": marker}]
            full, head = self._render(chat, False), self._render(chat[:1], True)
            tail = full[len(head):]
            tail = tail[tail.find(marker) + len(marker):] if marker in tail else ""
            ids = []
            for tid in self._enc(tail):
                piece = tok.decode([tid], skip_special_tokens=False)
                if len(piece) > 2 and piece.startswith("<") and piece.endswith(">"):
                    ids.append(int(tid))
                    break
            for eos in [tok.eos_token_id] + _as_list(getattr(tok, "eos_token_ids", None)):
                if eos is not None:
                    ids.append(int(eos))
            if not ids:
                raise LLMTuneError("template: the model's chat_template has no end-of-turn token and the tokenizer "
                                   "no eos token; set template to a built-in name.")
            self._stop_ids = list(dict.fromkeys(ids))
        return self._stop_ids
