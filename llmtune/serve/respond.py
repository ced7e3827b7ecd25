"""The response side of ``llmtune api``: a job's token events -> OpenAI's JSON responses and stream chunks.

:func:`collect` waits for every choice and builds one ``chat.completion`` / ``text_completion`` object;
:func:`sse` yields server-sent events (``data: <chunk json>\\n\\n``, then ``data: [DONE]\\n\\n``). Both cancel
the job when the client leaves, when the request timeout passes, or (one choice) when a stop string ends it.

Source: the OpenAI API reference for the object shapes (chat.completion, chat.completion.chunk with
``stream_options.include_usage``, text_completion with its ``logprobs`` object).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Optional

from llmtune.errors import LLMTuneError
from llmtune.serve.protocol import APIError, GenParams, TextStream, error_body, new_id, now
from llmtune.serve.tools import ToolStream

__all__ = ["collect", "sse"]


class _Choice:
    """One choice's text, finish reason, token count and log-prob entries."""

    def __init__(self, index: int, tokenizer: Any, stop_ids: list, stop: tuple) -> None:
        self.index = index
        self.text = TextStream(tokenizer, stop_ids, stop)
        self.stop_ids = set(stop_ids)
        self.finish: Optional[str] = None
        self.tokens = 0
        self.entries: list = []     # (token text, logprob, [(text, logprob)...]) of this choice


def _feed(c: _Choice, e: Any) -> tuple[str, list]:
    """Apply one event to its choice; returns (new text, new log-prob entries)."""
    c.tokens += 1
    entries = []
    if e.logprob is not None and e.token not in c.stop_ids:
        tops = [(c.text.token_text(t), lp) for t, lp in (e.top_logprobs or [])]
        entries.append((c.text.token_text(e.token), e.logprob, tops))
        c.entries += entries
    piece = c.text.push(e.token)
    if e.finish_reason is not None:
        piece += c.text.flush()
        c.finish = "stop" if c.text.stopped else e.finish_reason
    elif c.text.stopped:
        c.finish = "stop"
    return piece, entries


async def _steps(state: Any, job: Any, request: Any, poll_disconnect: bool) -> AsyncIterator[list]:
    """The job's event lists until every row has finished or was cancelled by the caller.

    Raises:
        APIError: 504 past the request timeout, 503 cancelled by a shutdown, 400/500 the engine refused or failed.
    """
    deadline = time.monotonic() + state.request_timeout
    checked = time.monotonic()
    while True:
        t = time.monotonic()
        left = deadline - t
        if left <= 0:
            raise APIError(504, f"the request took longer than the server's request timeout "
                                f"({state.request_timeout:g} s)", None, "timeout")
        if poll_disconnect and t - checked >= 0.5:      # a client that left: its rows leave at once
            checked = t
            if await request.is_disconnected():
                return
        try:
            item = await asyncio.wait_for(job.events.get(), timeout=min(left, 0.5))
        except asyncio.TimeoutError:
            continue
        if item is None:
            raise APIError(503, "the server shut down before the reply was complete", None, "shutting_down")
        if isinstance(item, LLMTuneError):
            failed = str(item).startswith("generation failed")
            raise APIError(500 if failed else 400, str(item), None, "server_error" if failed else "invalid_value")
        yield item


def _chat_lp(entries: list) -> dict:
    def one(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return {"content": [dict(one(t, lp), top_logprobs=[one(a, b) for a, b in tops]) for t, lp, tops in entries]}


def _text_lp(entries: list, offset: int = 0) -> dict:
    toks, offs = [], []
    for t, _, _ in entries:
        offs.append(offset)
        toks.append(t)
        offset += len(t)
    return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{a: b for a, b in tops} for _, _, tops in entries], "text_offset": offs}


def _usage(n_prompt: int, choices: list) -> dict:
    done = sum(c.tokens for c in choices)
    return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}


def _choices(state: Any, job: Any, p: GenParams, chat: bool) -> list:
    return [_Choice(i, state.tokenizer, state.chat_stop_ids if chat else state.text_stop_ids, p.stop)
            for i in range(job.n)]


def _route(state: Any, job: Any, choices: list, events: list) -> list:
    """Feed events to choices; returns ``[(choice, piece, entries)]``; cancels a row a stop string ended."""
    out = []
    for e in events:
        c = choices[job.index[e.request_id]]
        if c.finish is not None:
            continue
        piece, entries = _feed(c, e)
        if c.finish is not None and e.finish_reason is None:
            state.scheduler.cancel(job, e.request_id)
        out.append((c, piece, entries))
    return out


