"""``llmtune api``: serve a model and its LoRA adapters (each a model name) over OpenAI's HTTP API.

``llmtune api [config.yaml] --model_name_or_path M [--adapter_name_or_path A] [--template T] [--device D]
[--infer_dtype D] [--quantization_bit 4] [--host 127.0.0.1] [--port 8000] [--api_key KEY] [--max_num_seqs 8]
[--max_model_len N] [--max_queue 64] [--request_timeout 600] [--served_model_name NAME]``

The model keys are ``llmtune chat``'s (parsed by :func:`llmtune.config.parse_config`; ``max_new_tokens`` is
the default ``max_tokens`` of a request and ``system``/``default_system`` the system prompt of a chat without
one). ``API_HOST``, ``API_PORT`` and ``API_KEY`` in the environment are read as LLaMA-Factory reads them (a flag
wins). ``--adapter_name_or_path a,b`` or ``name=path,...``: each adapter is served unmerged under its name (a
plain path is its own name), the base model under ``--served_model_name`` (default the model path); requests of
different adapters decode in one batch (:mod:`llmtune.serve.adapters`). The server binds 127.0.0.1 unless
``--host`` says otherwise. SIGTERM or Ctrl-C: no new requests; the
running ones get ``--drain_timeout`` seconds (default 10) to finish, then are cancelled; exit status 0.

Source: LLaMA-Factory's ``llamafactory-cli api`` (keys, environment names); vLLM's ``--max-num-seqs``,
``--max-model-len`` and ``--served-model-name``.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from llmtune.errors import LLMTuneError

__all__ = ["main", "split_api_args", "build_state", "load_served_model", "API_KEYS"]

#: the server's own keys: name -> (type, default, help)
API_KEYS = {
    "host": (str, "127.0.0.1", "address to bind (0.0.0.0 serves every network: only when asked)"),
    "port": (int, 8000, "TCP port (0: any free port)"),
    "api_key": (str, None, "clients must send 'Authorization: Bearer KEY'"),
    "max_num_seqs": (int, 8, "sequences decoded together (KV cache slots)"),
    "max_model_len": (int, None, "prompt + completion tokens per sequence (default min(2048, the model's))"),
    "max_num_batched_tokens": (int, None, "prompt tokens prefilled per step (default max_model_len)"),
    "max_queue": (int, 64, "requests waiting for a slot before 429"),
    "request_timeout": (float, 600.0, "seconds a request may run before it is cancelled (504)"),
    "drain_timeout": (float, 10.0, "seconds running requests get to finish at shutdown"),
    "allowed_local_media_path": (str, None, "a folder whose image files clients may name in image_url parts (a path "
                                 "or file:// URL; vLLM's flag); unset: only data URLs"),
    "served_model_name": (str, None, "the base model's name for clients (default: the model path); each adapter "
                          "of --adapter_name_or_path is served under its own name"),
}
_ENV = {"host": "API_HOST", "port": "API_PORT", "api_key": "API_KEY"}

USAGE = "usage: llmtune api [config.yaml] --model_name_or_path PATH [--key value ...]\n\n" \
        "Serve the model over OpenAI's API (GET /v1/models, POST /v1/chat/completions, POST /v1/completions,\n" \
        "GET /health, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter). Model keys as `llmtune chat`\n" \
        "(model_name_or_path, adapter_name_or_path, template, infer_dtype, quantization_bit, device,\n" \
        "max_new_tokens, system); --adapter_name_or_path a,b or name=path,...: each adapter is served by name.\n" \
        "Server keys:\n" + \
        "\n".join(f"  --{k:<24}{h} (default {d})" for k, (_, d, h) in API_KEYS.items())


def split_api_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Take the server keys out of ``argv`` (``--key value``, ``--key=value`` or ``key=value``).

    Returns:
        ``(server settings dict with every key of API_KEYS, the remaining words for parse_config)``; the
        environment's ``API_HOST``/``API_PORT``/``API_KEY`` fill keys the command line leaves out.

    Raises:
        LLMTuneError: a server key without a value, or a value of the wrong type (the flag is named).
    """
    found: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        w = argv[i]
        key, val = None, None
        if w.startswith("--"):
            name, eq, v = w[2:].partition("=")
            if name in API_KEYS:
                key = name
                if eq:
                    val = v
                elif i + 1 < len(argv):
                    val, i = argv[i + 1], i + 1
                else:
                    raise LLMTuneError(f"--{name} needs a value ({API_KEYS[name][2]})")
        elif "=" in w and w.split("=", 1)[0] in API_KEYS:
            key, val = w.split("=", 1)
        if key is None:
            rest.append(w)
        else:
            found[key] = val
        i += 1
    out = {}
    for k, (kind, default, help_) in API_KEYS.items():
        raw = found.get(k)
        where = f"--{k}"
        if raw is None and k in _ENV and os.environ.get(_ENV[k]):
            raw, where = os.environ[_ENV[k]], _ENV[k]
        if raw is None:
            out[k] = default
            continue
        try:
            out[k] = kind(raw)
        except ValueError:
            raise LLMTuneError(f"{where} {raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    for k in ("max_num_seqs", "max_model_len", "max_queue", "max_num_batched_tokens"):
        if out[k] is not None and out[k] < 1:
            raise LLMTuneError(f"--{k} must be >= 1 (got {out[k]})")
    if not 0 <= out["port"] <= 65535:
        raise LLMTuneError(f"--port must be in 0..65535 (got {out['port']})")
    if out["request_timeout"] <= 0:
        raise LLMTuneError(f"--request_timeout must be > 0 seconds (got {out['request_timeout']})")
    media = out["allowed_local_media_path"]
    if media is not None:
        if not Path(media).is_dir():
            raise LLMTuneError(f"--allowed_local_media_path {media}: no such folder (give a folder of images, or "
                               "leave it out so clients send images as data URLs)")
        out["allowed_local_media_path"] = str(Path(media).resolve())
    return out, rest


def build_state(cfg: Any, opts: dict) -> Any:
    """Load the model as ``llmtune chat`` does and wrap it for serving.

    Args:
        cfg: the chat config (:func:`llmtune.config.parse_config` with ``command="chat"``).
        opts: the server settings of :func:`split_api_args`.

    Returns:
        a :class:`llmtune.serve.app.ServerState` with a running scheduler.

    Raises:
        LLMTuneError: a loading error, or ``--max_model_len`` over the model's positions.
    """
    from llmtune.chat import chat_stop_ids
    from llmtune.chat_images import chat_images
    from llmtune.serve.adapters import AdapterRegistry, LockedEngine
    from llmtune.serve.app import ServerState
    from llmtune.serve.scheduler import Scheduler

    specs, model, tokenizer, template = load_served_model(cfg)
    positions = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    max_len = opts["max_model_len"] or min(2048, positions)
    if max_len > positions:
        raise LLMTuneError(f"--max_model_len {max_len} is over the model's max_position_embeddings {positions}")
    engine = LockedEngine(model, max_slots=opts["max_num_seqs"], max_len=max_len,
                          max_prefill_tokens=opts["max_num_batched_tokens"] or max_len)
    eos = [int(i) for i in (getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
           if i is not None]
    model_id = opts["served_model_name"] or str(cfg.model_name_or_path)
    chain = getattr(model, "adapter_chain", None)
    registry = AdapterRegistry(model, model_id, chain.base if chain else str(cfg.model_name_or_path),
                               chain.adapters if chain else (), engine)
    for name, path in specs:
        registry.add(name, path)
    scheduler = Scheduler(engine, max_queue=opts["max_queue"])
    registry.scheduler = scheduler
    return ServerState(model_id=model_id, tokenizer=tokenizer, template=template, scheduler=scheduler,
                       chat_stop_ids=chat_stop_ids(tokenizer, template), text_stop_ids=eos, max_model_len=max_len,
                       default_max_tokens=max(1, int(cfg.max_new_tokens or 512)),
                       system=cfg.system if cfg.system is not None else cfg.default_system,
                       api_key=opts["api_key"], request_timeout=opts["request_timeout"], adapters=registry,
                       media_root=opts.get("allowed_local_media_path"),
                       images=chat_images(cfg, model, tokenizer))


def load_served_model(cfg: Any) -> tuple[list, Any, Any, Any]:
    """The base model of ``llmtune api`` and the adapters to serve on it, unmerged.

    ``cfg.adapter_name_or_path`` lists the served adapters (:func:`llmtune.serve.adapters.parse_adapter_specs`).
    The model loads as ``llmtune chat`` loads it (:func:`llmtune.chat.load_chat_model`) with, merged, only the
    adapters the served ones were trained on top of (the same for all of them); the tokenizer and the template
    are those ``llmtune chat --adapter_name_or_path <first adapter>`` uses (its folder's tokenizer files and
    recorded template, unless ``--template`` is given).

    Returns:
        ``([(name, path), ...], model, tokenizer, template)``.

    Raises:
        LLMTuneError: a bad ``--adapter_name_or_path`` item, a folder that is not an adapter, adapters trained on
            top of different parent adapters, or any loading error.
    """
    import copy
    from pathlib import Path

    from llmtune.chat import load_chat_model
    from llmtune.serve.adapters import adapter_lineage, parse_adapter_specs

    specs = parse_adapter_specs(cfg.adapter_name_or_path)
    lineages = [adapter_lineage(path) for _, path in specs]
    parents = lineages[0][2] if lineages else []
    for (name, path), (_, _, other) in zip(specs, lineages):
        if other != parents:
            raise LLMTuneError(f"--adapter_name_or_path: {path} was trained on top of other adapters "
                               f"({', '.join(map(str, other)) or 'none'}) than {specs[0][1]} "
                               f"({', '.join(map(str, parents)) or 'none'}); serve adapters of one base chain "
                               "together")
    base_cfg = copy.copy(cfg)
    from llmtune.ckpt_weights import checkpoint_kind

    cut = max((i for i, p in enumerate(parents) if checkpoint_kind(p)), default=None)
    if cut is not None:   # trained on a freeze/FSDP checkpoint: that is the model (it brings its own parents)
        base_cfg.model_name_or_path = str(parents[cut])
    rest = parents if cut is None else parents[cut + 1:]
    base_cfg.adapter_name_or_path = ",".join(str(p) for p in rest) or None
    model, tokenizer, template = load_chat_model(base_cfg)
    if specs:
        from llmtune.data.templates import get_template
        from llmtune.runs import recorded_template
        from llmtune.tokenizer import load_tokenizer

        first = lineages[0][0]
        if any((Path(first) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = load_tokenizer(str(first))
        name = cfg.template or recorded_template(first, *reversed(model.adapter_chain.parents),
                                                 cfg.model_name_or_path)
        template = get_template(name, tokenizer)
    return specs, model, tokenizer, template


def make_server(app: Any, host: str, port: int, drain_s: float) -> Any:
    """A ``uvicorn.Server`` for ``app`` (access log off) whose SIGTERM/SIGINT first drains the scheduler.

    The first signal stops new requests (503) and gives the running ones ``drain_s`` seconds to finish (the
    rest end with a ``shutting_down`` error), then the server stops; the process exits normally (status 0)
    instead of re-raising the signal. A second SIGINT forces the exit.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit or getattr(self, "_draining", False):
                self.force_exit = True
                return
            self._draining = True

            def drain() -> None:
                shutdown = getattr(app.state, "shutdown", None)
                if shutdown is not None:
                    shutdown(drain_s)
                self.should_exit = True

            threading.Thread(target=drain, name="llmtune-drain", daemon=True).start()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(1, int(drain_s)), lifespan="on")
    return _Server(config)


def check_bind(host: str, port: int) -> None:
    """Raise :class:`LLMTuneError` (one line naming ``--host``/``--port``) when ``host:port`` cannot be bound
    (in use, or not an address of this machine), before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise LLMTuneError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another "
                           "--port, or stop the program using it") from None


def main(argv: list[str]) -> int:
    """``llmtune api`` entry point (called by :mod:`llmtune.cli`); returns the exit status (0 after a
    SIGTERM or Ctrl-C).

    Raises:
        LLMTuneError: a bad flag or value, fastapi/uvicorn missing (``pip install 'llmtune[api]'``).
    """
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise LLMTuneError(f"llmtune api needs fastapi and uvicorn ({', '.join(missing)} missing): "
                           "pip install 'llmtune[api]'")
    from llmtune.config import parse_config
    from llmtune.sampling import check_generation_args

    opts, rest = split_api_args(argv)
    cfg = parse_config(rest, command="chat")
    check_bind(opts["host"], opts["port"])
    check_generation_args(max(1, cfg.max_new_tokens))
    from llmtune.serve.app import create_app

    failed: dict = {}

    def load_failed(message: str) -> None:   # a model that cannot load ends the server with one error line
        failed["error"] = message
        server.should_exit = True

    app = create_app(lambda: build_state(cfg, opts), api_key=opts["api_key"], drain_s=opts["drain_timeout"],
                     on_load_error=load_failed)
    server = make_server(app, opts["host"], opts["port"], opts["drain_timeout"])
    print(f"llmtune api: loading {cfg.model_name_or_path}; serving on http://{opts['host']}:{opts['port']}/v1 "
          "(GET /health says when the model is ready)", file=sys.stderr, flush=True)
    server.run()
    if failed:
        raise LLMTuneError(failed["error"])
    return 0
