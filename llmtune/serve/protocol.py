"""OpenAI's request and response shapes for ``llmtune api``: checking request bodies, building responses.

Every client mistake is an :class:`APIError` with an HTTP status and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: 400 a value out of range or a feature not supported,
401 a missing or wrong API key, 404 an unknown model or path, 413 a body over the size limit, 422 a field of the
wrong type or a missing required field, 429 the queue is full, 503 loading or shutting down, 504 the request
timeout. Nothing else reaches the client (no traceback).

Source: the OpenAI API reference (Chat Completions, Completions, Models, error codes:
https://platform.openai.com/docs/api-reference), and vLLM's OpenAI-compatible server for the extensions
(``top_k``, ``repetition_penalty``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from llmtune.serve.errors import APIError

__all__ = ["APIError", "GenParams", "parse_chat", "parse_completion", "error_body", "TextStream", "new_id"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 504: "timeout", 500: "server_error"}

_UNSUPPORTED = ("logit_bias", "functions", "function_call", "audio", "modalities", "prediction")


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error JSON for ``status``: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def new_id(prefix: str) -> str:
    """A unique response id such as ``chatcmpl-<24 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix time in whole seconds (the ``created`` field)."""
    return int(time.time())


# ---------------------------------------------------------------------------------------------------
# field checks
# ---------------------------------------------------------------------------------------------------
def _typed(body: dict, key: str, kinds: tuple, what: str, default: Any = None, required: bool = False) -> Any:
    if key not in body or body[key] is None:
        if required:
            raise APIError(422, f"'{key}' is a required field", key, "missing_required_parameter")
        return default
    v = body[key]
    if isinstance(v, bool) and bool not in kinds:   # True is an int in Python; not in JSON
        raise APIError(422, f"'{key}' must be {what} (got {v!r})", key, "invalid_type")
    if not isinstance(v, kinds):
        raise APIError(422, f"'{key}' must be {what} (got {type(v).__name__} {str(v)[:40]!r})", key, "invalid_type")
    return v


def _range(key: str, v: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    if v is None:
        return
    if (v <= lo if lo_open else v < lo) or v > hi:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        raise APIError(400, f"'{key}' must be {lo_s} and <= {hi} (got {v})", key, "invalid_value")


@dataclass
class GenParams:
    """The generation settings of one request (both endpoints).

    ``max_tokens`` None = as many as fit (capped by the server's default); ``temperature`` 0 = greedy;
    ``stop``: strings that end a choice (not included in its text); ``logprobs``: report each token's log-prob;
    ``top_logprobs``: that many alternatives per token (0..20); ``seed``: reproducible sampling."""

    model: str
    n: int = 1
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple = ()
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    tools: Optional[list] = None
    parse_tools: bool = False


_NUM = (int, float)


def _common(body: Any, max_n: int) -> GenParams:
    if not isinstance(body, dict):
        raise APIError(422, "the request body must be a JSON object", None, "invalid_type")
    for key in _UNSUPPORTED:
        if body.get(key):
            raise APIError(400, f"'{key}' is not supported by this server", key, "unsupported_parameter")
    model = _typed(body, "model", (str,), "a string", required=True)
    n = _typed(body, "n", (int,), "an integer", 1)
    _range("n", n, 1, max_n)
    mt = _typed(body, "max_completion_tokens", (int,), "an integer")
    mt = _typed(body, "max_tokens", (int,), "an integer") if mt is None else mt
    if mt is not None and mt < 1:
        raise APIError(400, f"'max_tokens' must be >= 1 (got {mt})", "max_tokens", "invalid_value")
    temperature = _typed(body, "temperature", _NUM, "a number", 1.0)
    _range("temperature", temperature, 0, 2)
    top_p = _typed(body, "top_p", _NUM, "a number", 1.0)
    _range("top_p", top_p, 0, 1, lo_open=True)
    top_k = _typed(body, "top_k", (int,), "an integer", 0)
    if top_k == -1:   # vLLM's spelling of "off"
        top_k = 0
    _range("top_k", top_k, 0, 1 << 30)
    rp = _typed(body, "repetition_penalty", _NUM, "a number", 1.0)
    _range("repetition_penalty", rp, 0, 10, lo_open=True)
    for key in ("presence_penalty", "frequency_penalty"):
        v = _typed(body, key, _NUM, "a number", 0)
        _range(key, v, -2, 2)
        if v:
            raise APIError(400, f"'{key}' is not supported by this server (use repetition_penalty)", key,
                           "unsupported_parameter")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise APIError(422, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > 4:
        raise APIError(400, f"'stop' takes at most 4 strings (got {len(stop)})", "stop", "invalid_value")
    if any(s == "" for s in stop):
        raise APIError(400, "'stop' strings must not be empty", "stop", "invalid_value")
    seed = _typed(body, "seed", (int,), "an integer")
    stream = _typed(body, "stream", (bool,), "true or false", False)
    opts = _typed(body, "stream_options", (dict,), "an object", {})
    include_usage = _typed(opts, "include_usage", (bool,), "true or false", False)
    if opts and not stream:
        raise APIError(400, "'stream_options' is only allowed with stream: true", "stream_options", "invalid_value")
    return GenParams(model=model, n=n, max_tokens=mt, temperature=float(temperature), top_p=float(top_p),
                     top_k=int(top_k), repetition_penalty=float(rp), stop=stop, seed=seed, stream=stream,
                     include_usage=include_usage)


_ROLES = ("system", "developer", "user", "assistant", "tool")


def image_source(part: dict, where: str, media_root: Optional[str] = None) -> Any:
    """The image of an ``image_url`` content part ``{"type": "image_url", "image_url": {"url": ...}}``: the
    decoded bytes of a ``data:image/...;base64,...`` URL, or the path of a local file (a path, or a ``file://``
    URL) inside ``media_root`` (the server's ``--allowed_local_media_path``, as vLLM names it; None: no local
    file may be named, so a client cannot make the server read its files). Pillow must be able to read it (only
    the header is read here).

    Raises:
        APIError: 422 no ``url`` string; 400 an http(s) URL (this server does not fetch), another scheme, a data
            URL that is not base64, a local file without ``media_root`` or outside it, a missing file or an
            unreadable image (``where`` names the part).
    """
    import base64
    import binascii
    import io
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    iu = part.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    if not isinstance(url, str) or not url:
        raise APIError(422, f"{where}.image_url.url must be a string (a data: URL or a path on the server)", where,
                       "invalid_type")
    if url[:8].lower().startswith(("http://", "https://")):
        raise APIError(400, f"{where}: this server does not fetch URLs ({url[:80]}); send the image inline as a "
                            "data URL (data:image/png;base64,...) or as a path on the server", where, "invalid_value")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise APIError(400, f"{where}: a data URL must be data:image/<type>;base64,<data> ({head[:40]!r})",
                           where, "invalid_value")
        try:
            src, name = base64.b64decode(data, validate=True), "the data URL's image"
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data URL's base64 data does not decode", where,
                           "invalid_value") from None
    else:
        if url.startswith("file://"):
            url = unquote(urlparse(url).path)
        elif "://" in url:
            raise APIError(400, f"{where}: unsupported URL scheme in {url[:80]!r}; use a data URL or a local path",
                           where, "invalid_value")
        if media_root is None:
            raise APIError(400, f"{where}: this server reads no local files (start it with "
                                "--allowed_local_media_path DIR to allow a folder); send the image as a data URL "
                                "(data:image/png;base64,...)", where, "invalid_value")
        real = Path(url).resolve()
        if not real.is_relative_to(media_root):
            raise APIError(400, f"{where}: {url} is outside the folder this server may read images from "
                                f"(--allowed_local_media_path {media_root})", where, "invalid_value")
        if not real.is_file():
            raise APIError(400, f"{where}: no such image file on the server: {url}", where, "invalid_value")
        src = name = url
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src):
            pass
    except (UnidentifiedImageError, OSError) as e:
        raise APIError(400, f"{where}: {name} is not an image Pillow can read ({e})", where, "invalid_value") from None
    return src


def _content(m: dict, i: int, images_refused: Optional[str] = None, media_root: Optional[str] = None
             ) -> tuple[str, list]:
    """``(text, images)`` of message ``i``: text parts joined, an ``<image>`` placeholder where each image part
    is (as the Qwen-VL chat templates place an image), the images' sources (:func:`image_source`)."""
    c = m.get("content")
    if c is None:
        return "", []
    if isinstance(c, str):
        return c, []
    if isinstance(c, list):      # [{"type": "text", "text": ...}, {"type": "image_url", ...}, ...]
        parts, images = [], []
        for j, part in enumerate(c):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, dict) and part.get("type") == "image_url":
                if images_refused:
                    raise APIError(400, f"{where}: {images_refused}", f"messages[{i}].content",
                                   "unsupported_parameter")
                images.append(image_source(part, where, media_root))
                parts.append("<image>")
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: only text and image_url parts are supported "
                                    "({'type': 'text', 'text': ...})", where, "invalid_value")
            parts.append(part["text"])
        if images and m.get("role") != "user":
            raise APIError(400, f"messages[{i}]: image_url parts are only allowed in user messages",
                           f"messages[{i}].content", "invalid_value")
        return "".join(parts), images
    raise APIError(422, f"messages[{i}].content must be a string or a list of text parts",
                   f"messages[{i}].content", "invalid_type")


