"""Tool (function-calling) text formats used by chat templates.

A conversation with tools has three tool-related pieces of text:

* the tool list, appended to the system message (``format_tools``);
* a function call written by the assistant (``format_call``), from a message whose content is the JSON
  ``{"name": ..., "arguments": {...}}`` (or a list of them for parallel calls), the sharegpt ``function_call``
  role;
* the tool's answer (``observation`` role), which the template itself wraps.

:func:`parse_tool_calls` reads calls back out of a model's reply in each format (used by ``llmtune api`` and by
tool rollouts in online RL, :mod:`llmtune.rl_tools`).

Formats (facts from LLaMA-Factory's ``data/tool_utils.py``; the text is reproduced because the trained
model must see exactly these strings):

``default``
    ``"You have access to the following tools:\\n> Tool Name: ...\\nTool Description: ...\\nTool Args:\\n  - x (type,
    required): desc\\n\\nUse the following format if using a tool:..."``; a call is
    ``"Action: NAME\\nAction Input: ARGS_JSON"``.
``qwen``
    Qwen2.5's ``# Tools`` block with one JSON object per tool inside ``<tools></tools>``; a call is
    ``"<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>"``.
``llama3``
    Llama 3.1 JSON tool calling (``Cutting Knowledge Date``/``Today Date`` header, date fixed to the Llama 3.1
    chat template's default ``26 Jul 2024`` so encodings are reproducible); a call is
    ``{"name": ..., "parameters": ...}``.
``mistral``
    ``[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]``; a call is a JSON list of ``{"name", "arguments"}``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Optional

from llmtune.errors import LLMTuneError, nearest

_DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n'
    "```\n"
)

_QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)

_LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tool_text}"
)

TOOL_FORMATS = ("default", "qwen", "llama3", "mistral")


def _unwrap(tool: dict) -> dict:
    return tool.get("function", {}) if tool.get("type") == "function" else tool


def _wrap(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def parse_tools(tools: Any) -> list[dict]:
    """Parse a tools value (JSON string, list or dict) into a list of tool dicts; ``""``/None -> ``[]``.

    Raises:
        ValueError: the string is not JSON (the caller names the dataset and row).
    """
    if tools is None or tools == "":
        return []
    if isinstance(tools, str):
        tools = json.loads(tools)
    if isinstance(tools, dict):
        tools = [tools]
    return list(tools)


def format_tools(tools: list[dict], tool_format: str) -> str:
    """Text describing ``tools`` (list of JSON-schema function dicts) in ``tool_format``; ``""`` if empty."""
    if not tools:
        return ""
    check_tool_format(tool_format)
    if tool_format == "default":
        text, names = "", []
        for tool in map(_unwrap, tools):
            params = tool.get("parameters", {}) or {}
            args = ""
            for name, param in (params.get("properties", {}) or {}).items():
                required = ", required" if name in params.get("required", []) else ""
                enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
                items = (", where each item should be {}".format(param["items"].get("type", ""))
                         if param.get("items") else "")
                args += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
            text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{args}\n"
            names.append(tool["name"])
        return _DEFAULT_PROMPT.format(tool_text=text, tool_names=", ".join(names))
    if tool_format == "qwen":
        text = "".join("\n" + json.dumps(_wrap(t), ensure_ascii=False) for t in tools)
        return _QWEN_PROMPT.format(tool_text=text)
    if tool_format == "llama3":
        text = "".join(json.dumps(_wrap(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
        return _LLAMA3_PROMPT.format(tool_text=text)
    return "[AVAILABLE_TOOLS] " + json.dumps([_wrap(t) for t in tools], ensure_ascii=False) + "[/AVAILABLE_TOOLS]"


def format_call(content: str, tool_format: str) -> str:
    """Text of an assistant function call whose ``content`` is ``{"name", "arguments"}`` JSON (or a list).

    Raises:
        ValueError: ``content`` is not such JSON (the caller names the dataset and row).
    """
    check_tool_format(tool_format)
    calls = json.loads(content)
    if not isinstance(calls, list):
        calls = [calls]
    pairs = [(c["name"], c.get("arguments", {})) for c in calls]
    if tool_format == "default":
        return "\n".join(f"Action: {n}\nAction Input: {json.dumps(a, ensure_ascii=False)}" for n, a in pairs)
    if tool_format == "qwen":
        return "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False) + "\n</tool_call>"
                         for n, a in pairs)
    if tool_format == "llama3":
        objs = [{"name": n, "parameters": a} for n, a in pairs]
        return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)
    return json.dumps([{"name": n, "arguments": a} for n, a in pairs], ensure_ascii=False)


def _json_objects(text: str) -> Optional[list]:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    objs = obj if isinstance(obj, list) else [obj]
    return objs if objs and all(isinstance(o, dict) for o in objs) else None


def _call(name: Any, args: Any) -> Optional[dict]:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):   # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args if args is not None else {},
                                                               ensure_ascii=False)}}


_ACTION = re.compile(r"Action:\s*(.+?)\s*Action Input:\s*(.+?)(?=\s*Action:|\Z)", re.S)
_QWEN = re.compile(r"<tool_call>\s*(.+?)\s*</tool_call>", re.S)


def find_tool_calls(text: str, tool_format: str) -> tuple[int, list]:
    """``(index where the first call starts, OpenAI tool_calls)``; ``(-1, [])`` without a (well-formed) call."""
    calls: list = []
    start = None
    if tool_format == "default":
        for m in _ACTION.finditer(text):
            try:
                args = json.loads(m.group(2).strip())
            except ValueError:
                return -1, []
            calls.append(_call(m.group(1).strip(), args))
            start = m.start() if start is None else start
    elif tool_format == "qwen":
        for m in _QWEN.finditer(text):
            objs = _json_objects(m.group(1))
            if objs is None:
                return -1, []
            calls += [_call(o.get("name"), o.get("arguments")) for o in objs]
            start = m.start() if start is None else start
    else:
        body = text.strip()
        if tool_format == "mistral" and body.startswith("[TOOL_CALLS]"):
            body = body[len("[TOOL_CALLS]"):].strip()
        objs = _json_objects(body) if body[:1] in "[{" and body else None
        if objs is not None:
            key = "parameters" if tool_format == "llama3" else "arguments"
            calls = [_call(o.get("name"), o.get(key, o.get("arguments"))) for o in objs]
            start = 0
    if not calls or any(c is None for c in calls):
        return -1, []
    return start, calls


def parse_tool_calls(text: str, tool_format: str) -> tuple[Optional[str], list]:
    """Find the tool calls in a reply written in ``tool_format``.

    Args:
        text: the reply (str); tool_format: ``default``, ``qwen``, ``llama3`` or ``mistral``.

    Returns:
        ``(content, tool_calls)``: with calls, ``content`` is the text before the first call (None when
        empty) and ``tool_calls`` OpenAI's list (``{"id", "type": "function", "function": {"name",
        "arguments": JSON str}}``); without (or with a malformed call), ``(text, [])``.
    """
    start, calls = find_tool_calls(text, tool_format)
    if not calls:
        return text, []
    content = text[:start].strip()
    return (content or None), calls


#: the text that begins a call in the formats where a call may follow some prose


def check_tool_format(name: str) -> None:
    """Raise :class:`LLMTuneError` naming ``tool_format`` when ``name`` is not a known tool format."""
    if name not in TOOL_FORMATS:
        raise LLMTuneError(f"tool_format: unknown tool format {name!r}; known: {', '.join(TOOL_FORMATS)}."
                           + nearest(name, TOOL_FORMATS))


def _as_list(value: Any) -> list:
    """``None`` -> ``[]``, an int -> ``[int]``, an iterable -> list (for ``eos_token_ids``)."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return list(value)
