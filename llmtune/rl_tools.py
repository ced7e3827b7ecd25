"""Tools in online-RL rollouts: the policy calls Python functions, sees their results and answers (stage grpo).

* **Loading** (:func:`load_tools`): the ``tools`` key, a comma list of ``path/to/file.py:function`` or
  ``package.module:function`` (the loader of ``reward_funcs``, :func:`llmtune.rewards.load_callable`).
* **Schemas** (:func:`function_schema`): each function's JSON schema, built from its signature (type hints) and
  its Google-style docstring (first paragraph = description, ``Args:`` lines = parameter descriptions), in the
  OpenAI / ``transformers.utils.get_json_schema`` layout ``{"type": "function", "function": {"name",
  "description", "parameters": {"type": "object", "properties", "required"}}}``. The prompts are encoded with
  these schemas as the template's tools (:class:`ToolsTemplate`; a dataset's ``tools`` column is kept and merged).
* **Running** (:func:`call_tool`): a call runs in a daemon thread joined with a deadline of ``tool_timeout``
  seconds; a tool that raises, times out, is unknown or gets arguments that are not a JSON object gives the model
  ``{"error": "..."}`` as its result (TRL's convention), and the run goes on. A timed-out call's thread is left
  running in the background (Python cannot stop a thread; it is a daemon, so it never keeps the process alive).
* **Multi-turn rollouts** (:func:`generate_tool_rollouts`): the first turn is :func:`llmtune.rollout.generate_rollouts`
  (the group's prompt prefilled once); each completion that ends with a tool call in the template's
  ``tool_format`` (:func:`llmtune.data.templates.tools.parse_tool_calls`) gets the results appended as one
  observation (tool) turn rendered by the template (:func:`tool_suffix_ids`) and generation continues from the
  whole sequence (a new prefill on the engine), until a turn without a call, ``max_tool_turns`` tool turns, or the
  ``max_new_tokens`` budget of the whole completion (tool-result tokens count in it, as in TRL). Tool-result
  tokens (with the template's framing of the tool turn) are in the sequence but carry ``completion_mask`` 0.

Source: TRL's ``GRPOTrainer`` tool loop (``tools``, ``max_tool_calling_iterations``, the tool mask, the suffix
taken from a dummy conversation cut after the end-of-turn token, ``{"error": ...}`` results, the metrics
``tools/call_frequency`` and ``tools/failure_frequency``); the schema layout of ``transformers``' chat templating
docs (``get_json_schema``).
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from llmtune.data.templates.tools import parse_tool_calls, parse_tools
from llmtune.engine import Engine, Request
from llmtune.errors import LLMTuneError
from llmtune.rewards import load_callable
from llmtune.rollout import Rollout, generate_rollouts
from llmtune.sampling import SamplingParams, stop_id_list

__all__ = ["function_schema", "load_tools", "call_tool", "ToolsTemplate", "tool_suffix_ids", "ToolRollout",
           "generate_tool_rollouts", "tool_metrics"]

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", tuple: "array",
               dict: "object", type(None): "null"}


def _type_schema(hint: Any) -> dict:
    """JSON schema of one type hint (``int``, ``list[str]``, ``Optional[float]``, ``Literal["a", "b"]``...)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        kinds = {_JSON_TYPES.get(type(a), "string") for a in args}
        return {"type": kinds.pop() if len(kinds) == 1 else sorted(kinds), "enum": list(args)}
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        subs = [_type_schema(a) for a in args if a is not type(None)]
        if len(subs) == 1:
            out = dict(subs[0])
            if type(None) in args:
                out["nullable"] = True
            return out
        types = sorted({s.get("type") for s in subs if isinstance(s.get("type"), str)})
        out = {"type": types} if types else {}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin in (list, tuple, set, frozenset, typing.List):
        out = {"type": "array"}
        if args and args[0] is not Ellipsis:
            item = _type_schema(args[0])
            if item:
                out["items"] = item
        return out
    if origin is dict:
        return {"type": "object"}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    return {}