async def collect(state: Any, job: Any, p: GenParams, n_prompt: int, request: Any, chat: bool) -> dict:
    """Wait for every choice of ``job``; returns the ``chat.completion`` (``chat``) or ``text_completion`` dict.

    Raises:
        APIError: see :func:`_steps`; the job is cancelled on any error and when the client disconnects.
    """
    choices = _choices(state, job, p, chat)
    texts = [""] * job.n
    try:
        async for events in _steps(state, job, request, poll_disconnect=True):
            for c, piece, _ in _route(state, job, choices, events):
                texts[c.index] += piece
            if all(c.finish is not None for c in choices):
                break
    finally:
        if any(c.finish is None for c in choices):
            state.scheduler.cancel(job)
    out = []
    for c in choices:
        if chat:
            message: dict = {"role": "assistant", "content": texts[c.index]}
            finish = c.finish
            if p.parse_tools:
                from llmtune.serve.tools import parse_tool_calls

                content, calls = parse_tool_calls(texts[c.index], getattr(state.template, "tool_format", "default"))
                if calls:
                    message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            out.append({"index": c.index, "message": message,
                        "logprobs": _chat_lp(c.entries) if p.logprobs else None, "finish_reason": finish})
        else:
            out.append({"index": c.index, "text": texts[c.index],
                        "logprobs": _text_lp(c.entries) if p.logprobs else None, "finish_reason": c.finish})
    kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    return {"id": new_id(kind[0]), "object": kind[1], "created": now(), "model": p.model or state.model_id,
            "choices": out, "usage": _usage(n_prompt, choices)}


def _event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse(state: Any, job: Any, p: GenParams, n_prompt: int, chat: bool) -> AsyncIterator[str]:
    """Server-sent events of ``job``: chunks as tokens arrive, a last chunk per choice with its
    ``finish_reason`` (it carries ``usage`` too), a usage-only chunk when ``stream_options.include_usage``,
    then ``data: [DONE]``. An error after the stream began is one ``data: {"error": ...}`` event. The job is
    cancelled when the client leaves (the generator is closed or cancelled).

    With ``tools`` (``p.parse_tools``), prose streams as ``content`` while a tool call is held back from where
    it may begin (:class:`~llmtune.serve.tools.ToolStream`); when the choice ends, its calls go out in one
    chunk as ``delta.tool_calls`` (each with ``index``, ``id``, ``type``, ``function.name`` and the whole
    ``function.arguments``), then the last chunk with ``finish_reason`` ``"tool_calls"``; a reply without a
    well-formed call streams whole as text."""
    choices = _choices(state, job, p, chat)
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(items: list, usage: Optional[dict] = None) -> str:
        d = {"id": rid, "object": obj, "created": created, "model": p.model or state.model_id, "choices": items}
        if usage is not None:
            d["usage"] = usage
        return _event(d)

    def item(c: _Choice, piece: str, entries: list, first: bool = False) -> dict:
        if chat:
            delta: dict = {"role": "assistant", "content": piece} if first else ({"content": piece} if piece else {})
            lp = _chat_lp(entries) if p.logprobs and entries else None
            return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": c.finish}
        lp = _text_lp(entries) if p.logprobs and entries else None
        return {"index": c.index, "text": piece, "logprobs": lp, "finish_reason": c.finish}

    fmt = getattr(state.template, "tool_format", "default")
    calls = [ToolStream(fmt) if chat and p.parse_tools else None for _ in choices]

    try:
        if chat:
            yield chunk([dict(item(c, "", [], first=True), finish_reason=None) for c in choices])
        async for events in _steps(state, job, None, poll_disconnect=False):
            for c, piece, entries in _route(state, job, choices, events):
                found = []
                if calls[c.index] is not None:      # tools: a call is held back and parsed at the end
                    piece = calls[c.index].push(piece)
                    if c.finish is not None:
                        rest, found = calls[c.index].finish()
                        piece += rest
                if c.finish is not None:
                    last_usage = _usage(n_prompt, choices) if all(x.finish for x in choices) else None
                    if found:
                        c.finish = "tool_calls"
                        delta = {"content": piece} if piece else {}
                        delta["tool_calls"] = [dict(call, index=k) for k, call in enumerate(found)]
                        yield chunk([{"index": c.index, "delta": delta, "logprobs": _chat_lp(entries)
                                      if p.logprobs and entries else None, "finish_reason": None}])
                        piece, entries = "", []
                    yield chunk([item(c, piece, entries)], last_usage)
                elif piece or entries:
                    yield chunk([item(c, piece, entries)])
            if all(c.finish is not None for c in choices):
                break
        if p.include_usage:
            yield chunk([], _usage(n_prompt, choices))
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield _event(error_body(e.status, e.message, e.param, e.code))
        yield "data: [DONE]\n\n"
    finally:
        if any(c.finish is None for c in choices):
            state.scheduler.cancel(job)
