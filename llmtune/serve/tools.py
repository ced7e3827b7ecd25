"""Tool calling for ``llmtune api``: OpenAI's ``tools`` / ``tool_calls`` / ``tool`` messages <-> the chat
template's tool format (:mod:`llmtune.data.templates.tools`).

* Request side: ``tools`` (``[{"type": "function", "function": {"name", "description", "parameters"}}]``) go
  to the template, which writes them into the system prompt in its ``tool_format``; an assistant message with
  ``tool_calls`` becomes the template's ``function`` turn (content: the JSON list of ``{"name", "arguments"}``),
  and ``tool`` messages become one ``observation`` turn (several results of parallel calls joined by newlines).
* Reply side: :func:`parse_tool_calls` (shared with RL rollouts, in :mod:`llmtune.data.templates.tools`) finds the calls the model wrote in the template's format and returns
  OpenAI's ``tool_calls`` (``arguments`` as a JSON string) plus the text before them.

Source: the OpenAI API reference (function calling); the text formats are LLaMA-Factory's
``data/tool_utils.py`` as :mod:`llmtune.data.templates.tools` writes them (``default``: ``Action: NAME`` /
``Action Input: JSON``; ``qwen``: ``<tool_call>{...}</tool_call>``; ``llama3``: ``{"name", "parameters"}``;
``mistral``: a JSON list, optionally after ``[TOOL_CALLS]``).
"""

from __future__ import annotations

import json
from typing import Optional

from llmtune.data.templates.tools import find_tool_calls, parse_tool_calls
from llmtune.serve.errors import APIError

__all__ = ["check_tools", "tool_call_turn", "parse_tool_calls", "ToolStream"]


def check_tools(body: dict) -> tuple[Optional[list], bool]:
    """``(tools or None, parse replies for calls)`` from a chat body's ``tools`` and ``tool_choice``.

    Raises:
        APIError: 422 ``tools`` not a list of function objects; 400 a tool without a name, or a
            ``tool_choice`` other than ``"auto"``/``"none"`` (forcing a call is not supported).
    """
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
        return None, False
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise APIError(422, "'tools' must be a list of {'type': 'function', 'function': {...}} objects", "tools",
                       "invalid_type")
    for i, t in enumerate(tools):
        fn = t.get("function")
        if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}",
                           f"tools[{i}]", "invalid_value")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(422, f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters", "invalid_type")
    if choice not in (None, "auto", "none"):
        raise APIError(400, "'tool_choice' other than 'auto' or 'none' is not supported", "tool_choice",
                       "unsupported_parameter")
    return tools, choice != "none"


def tool_call_turn(m: dict, i: int) -> dict:
    """The template's ``function`` turn for an assistant message ``m`` (``messages[i]``) with ``tool_calls``.

    Raises:
        APIError: 400 a call without ``function.name`` or with ``arguments`` that are not a JSON object.
    """
    calls = m.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise APIError(422, f"messages[{i}].tool_calls must be a non-empty list", f"messages[{i}].tool_calls",
                       "invalid_type")
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        where = f"messages[{i}].tool_calls[{k}]"
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}",
                           where, "invalid_value")
        args = fn.get("arguments") or "{}"
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise APIError(400, f"{where}.function.arguments is not JSON", where, "invalid_value") from None
        out.append({"name": fn["name"], "arguments": args})
    return {"role": "function", "content": json.dumps(out, ensure_ascii=False)}


_MARKERS = {"default": "Action:", "qwen": "<tool_call>"}


class ToolStream:
    """The streamed text of one choice of a request with ``tools``: prose goes out as it arrives, a tool call
    is held back from where it may begin and parsed when the choice ends.

    :meth:`push` takes the choice's next text piece and returns what can be sent as ``content`` now: in the
    ``default`` and ``qwen`` formats everything before the call's marker (``Action:``, ``<tool_call>``), less a
    tail that could still be the start of the marker, and less trailing whitespace (the content of a reply
    with a call is stripped); in ``llama3`` and ``mistral``, where a call is the whole reply, nothing while the
    reply (leading whitespace skipped) begins with ``[`` or ``{``, else everything. :meth:`finish` parses the
    whole text with :func:`parse_tool_calls` and returns ``(rest of the content to send, tool_calls)``: with
    calls, the rest is the unsent prose before the first call (stripped); without, all the unsent text, so that
    the pieces then join to the whole reply.

    Args:
        tool_format: the template's ``tool_format`` (``default``, ``qwen``, ``llama3``, ``mistral``).
    """

    def __init__(self, tool_format: str) -> None:
        self.fmt = tool_format
        self.text = ""
        self.sent = 0        # characters of self.text sent
        self.held = False    # a call may have begun at self.sent: nothing more goes out before finish()

    def push(self, piece: str) -> str:
        """Add the next text piece (str); returns the content to send now (str, maybe empty)."""
        self.text += piece
        if self.held:
            return ""
        marker = _MARKERS.get(self.fmt)
        if marker is None:
            body = self.text.lstrip()
            if not body:
                return ""
            if self.sent == 0 and body[0] in "[{":
                self.held = True
                return ""
            end = len(self.text)
        else:
            at = self.text.find(marker, self.sent)
            if at >= 0:
                self.held = True
                end = at
            else:
                end = len(self.text) - next((k for k in range(len(marker) - 1, 0, -1)
                                             if self.text.endswith(marker[:k])), 0)
            end = len(self.text[:end].rstrip())
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list]:
        """``(content still to send, OpenAI tool_calls)`` at the end of the choice (see the class)."""
        start, calls = find_tool_calls(self.text, self.fmt)
        if not calls:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, []
        rest = self.text[self.sent:start].rstrip() if start > self.sent else ""
        if self.sent == 0:
            rest = rest.lstrip()
        self.sent = len(self.text)
        return rest, calls