def parse_chat(body: Any, max_n: int = 16, images_refused: Optional[str] = None,
               media_root: Optional[str] = None) -> tuple[GenParams, list[dict], Optional[str]]:
    """Check a ``POST /v1/chat/completions`` body.

    ``image_url`` content parts of user messages (:func:`image_source`) put an ``<image>`` placeholder in the
    text where they are and their sources in the turn's ``"images"``; ``images_refused`` (the reason, for a
    text-only model) makes any image part a 400; ``media_root`` is the folder local image paths may be in.

    Returns:
        ``(params, messages, system)``: ``messages`` the turns as ``{"role", "content"}`` (str content; roles
        user, assistant, and the template's ``function`` (an assistant's tool calls) and ``observation`` (tool
        results), :mod:`llmtune.serve.tools`), ``system`` the system (or developer) message's text or None;
        ``params.tools`` the request's tools (None) and ``params.parse_tools`` whether replies are parsed for
        calls.

    Raises:
        APIError: 422 wrong types or a missing field, 400 bad values (an empty list, an unknown role, a
            conversation that does not end with a user turn, n above ``max_n``, an unsupported feature).
    """
    p = _common(body, max_n)
    lp = _typed(body, "logprobs", (bool,), "true or false", False)
    top = _typed(body, "top_logprobs", (int,), "an integer", 0)
    _range("top_logprobs", top, 0, 20)
    if top and not lp:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    p.logprobs, p.top_logprobs = lp, top
    from llmtune.serve.tools import check_tools, tool_call_turn

    p.tools, p.parse_tools = check_tools(body)
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        kind = rf.get("type") if isinstance(rf, dict) else None
        raise APIError(400, f"'response_format' {{'type': {kind!r}}} is not supported: this server does not "
                            "constrain decoding to JSON; ask for JSON in the messages and parse the reply, or "
                            "send {'type': 'text'}", "response_format", "unsupported_parameter")
    msgs = _typed(body, "messages", (list,), "a list of messages", required=True)
    if not msgs:
        raise APIError(400, "'messages' must not be empty", "messages", "invalid_value")
    system, turns = None, []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(422, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]",
                           "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise APIError(400, f"messages[{i}].role {role!r} is not supported; use system, user, assistant or tool",
                           f"messages[{i}].role", "invalid_value")
        text, images = _content(m, i, images_refused, media_root)
        if role in ("system", "developer"):
            if turns:
                raise APIError(400, f"messages[{i}]: a system message must come first", f"messages[{i}].role",
                               "invalid_value")
            system = text if system is None else system + "\n" + text
            continue
        if role == "assistant" and m.get("tool_calls"):
            turn = tool_call_turn(m, i)
        elif role == "tool":
            if turns and turns[-1]["role"] == "observation":   # results of parallel calls: one turn
                turns[-1]["content"] += "\n" + text
                continue
            if not turns or turns[-1]["role"] != "function":
                raise APIError(400, f"messages[{i}]: a tool message must follow an assistant message with "
                                    "tool_calls", f"messages[{i}].role", "invalid_value")
            turn = {"role": "observation", "content": text}
        else:
            turn = {"role": role, "content": text, **({"images": images} if images else {})}
        asks = turn["role"] in ("user", "observation")
        if (not turns and turn["role"] != "user") or (turns and asks == (turns[-1]["role"] in ("user", "observation"))):
            what = "start with a user turn" if not turns else "alternate user (or tool) and assistant turns"
            raise APIError(400, f"messages[{i}]: the conversation must {what}", f"messages[{i}].role",
                           "invalid_value")
        turns.append(turn)
    if not turns or turns[-1]["role"] not in ("user", "observation"):
        raise APIError(400, "the last message must be a user (or tool) turn", "messages", "invalid_value")
    return p, turns, system


