"""Convert raw rows (alpaca / sharegpt / OpenAI-style) into one internal :class:`Example`.

Internal example: ``system`` (str), ``tools`` (JSON string or ""), ``prompt`` (messages ending with a user or
observation message; earlier assistant turns included) and ``responses`` whose meaning is ``kind``:

* ``"sft"``: one response (``{"role": "assistant"|"function", "content"}``);
* ``"pair"``: ``[chosen, rejected]``;
* ``"ranked"``: several responses ranked best first (the seed's reward-model format: an alpaca ``output``
  that is a list); every ordered pair ``(i < j)`` is a (chosen, rejected) pair;
* ``"kto"``: one response and ``kto_tag`` (True desirable / False undesirable);
* ``"prompt"``: no response (pre-training text or PPO prompts).

Formats follow LLaMA-Factory's ``data/README.md`` and ``converter.py`` (facts only):

alpaca
    ``{"instruction", "input", "output", "system", "history": [[q, a], ...]}``; the user message is
    ``instruction + "\\n" + input`` (empty parts dropped). Preference rows have ``chosen``/``rejected`` strings,
    KTO rows a ``kto_tag`` column.
sharegpt
    ``{"conversations": [{"from": "human"|"gpt"|"observation"|"function_call"|"system", "value"}], "system",
    "tools"}`` (tag names configurable with ``tags``; OpenAI-style ``role``/``content`` auto-detected). Roles
    must alternate (human|observation) then (gpt|function_call); a malformed conversation is skipped and
    counted. Preference rows: the conversation ends with a human message and ``chosen``/``rejected`` are single
    messages (dicts) or strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from llmtune.data.registry import DEFAULT_COLUMNS, DEFAULT_TAGS, OPENAI_TAGS, DatasetAttr
from llmtune.data.templates import ASSISTANT, FUNCTION, OBSERVATION, USER, check_messages
from llmtune.errors import LLMTuneError


@dataclass
class Example:
    """One conversation in the internal format (see the module docstring)."""

    prompt: list
    responses: list = field(default_factory=list)
    kind: str = "sft"
    system: str = ""
    tools: str = ""
    kto_tag: Optional[bool] = None
    #: the row's ``images`` column (paths relative to ``dataset_dir``, or dicts): llmtune.data.multimodal
    images: list = field(default_factory=list)


def _tag_bool(value: Any) -> Optional[bool]:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    return None


class RowError(ValueError):
    """One column value of a row that cannot be used: ``role`` (our column role) and why (raised by the row
    converters, turned by :func:`convert` into one :class:`LLMTuneError` naming the file, row and column)."""

    def __init__(self, role: str, why: str) -> None:
        super().__init__(why)
        self.role, self.why = role, why


def _tools_str(value: Any) -> str:
    """A ``tools`` value as the JSON string the templates read; a string must hold JSON (LLaMA-Factory's format)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError("tools", f"is not JSON ({err.msg} at character {err.pos}); give the tool list as a JSON "
                                    "string or a list of objects") from None
        return value
    return json.dumps(value, ensure_ascii=False)


def _text(attr: DatasetAttr, row: dict, role: str) -> str:
    """A column that must hold text (``system``): ``""`` when absent or null."""
    value = _col(attr, row, role)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(role, f"must be text, not a {type(value).__name__} ({json.dumps(value)[:40]})")
    return value


def _history(attr: DatasetAttr, row: dict) -> list:
    """The alpaca ``history`` column as messages: a list of ``[question, answer]`` pairs of text."""
    history = _col(attr, row, "history")
    if history is None or history == [] or history == "":
        return []
    if not isinstance(history, list):
        raise RowError("history", f"must be a list of [question, answer] pairs, not a {type(history).__name__} "
                                  "(a lone string would be dropped)")
    out = []
    for k, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2
                and all(x is None or isinstance(x, str) for x in turn)):
            raise RowError("history", f"turn {k} is {json.dumps(turn)[:60]}, not a [question, answer] pair of "
                                      "text; write history as [[\"q1\", \"a1\"], [\"q2\", \"a2\"]]")
        out += [{"role": USER, "content": turn[0] or ""}, {"role": ASSISTANT, "content": turn[1] or ""}]
    return out


