"""The ASGI application of ``llmtune api``: OpenAI's endpoints over the serving scheduler.

Endpoints: ``GET /`` (the chat page, ``static/chat.html``), ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``, vLLM's ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (:mod:`llmtune.serve.adapters`)
(OpenAI's request and response shapes, :mod:`llmtune.serve.protocol`; ``stream: true`` answers with
server-sent events ending in ``data: [DONE]``). The model loads in a background thread when the app starts;
until it is ready every endpoint answers 503 (``/health`` too, with ``{"status": "loading"}``).

Source: the OpenAI API reference (https://platform.openai.com/docs/api-reference/chat), server-sent events as
the WHATWG HTML standard, section 9.2; the shapes and field order follow OpenAI's responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from starlette.requests import Request as HTTPRequest

from llmtune.engine import Request
from llmtune.errors import LLMTuneError
from llmtune.sampling import SamplingParams
from llmtune.serve.protocol import APIError, GenParams, error_body, now, parse_chat, parse_completion
from llmtune.serve.respond import collect, sse
from llmtune.serve.scheduler import Closed, Job, QueueFull, Scheduler

__all__ = ["ServerState", "create_app"]

log = logging.getLogger("llmtune.serve")


@dataclass
class ServerState:
    """What the endpoints serve (built by the loader given to :func:`create_app`).

    Attributes:
        model_id: the name clients pass as ``model`` (listed by ``/v1/models``).
        tokenizer, template: the chat tokenizer and template (:func:`llmtune.chat.load_chat_model`).
        scheduler: the :class:`~llmtune.serve.scheduler.Scheduler` over the model's engine.
        chat_stop_ids: ids that end a chat reply; text_stop_ids: ids that end a plain completion (eos).
        max_model_len: prompt + completion tokens per request (the engine's ``max_len``).
        default_max_tokens: completion tokens when a request gives no ``max_tokens`` (capped by what fits).
        system: the system prompt used when a chat has none (None: the template's default).
        api_key: the bearer token clients must send (None: no check).
        request_timeout: seconds a request may take before it is cancelled (504).
        max_n: the most choices per request.
        adapters: the LoRA adapters served by name beside the base (``model_id``), or None.
        media_root: the folder (resolved) whose files ``image_url`` parts may name; None: data URLs only.
        images: the model's :class:`~llmtune.chat_images.ChatImages` (``image_url`` parts); None: a text-only
            model (image parts are refused with a 400).
    """

    model_id: str
    tokenizer: Any
    template: Any
    scheduler: Scheduler
    chat_stop_ids: list
    text_stop_ids: list
    max_model_len: int
    default_max_tokens: int = 512
    system: Optional[str] = None
    api_key: Optional[str] = None
    request_timeout: float = 600.0
    max_n: int = 16
    images: Any = None
    media_root: Optional[str] = None
    created: int = field(default_factory=now)
    #: the served LoRA adapters (:class:`llmtune.serve.adapters.AdapterRegistry`); None: the base model alone
    adapters: Optional[Any] = None


_MAX_BODY = 4 << 20   # bytes


def create_app(load: Callable[[], ServerState], api_key: Optional[str] = None, drain_s: float = 10.0,
               on_load_error: Optional[Callable[[str], None]] = None) -> Any:
    """The FastAPI application.

    Args:
        load: builds the :class:`ServerState` (loads the model); run in a thread at startup so ``/health``
            answers 503 while it runs. An exception there is logged and every endpoint answers 503.
        api_key: required as ``Authorization: Bearer <key>`` on ``/v1/*`` (None: open).
        drain_s: at shutdown, seconds running requests get to finish before they are cancelled.
        on_load_error: called with the error line when ``load`` fails (``llmtune api`` stops the server).

    Returns:
        a ``fastapi.FastAPI`` instance (an ASGI app).
    """
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    box: dict = {"state": None, "error": None}

    def _load() -> None:
        try:
            box["state"] = load()
        except Exception as e:  # noqa: BLE001 - reported by /health, the log and on_load_error
            box["error"] = str(e) if isinstance(e, LLMTuneError) else f"{type(e).__name__}: {e}"
            if on_load_error is not None:
                on_load_error(box["error"])
            else:
                log.error("llmtune api: loading failed: %s", box["error"])

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        t = threading.Thread(target=_load, name="llmtune-load", daemon=True)
        t.start()
        app.state.loader = t
        yield
        state = box["state"]
        if state is not None:
            await asyncio.to_thread(state.scheduler.close, drain_s)

    app = FastAPI(title="llmtune api", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def shutdown(seconds: float) -> None:   # SIGTERM: no new work, running requests finish or are cancelled
        if box["state"] is not None:
            box["state"].scheduler.close(seconds)

    app.state.shutdown = shutdown

    def err(e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Any, e: APIError) -> JSONResponse:
        return err(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Any, e: Any) -> JSONResponse:
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(e.status_code, msg, None, None), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Any, e: Exception) -> JSONResponse:
        log.exception("llmtune api: internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error ({type(e).__name__}); see the server log"),
                            status_code=500)

    def ready() -> ServerState:
        if box["state"] is None:
            what = f"the model failed to load ({box['error']})" if box["error"] else "the model is loading"
            raise APIError(503, f"{what}; retry later", None, "model_not_ready")
        return box["state"]

    def check_key(request: Any) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    async def read_json(request: Any) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > _MAX_BODY:
            raise APIError(413, f"the request body ({size} bytes) is over the limit of {_MAX_BODY} bytes")
        raw = await request.body()
        if len(raw) > _MAX_BODY:
            raise APIError(413, f"the request body ({len(raw)} bytes) is over the limit of {_MAX_BODY} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None

    @app.get("/")
    async def page() -> Any:     # the chat page: no key needed to load it; it sends the key the user types
        from fastapi.responses import HTMLResponse

        return HTMLResponse(chat_page(), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if box["state"] is None:
            status = "error" if box["error"] else "loading"
            return JSONResponse({"status": status, "error": box["error"]}, status_code=503)
        return JSONResponse({"status": "ok", **box["state"].scheduler.stats()})

    def stream_response(state: ServerState, job: Job, p: GenParams, n_prompt: int, request: Any,
                        chat: bool) -> Any:
        return StreamingResponse(sse(state, job, p, n_prompt, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def auth(request: HTTPRequest) -> None:
        check_key(request)

    keyed = [Depends(auth)]

    @app.get("/v1/models", dependencies=keyed)
    async def models(request: HTTPRequest) -> JSONResponse:
        state = ready()
        return JSONResponse({"object": "list", "data": [model_card(state, n) for n in served_names(state)]})

    @app.get("/v1/models/{model_id:path}", dependencies=keyed)
    async def model(model_id: str) -> JSONResponse:
        state = ready()
        if model_id not in served_names(state):
            raise APIError(404, f"the model '{model_id}' does not exist; this server has "
                                f"{', '.join(repr(n) for n in served_names(state))}", "model", "model_not_found")
        return JSONResponse(model_card(state, model_id))

    @app.post("/v1/load_lora_adapter", dependencies=keyed)
    async def load_lora_adapter(request: HTTPRequest) -> Any:
        state = ready()
        name, path = adapter_fields(await read_json(request), ("lora_name", "lora_path"))
        if state.adapters is None:
            raise APIError(400, "this server takes no LoRA adapters (its model is not a Transformer with "
                                "adapters)", None, "invalid_request_error")
        try:
            await asyncio.to_thread(state.adapters.add, name, path)
        except LLMTuneError as e:
            raise APIError(400, str(e), "lora_path", "invalid_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=keyed)
    async def unload_lora_adapter(request: HTTPRequest) -> Any:
        state = ready()
        (name,) = adapter_fields(await read_json(request), ("lora_name",))
        if state.adapters is None:
            raise APIError(404, f"no LoRA adapter named {name!r} is loaded", "lora_name", "model_not_found")
        await asyncio.to_thread(state.adapters.remove, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(request: HTTPRequest) -> Any:
        state = ready()
        body = await read_json(request)
        from llmtune.chat_images import TEXT_ONLY

        refused = None if state.images is not None else f"the served model '{state.model_id}' {TEXT_ONLY}"
        p, turns, system = parse_chat(body, state.max_n, refused, state.media_root)
        check_model(state, p)
        try:
            prompt, vision = await asyncio.to_thread(chat_prompt, state, turns, system, p.tools)
        except LLMTuneError as e:
            raise APIError(400, f"the messages cannot be rendered by the chat template: {e}", "messages") from None
        job = submit(state, p, prompt, state.chat_stop_ids, vision)
        if p.stream:
            return stream_response(state, job, p, len(prompt), request, chat=True)
        return JSONResponse(await collect(state, job, p, len(prompt), request, chat=True))

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: HTTPRequest) -> Any:
        state = ready()
        body = await read_json(request)
        p, text = parse_completion(body, state.max_n)
        check_model(state, p)
        prompt = state.tokenizer.encode(text, add_special_tokens=True)
        if not prompt:
            raise APIError(400, "'prompt' encodes to no tokens", "prompt", "invalid_value")
        job = submit(state, p, prompt, state.text_stop_ids)
        if p.stream:
            return stream_response(state, job, p, len(prompt), request, chat=False)
        return JSONResponse(await collect(state, job, p, len(prompt), request, chat=False))

    return app


def chat_page() -> str:
    """The chat page served at ``/`` (``llmtune/serve/static/chat.html``, package data): one HTML file with its
    CSS and JavaScript inline, nothing loaded from elsewhere."""
    from importlib.resources import files

    return files("llmtune.serve").joinpath("static", "chat.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# request -> job
# ---------------------------------------------------------------------------------------------------
def served_names(state: ServerState) -> list:
    """The model names clients may pass: the base model's, then each LoRA adapter's."""
    return [state.model_id] if state.adapters is None else state.adapters.names()


def model_card(state: ServerState, name: Optional[str] = None) -> dict:
    """OpenAI's model object for the served model ``name`` (default the base; an adapter's card names the base
    as ``parent`` and its folder as ``root``, as vLLM's does)."""
    name = state.model_id if name is None else name
    card = {"id": name, "object": "model", "created": state.created, "owned_by": "llmtune",
            "max_model_len": state.max_model_len}
    root = None if state.adapters is None or name == state.model_id else state.adapters.paths.get(name)
    if root is not None:
        card.update(root=root, parent=state.model_id)
    return card


def check_model(state: ServerState, p: GenParams) -> None:
    """404 unless ``p.model`` is a served model name (the base or a loaded adapter)."""
    names = served_names(state)
    if p.model not in names:
        raise APIError(404, f"the model '{p.model}' does not exist; this server has "
                            f"{', '.join(repr(n) for n in names)}", "model", "model_not_found")


def adapter_fields(body: Any, keys: tuple) -> tuple:
    """The non-empty string fields ``keys`` of a load/unload request body (vLLM's ``lora_name``, ``lora_path``).

    Raises:
        APIError: 400 when the body is not an object or a field is missing, empty or not a string (named)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object with " + " and ".join(repr(k) for k in keys),
                       None, "invalid_request_error")
    out = []
    for k in keys:
        v = body.get(k)
        if not isinstance(v, str) or not v.strip():
            raise APIError(400, f"'{k}' is required: a non-empty string (" + " and ".join(repr(x) for x in keys)
                                + " must be provided)", k, "invalid_value")
        out.append(v.strip())
    return tuple(out)


def chat_prompt(state: ServerState, turns: list, system: Optional[str], tools: Any) -> tuple[list, Optional[dict]]:
    """The prompt ids of a chat and its images' model inputs (None without images; ``state.images``).

    Raises:
        LLMTuneError: the template cannot render the messages, or an image's placeholders do not add up.
    """
    from llmtune.chat import encode_chat_prompt

    turns, images = state.images.expand(turns) if state.images is not None else (turns, [])
    prompt = encode_chat_prompt(state.tokenizer, state.template, turns,
                                system=system if system is not None else state.system, tools=tools)
    return prompt, (state.images.inputs(images) if images else None)


def submit(state: ServerState, p: GenParams, prompt: list, stop_ids: list, images: Optional[dict] = None) -> Job:
    """Check lengths, build the engine request and queue it (``images``: :attr:`llmtune.engine.Request.images`);
    returns the :class:`Job`.

    Raises:
        APIError: 400 ``context_length_exceeded`` (prompt + max_tokens over ``max_model_len``), 429 queue full,
            503 shutting down.
    """
    room = state.max_model_len - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this server's max_model_len is "
                            f"{state.max_model_len}: shorten the prompt", "messages", "context_length_exceeded")
    if p.max_tokens is None:
        max_new = min(state.default_max_tokens, room)
    elif p.max_tokens > room:
        raise APIError(400, f"the prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) exceed this server's "
                            f"max_model_len {state.max_model_len}: lower max_tokens or shorten the prompt",
                       "max_tokens", "context_length_exceeded")
    else:
        max_new = p.max_tokens
    sampling = SamplingParams() if p.temperature == 0 else SamplingParams(
        do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        repetition_penalty=p.repetition_penalty)
    if p.temperature == 0 and p.repetition_penalty != 1.0:
        sampling = SamplingParams(repetition_penalty=p.repetition_penalty)
    req = Request(list(prompt), max_new, sampling, list(stop_ids), seed=p.seed,
                  logprobs=p.logprobs, top_logprobs=p.top_logprobs, images=images)
    reg = state.adapters
    try:
        if reg is None:
            return state.scheduler.submit(req, p.n)
        with reg.lock:   # the adapter cannot be unloaded between this look-up and the queueing
            if p.model not in (reg.base_name, *reg.paths):
                raise APIError(404, f"the model '{p.model}' does not exist (its adapter was unloaded)", "model",
                               "model_not_found")
            req.adapter = None if p.model == reg.base_name else p.model
            return state.scheduler.submit(req, p.n)
    except QueueFull as e:
        raise APIError(429, str(e), None, "queue_full") from None
    except Closed as e:
        raise APIError(503, f"{e}; retry later", None, "shutting_down") from None