def parse_completion(body: Any, max_n: int = 16) -> tuple[GenParams, str]:
    """Check a ``POST /v1/completions`` body; returns ``(params, prompt)`` (one prompt string).

    Raises:
        APIError: as :func:`parse_chat`; a list of prompts (batch) other than one string is refused (400).
    """
    p = _common(body, max_n)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise APIError(422, "'prompt' is a required field", "prompt", "missing_required_parameter")
    if isinstance(prompt, list):
        raise APIError(400, "'prompt' must be one string (batches of prompts and token lists are not supported)",
                       "prompt", "unsupported_parameter")
    if not isinstance(prompt, str):
        raise APIError(422, "'prompt' must be a string", "prompt", "invalid_type")
    if prompt == "":
        raise APIError(400, "'prompt' must not be empty", "prompt", "invalid_value")
    lp = _typed(body, "logprobs", (int,), "an integer", None)
    _range("logprobs", lp, 0, 5)
    p.logprobs, p.top_logprobs = lp is not None, lp or 0
    p.echo = _typed(body, "echo", (bool,), "true or false", False)
    if p.echo:
        raise APIError(400, "'echo' is not supported by this server", "echo", "unsupported_parameter")
    if _typed(body, "suffix", (str,), "a string"):
        raise APIError(400, "'suffix' is not supported by this server", "suffix", "unsupported_parameter")
    if _typed(body, "best_of", (int,), "an integer", 1) != 1:
        raise APIError(400, "'best_of' other than 1 is not supported", "best_of", "unsupported_parameter")
    return p, prompt