def detect_format(attr: DatasetAttr, rows: list[dict]) -> DatasetAttr:
    """Fill in ``formatting``/``columns``/``tags``/``ranking`` of a dataset given as a bare file path.

    sharegpt when a row has a ``conversations`` or ``messages`` list, else alpaca (``text`` -> prompt).
    """
    if attr.formatting != "auto":
        if attr.formatting == "sharegpt" and not attr.explicit_tags and rows:
            msgs = rows[0].get(attr.columns.get("messages", "conversations"))
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "from" not in msgs[0] \
                    and "role" in msgs[0]:
                attr.tags = dict(OPENAI_TAGS)
        return attr
    first = rows[0] if rows else {}
    msg_col = next((c for c in ("conversations", "messages") if isinstance(first.get(c), list)), None)
    if msg_col:
        attr.formatting = "sharegpt"
        attr.columns = {"messages": msg_col}
        msgs = first[msg_col]
        attr.tags = dict(OPENAI_TAGS if msgs and isinstance(msgs[0], dict) and "role" in msgs[0] else DEFAULT_TAGS)
        for c in ("system", "tools", "chosen", "rejected"):
            if c in first:
                attr.columns[c] = c
    else:
        attr.formatting = "alpaca"
        attr.columns = dict(DEFAULT_COLUMNS["alpaca"])
        if "text" in first and "instruction" not in first:
            attr.columns["prompt"] = "text"
        for c in ("system", "history", "tools", "chosen", "rejected"):
            if c in first:
                attr.columns[c] = c
    for c in ("kto_tag", "label"):
        if c in first and _tag_bool(first[c]) is not None and c in ("kto_tag", "label"):
            attr.columns["kto_tag"] = c
            break
    attr.ranking = "chosen" in attr.columns and "rejected" in attr.columns
    return attr


def check_columns(attr: DatasetAttr, rows: list[dict], where: str) -> None:
    """Raise when a column the user mapped explicitly (or the main column) is absent from the first row.

    Raises:
        LLMTuneError: names the dataset, the column and the keys the rows do have.
    """
    if not rows:
        return
    first = rows[0]
    needed = set(attr.explicit)
    needed.add("messages" if attr.formatting == "sharegpt" else "prompt")
    for role in sorted(needed):
        col = attr.columns.get(role)
        if col is not None and col not in first and role not in ("images", "videos", "audios"):
            raise LLMTuneError(f"dataset {attr.name!r}: column {col!r} (for {role}) is missing from the rows of "
                               f"{where}; the rows have: {', '.join(map(str, first.keys()))}. Fix \"columns\" in "
                               "dataset_info.json.")


def convert(attr: DatasetAttr, rows: list[dict], where: str = "") -> tuple[list[Example], int]:
    """Convert ``rows`` to examples; returns ``(examples, number_of_skipped_malformed_rows)``. ``where``: the
    file(s) the rows come from, for messages.

    Raises:
        LLMTuneError: a row that cannot be read (names dataset, file, row index and column).
    """
    fn = _alpaca if attr.formatting == "alpaca" else _sharegpt
    out, skipped = [], 0
    for i, row in enumerate(rows):
        try:
            ex = fn(attr, row)
        except RowError as err:
            raise LLMTuneError(f"dataset {attr.name!r}: {where + ', ' if where else ''}row {i}, column "
                               f"{attr.columns.get(err.role, err.role)!r}: {err.why}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise LLMTuneError(f"dataset {attr.name!r}: row {i} cannot be read as {attr.formatting} ({err!r}); "
                               "check \"formatting\", \"columns\" and \"tags\" in dataset_info.json.") from err
        if ex is None:
            skipped += 1
        else:
            images = _col(attr, row, "images")
            ex.images = list(images) if isinstance(images, (list, tuple)) else [images] if images else []
            out.append(ex)
    return out, skipped