_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """``(description, {param: description})`` from a Google-style docstring (the ``Args:`` section)."""
    doc = inspect.cleandoc(doc or "")
    lines = doc.splitlines()
    sections = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?):\s*$")
    desc_lines: list[str] = []
    i = 0
    while i < len(lines) and not sections.match(lines[i]):
        desc_lines.append(lines[i])
        i += 1
    params: dict[str, str] = {}
    current: Optional[str] = None
    in_args, indent = False, None
    for line in lines[i:]:
        m = sections.match(line)
        if m:
            in_args, current, indent = m.group(1) in ("Args", "Arguments", "Parameters"), None, None
            continue
        if not in_args or not line.strip():
            continue
        lead = len(line) - len(line.lstrip())
        am = _ARG_LINE.match(line)
        if am and (indent is None or lead <= indent):
            indent = lead
            current = am.group(1).lstrip("*")
            params[current] = am.group(2).strip()
        elif current is not None:
            params[current] = (params[current] + " " + line.strip()).strip()
    return " ".join(" ".join(desc_lines).split()), params


def function_schema(fn: Callable[..., Any]) -> dict:
    """The tool schema of ``fn`` from its signature and docstring.

    Args:
        fn: a Python function. Parameters with type hints get a JSON ``type`` (``int`` -> ``integer``, ``float`` ->
            ``number``, ``str`` -> ``string``, ``bool`` -> ``boolean``, ``list[X]`` -> ``array`` with ``items``,
            ``dict`` -> ``object``, ``Optional[X]`` -> X with ``nullable``, ``Literal[...]`` -> ``enum``); parameters
            without a default are ``required``; ``*args`` / ``**kwargs`` are left out.

    Returns:
        ``{"type": "function", "function": {"name": fn.__name__, "description": first docstring paragraph,
        "parameters": {"type": "object", "properties": {name: {"type", "description"}}, "required": [...]}}}``
        (``required`` only when non-empty), the layout of ``transformers.utils.get_json_schema``.

    Raises:
        LLMTuneError: ``fn`` is not callable or has no inspectable signature.
    """
    if not callable(fn):
        raise LLMTuneError(f"tools: {fn!r} is not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise LLMTuneError(f"tools: the signature of {fn!r} cannot be read; wrap it in a plain Python function") \
            from None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: use the raw ones
        hints = {}
    description, docs = _docstring_parts(inspect.getdoc(fn) or "")
    props: dict[str, dict] = {}
    required: list[str] = []
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        schema = _type_schema(hints.get(name, p.annotation))
        if name in docs and docs[name]:
            schema["description"] = docs[name]
        props[name] = schema
        if p.default is inspect.Parameter.empty:
            required.append(name)
    params: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        params["required"] = required
    return {"type": "function", "function": {"name": getattr(fn, "__name__", "tool"), "description": description,
                                             "parameters": params}}


def load_tools(spec: Optional[str | Sequence[str]]) -> list[tuple[str, Callable[..., Any]]]:
    """Resolve the ``tools`` key to ``[(name, function)]`` in the given order (``[]`` for None / empty).

    Args:
        spec: a comma-separated str (or a list) of ``path/to/file.py:function`` / ``package.module:function``.

    Raises:
        LLMTuneError: one line naming ``tools`` and the entry: a missing file or module, a missing or non-callable
            function, or two tools with the same name.
    """
    if spec is None:
        return []
    entries = [e.strip() for e in (spec.split(",") if isinstance(spec, str) else spec)]
    out: list[tuple[str, Callable[..., Any]]] = []
    for e in (e for e in entries if e):
        fn = load_callable(e, "tools")
        name = getattr(fn, "__name__", e.rsplit(":", 1)[1])
        if name in dict(out):
            raise LLMTuneError(f"tools: two tools are named {name!r} ({e!r}); the model calls tools by name, so "
                               "names must differ")
        out.append((name, fn))
    return out


def _result_text(value: Any) -> str:
    """A tool's return value as the text of its tool message: a str as is, else JSON (``str()`` of the rest)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def call_tool(tools: dict[str, Callable[..., Any]], name: str, arguments: Any, timeout: float) -> tuple[str, bool]:
    """Run one tool call with a deadline; never raises.

    Args:
        tools: ``{name: function}``; name: the called tool's name (str); arguments: the parsed arguments (a dict,
            or a JSON string of one); timeout: seconds (float > 0) to wait for the result.

    Returns:
        ``(result_text, ok)``: the return value as text (:func:`_result_text`) and True; or ``{"error": "..."}``
        JSON and False when the tool is unknown, the arguments are not a JSON object, it raises (the exception's
        type and message), or it runs past ``timeout`` (its daemon thread is abandoned).
    """
    fn = tools.get(name)
    if fn is None:
        return _error(f"Tool {name} not found. Available tools: {', '.join(sorted(tools)) or 'none'}"), False
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            return _error(f"the arguments of {name} are not JSON: {arguments[:200]}"), False
    if not isinstance(arguments, dict):
        return _error(f"the arguments of {name} must be a JSON object, got {type(arguments).__name__}"), False
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(**arguments)
        except BaseException as exc:  # noqa: BLE001 - any failure becomes the model's error message
            box["error"] = exc

    worker = threading.Thread(target=run, name=f"llmtune-tool-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return _error(f"{name} timed out after {timeout:g} s"), False
    if "error" in box:
        exc = box["error"]
        return _error(f"{name} raised {type(exc).__name__}: {exc}"), False
    return _result_text(box.get("value")), True


class ToolsTemplate:
    """A chat template whose prompts also list ``tools`` (the ``tools`` key's schemas) next to a row's own tools.

    Wraps a :class:`~llmtune.data.templates.Template` or :class:`~llmtune.data.templates.JinjaTemplate`: every
    attribute is the wrapped one's, and :meth:`encode_turns` / :meth:`encode_prompt` pass the row's tools (JSON
    str or list, or None) followed by those of ``tools`` whose names the row does not already define.
    """

    def __init__(self, template: Any, tools: Sequence[dict]) -> None:
        self.template, self.tools = template, list(tools)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["template"], name)

    def merged(self, tools: Any) -> Optional[list]:
        """The row's tools (parsed) then the extra ones not named by the row; None when there are none."""
        own = parse_tools(tools)
        names = {(t.get("function") or t).get("name") for t in own}
        out = own + [t for t in self.tools if t["function"]["name"] not in names]
        return out or None

    def encode_turns(self, messages: Sequence[dict], system: Optional[str] = None, tools: Any = None) -> list:
        """The wrapped ``encode_turns`` with :meth:`merged` tools."""
        return self.template.encode_turns(messages, system, self.merged(tools))

    def encode_prompt(self, messages: Sequence[dict], system: Optional[str] = None, tools: Any = None) -> list[int]:
        """The wrapped ``encode_prompt`` with :meth:`merged` tools."""
        return self.template.encode_prompt(messages, system, self.merged(tools))


def tool_suffix_ids(template: Any, name: str, result: str) -> list[int]:
    """Token ids that follow an assistant tool-call turn's end-of-turn token: the rest of that turn's framing, the
    observation (tool) turn holding ``result`` and the next assistant header, as the template renders them.

    Rendered from a dummy conversation (user, the call, the result), cut after the last end-of-turn id
    (``template.stop_token_ids[0]``) of the conversation without the result (TRL's ``_get_tool_suffix_ids``).

    Raises:
        LLMTuneError: the template renders the call turn differently with and without the result after it.
    """
    call = {"role": "function", "content": json.dumps({"name": name, "arguments": {}})}
    user = {"role": "user", "content": "dummy"}
    prefix: list[int] = []
    for p, r in template.encode_turns([user, call]):
        prefix += p + r
    eot = template.stop_token_ids[0]
    cut = max((i for i, t in enumerate(prefix) if t == eot), default=len(prefix) - 1)
    prefix = prefix[:cut + 1]
    full = template.encode_prompt([user, call, {"role": "observation", "content": result}])
    if full[:len(prefix)] != prefix:
        raise LLMTuneError(f"template {getattr(template, 'name', '?')!r}: a tool call turn renders differently "
                           "before a tool result; tool rollouts need a template that only appends the tool turn")
    return full[len(prefix):]


@dataclass
class ToolRollout:
    """A multi-turn rollout: :attr:`rollout` (its ``completion_mask`` is 0 on tool-result tokens, which its
    ``attention_mask`` keeps), ``conversations`` (per row, the completion as messages: ``{"role": "assistant",
    "content", "tool_calls"?}`` and ``{"role": "tool", "name", "content"}``, TRL's conversational completions),
    and per-row ``tool_calls`` / ``tool_failures`` counts (``(N,)`` int64)."""

    rollout: Rollout
    conversations: list
    tool_calls: torch.Tensor
    tool_failures: torch.Tensor


def generate_tool_rollouts(model: nn.Module, prompts: Sequence[Sequence[int]], *, tokenizer: Any, template: Any,
                           tools: dict[str, Callable[..., Any]], max_new_tokens: int, max_tool_turns: int = 2,
                           tool_timeout: float = 5.0, num_return_sequences: int = 1,
                           eos_token_ids: Optional[Sequence[int]] = None, pad_token_id: int = 0,
                           return_logps: bool = False, generator: Optional[torch.Generator] = None,
                           **sampling: Any) -> ToolRollout:
    """Rollouts in which the policy may call ``tools`` (module docstring).

    Args:
        model, prompts, max_new_tokens, num_return_sequences, eos_token_ids, pad_token_id, return_logps, generator:
            as :func:`llmtune.rollout.generate_rollouts`; ``max_new_tokens`` bounds the whole completion (every
            generated and every tool-result token).
        tokenizer: decodes each turn (``decode(ids, skip_special_tokens=True)``) for parsing.
        template: the chat template (its ``tool_format`` and its rendering of a tool turn).
        tools: ``{name: function}``; max_tool_turns: tool turns per completion (int >= 0); tool_timeout: seconds.
        **sampling: ``do_sample``, ``temperature``, ``top_p``, ``top_k``.

    Returns:
        a :class:`ToolRollout`; rows as :func:`~llmtune.rollout.generate_rollouts` (row ``i`` is completion
        ``i % num_return_sequences`` of prompt ``i // num_return_sequences``). A tool result that would leave no
        budget is not appended (the completion ends with its call, as TRL does).

    Raises:
        LLMTuneError: bad generation settings (:func:`~llmtune.rollout.generate_rollouts`), ``tool_timeout <= 0``
            or ``max_tool_turns < 0``.
    """
    if not tool_timeout > 0:
        raise LLMTuneError(f"tool_timeout must be > 0 seconds (got {tool_timeout})")
    if max_tool_turns < 0:
        raise LLMTuneError(f"max_tool_turns must be >= 0 (got {max_tool_turns})")
    first = generate_rollouts(model, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                              pad_token_id=pad_token_id, num_return_sequences=num_return_sequences,
                              return_logps=return_logps, generator=generator, **sampling)
    rows = [list(r) for r in prompts for _ in range(num_return_sequences)]
    n = len(rows)
    parts: list[list[tuple[list[int], bool]]] = [[(c, True)] for c in first.completions()]
    lps: list[list[float]] = ([first.logps[i, :len(parts[i][0][0])].tolist() for i in range(n)]
                              if return_logps else [[] for _ in range(n)])
    stopped = [not bool(t) for t in first.truncated.tolist()]
    convs: list[list[dict]] = [[] for _ in range(n)]
    calls, fails = [0] * n, [0] * n
    fmt = getattr(template, "tool_format", "default")
    stop = stop_id_list(eos_token_ids)
    params = SamplingParams(bool(sampling.get("do_sample", True)), float(sampling.get("temperature", 1.0)),
                            int(sampling.get("top_k", 0)), float(sampling.get("top_p", 1.0)))
    active = list(range(n))
    for turn in range(max_tool_turns + 1):
        cont: list[tuple[int, list[int], int]] = []   # (row, sequence so far, budget left)
        for i in active:
            text = tokenizer.decode(parts[i][-1][0], skip_special_tokens=True)
            content, found = parse_tool_calls(text, fmt) if turn < max_tool_turns and stopped[i] else (text, [])
            if not found:
                convs[i].append({"role": "assistant", "content": text})
                continue
            convs[i].append({"role": "assistant", "content": content or "", "tool_calls": found})
            results = []
            for c in found:
                out, ok = call_tool(tools, c["function"]["name"], c["function"]["arguments"], tool_timeout)
                calls[i], fails[i] = calls[i] + 1, fails[i] + (not ok)
                results.append((c["function"]["name"], out))
            suffix = tool_suffix_ids(template, results[0][0], "\n".join(r for _, r in results))
            used = sum(len(t) for t, _ in parts[i])
            if used + len(suffix) >= max_new_tokens:   # no budget left for an answer: end with the call
                continue
            convs[i] += [{"role": "tool", "name": nm, "content": r} for nm, r in results]
            parts[i].append((suffix, False))
            lps[i] += [0.0] * len(suffix)
            seq = rows[i] + [t for toks, _ in parts[i] for t in toks]
            cont.append((i, seq, max_new_tokens - used - len(suffix)))
        if not cont:
            break
        engine = Engine(model, max_slots=len(cont), max_len=max(len(s) + b for _, s, b in cont), draw="inverse_cdf")
        done = engine.run([Request(s, b, params, stop, generator, logprobs=return_logps) for _, s, b in cont])
        for (i, _, _), d in zip(cont, done):
            parts[i].append((list(d.tokens), True))
            if return_logps:
                lps[i] += list(d.logprobs)
            stopped[i] = d.finish_reason == "stop"
        active = [i for i, _, _ in cont]
    return ToolRollout(_assemble(rows, parts, lps if return_logps else None, stopped, pad_token_id,
                                 first.input_ids.device), convs,
                       torch.tensor(calls, dtype=torch.long), torch.tensor(fails, dtype=torch.long))


def _assemble(rows: list[list[int]], parts: list[list[tuple[list[int], bool]]], lps: Optional[list[list[float]]],
              stopped: list[bool], pad: int, device: torch.device) -> Rollout:
    """The :class:`Rollout` of multi-turn rows: ``parts[i]`` is row ``i``'s completion as ``(tokens, trained)``
    pieces (generated: True, tool turns: False)."""
    n, p = len(rows), max(len(r) for r in rows)
    comp = [[t for toks, _ in ps for t in toks] for ps in parts]
    train = [[int(k) for toks, k in ps for _ in toks] for ps in parts]
    c = max(1, max(len(x) for x in comp))
    input_ids = torch.full((n, p + c), pad, dtype=torch.long)
    attention_mask = torch.zeros(n, p + c, dtype=torch.long)
    completion_mask = torch.zeros(n, c, dtype=torch.long)
    logps = torch.zeros(n, c, dtype=torch.float32) if lps is not None else None
    for i, (r, x, m) in enumerate(zip(rows, comp, train)):
        input_ids[i, p - len(r):p] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, p - len(r):p + len(x)] = 1
        if x:
            input_ids[i, p:p + len(x)] = torch.tensor(x, dtype=torch.long)
            completion_mask[i, :len(x)] = torch.tensor(m, dtype=torch.long)
        if logps is not None and lps[i]:
            logps[i, :len(lps[i])] = torch.tensor(lps[i], dtype=torch.float32)
    lengths = torch.tensor([len(x) for x in comp], dtype=torch.long)
    return Rollout(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), prompt_len=p,
                   completion_mask=completion_mask.to(device), logps=None if logps is None else logps.to(device),
                   truncated=~torch.tensor(stopped, dtype=torch.bool, device=device),
                   completion_lengths=lengths.to(device))


def tool_metrics(tool_calls: torch.Tensor, tool_failures: torch.Tensor) -> dict[str, float]:
    """TRL's tool metrics of a step: ``tools/call_frequency`` (calls per completion) and
    ``tools/failure_frequency`` (failed calls per call, 0 without calls). Args: ``(N,)`` counts (all ranks)."""
    total = float(tool_calls.sum())
    return {"tools/call_frequency": total / max(1, tool_calls.numel()),
            "tools/failure_frequency": float(tool_failures.sum()) / total if total else 0.0}