# ---------------------------------------------------------------------------------------------------
# incremental text of one choice
# ---------------------------------------------------------------------------------------------------
class TextStream:
    """The text of one choice as its tokens arrive, with stop ids and stop strings.

    :meth:`push` takes one token id and returns the new text that is safe to send: whole characters only
    (a multi-byte character split over tokens waits), and text that could still be the start of a stop
    string is held back. When a stop string appears, the text ends just before it and :attr:`stopped` is set.
    ``"".join(pushes) + flush()`` equals ``decode(tokens up to the stop)`` cut at the first stop string.

    Args:
        tokenizer: an :class:`llmtune.tokenizer.Tokenizer` (``decode(ids, skip_special_tokens=True)``).
        stop_ids: ids that end the reply (not part of the text).
        stop: stop strings.
    """

    def __init__(self, tokenizer: Any, stop_ids: Any, stop: tuple) -> None:
        self.tok, self.stop_ids, self.stop = tokenizer, set(stop_ids), stop
        self.tokens: list[int] = []
        self.sent = ""
        self.text = ""
        self.stopped = False
        self._hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> str:
        """Add one token id; returns the text to send now (str, maybe empty)."""
        if self.stopped:
            return ""
        if token in self.stop_ids:
            out = self.flush()
            self.stopped = True
            return out
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        self.text = self._cut(text)
        if self.stopped:
            return self._emit(self.text)
        return self._emit(text[:len(text) - self._hold] if self._hold else text)

    def _cut(self, text: str) -> str:
        """``text`` up to its first stop string (setting :attr:`stopped`), else ``text``."""
        found = [k for k in (text.find(s, max(0, len(self.sent) - len(s))) for s in self.stop) if k >= 0]
        if found:
            self.stopped = True
            return text[:min(found)]
        return text

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        piece, self.sent = upto[len(self.sent):], upto
        return piece

    def flush(self) -> str:
        """The held-back rest at the end of the choice (str)."""
        if not self.stopped:
            self.text = self._cut(self.tok.decode(self.tokens, skip_special_tokens=True))
        return self._emit(self.text)

    def token_text(self, token: int) -> str:
        """One token's own text (special tokens kept), for log-prob entries."""
        return self.tok.decode([token], skip_special_tokens=False)