def _col(attr: DatasetAttr, row: dict, role: str) -> Any:
    col = attr.columns.get(role)
    return row.get(col) if col is not None else None


def _alpaca(attr: DatasetAttr, row: dict) -> Optional[Example]:
    prompt: list = _history(attr, row)
    parts = [p for p in (_col(attr, row, "prompt"), _col(attr, row, "query")) if p]
    prompt.append({"role": USER, "content": "\n".join(str(p) for p in parts)})
    ex = Example(prompt=prompt, system=_text(attr, row, "system"), tools=_tools_str(_col(attr, row, "tools")))
    response = _col(attr, row, "response")
    chosen, rejected = _col(attr, row, "chosen"), _col(attr, row, "rejected")
    tag = _tag_bool(_col(attr, row, "kto_tag")) if "kto_tag" in attr.columns else None
    if tag is not None and isinstance(response, str):
        ex.kind, ex.kto_tag, ex.responses = "kto", tag, [{"role": ASSISTANT, "content": response}]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        ex.kind = "pair"
        ex.responses = [{"role": ASSISTANT, "content": chosen}, {"role": ASSISTANT, "content": rejected}]
    elif isinstance(response, list) and response and all(isinstance(r, str) for r in response):
        ex.responses = [{"role": ASSISTANT, "content": r} for r in response]
        ex.kind = "ranked" if len(response) > 1 else "sft"
    elif isinstance(response, str) and response != "":
        ex.kind, ex.responses = "sft", [{"role": ASSISTANT, "content": response}]
    else:
        ex.kind = "prompt"
    return ex


def _sharegpt(attr: DatasetAttr, row: dict) -> Optional[Example]:
    t = attr.tags
    role_map = {t["user_tag"]: USER, t["assistant_tag"]: ASSISTANT, t["observation_tag"]: OBSERVATION,
                t["function_tag"]: FUNCTION}
    messages = _col(attr, row, "messages")
    if not isinstance(messages, list):
        return None
    system = _text(attr, row, "system")
    if messages and messages[0].get(t["role_tag"]) == t["system_tag"]:
        system = messages[0].get(t["content_tag"]) or ""
        messages = messages[1:]
    aligned = []
    for m in messages:
        role = role_map.get(m.get(t["role_tag"]))
        if role is None:
            return None
        aligned.append({"role": role, "content": m.get(t["content_tag"]) or ""})
    ex = Example(prompt=aligned, system=system, tools=_tools_str(_col(attr, row, "tools")))
    chosen, rejected = _col(attr, row, "chosen"), _col(attr, row, "rejected")
    tag = _tag_bool(_col(attr, row, "kto_tag")) if "kto_tag" in attr.columns else None
    if attr.ranking and chosen is not None and rejected is not None:
        resp = [_one_message(attr, chosen, role_map), _one_message(attr, rejected, role_map)]
        if None in resp or check_messages(aligned, need_response_last=False):
            return None
        ex.kind, ex.responses = "pair", resp
        return ex
    if len(aligned) % 2 == 1:  # prompt only
        if check_messages(aligned, need_response_last=False):
            return None
        ex.kind = "prompt"
        return ex
    if check_messages(aligned, need_response_last=True):
        return None
    ex.prompt, ex.responses = aligned[:-1], aligned[-1:]
    if tag is not None:
        ex.kind, ex.kto_tag = "kto", tag
    return ex


def _one_message(attr: DatasetAttr, value: Any, role_map: dict) -> Optional[dict]:
    t = attr.tags
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, str):
        return {"role": ASSISTANT, "content": value}
    if isinstance(value, dict):
        role = role_map.get(value.get(t["role_tag"]), None)
        if role not in (ASSISTANT, FUNCTION):
            return None
        return {"role": role, "content": value.get(t["content_tag"]) or ""}
    return None
