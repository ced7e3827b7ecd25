"""A live ``llmtune api`` server for the tests: started in-process on 127.0.0.1 (a free port chosen by the OS),
in a thread, stopped in teardown."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest


@contextmanager
def live_server(argv: list, timeout: float = 60.0, load=None):
    """Start ``llmtune api argv`` in this process on 127.0.0.1:<free port>; yields ``(base_url, state)``
    once ``/health`` says ok; stops the server afterwards (bounded: ``timeout`` seconds to start, 30 to stop).
    ``load(opts)``, when given, builds the ServerState instead of loading ``--model_name_or_path``."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import httpx

    from llmtune.config import parse_config
    from llmtune.serve.app import create_app
    from llmtune.serve.server import build_state, make_server, split_api_args

    opts, rest = split_api_args(list(argv) + ["--port", "0"])
    cfg = None if load is not None else parse_config(rest, command="chat")
    states: list = []

    def _load():
        states.append(build_state(cfg, opts) if load is None else load(opts))
        return states[0]

    app = create_app(_load, api_key=opts["api_key"], drain_s=opts["drain_timeout"])
    server = make_server(app, opts["host"], 0, opts["drain_timeout"])
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not (server.started and server.servers):
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    while True:
        r = httpx.get(base + "/health", timeout=5)
        if r.status_code == 200:
            break
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the test server did not load: {r.text}")
        time.sleep(0.05)
    try:
        yield base, states[0]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
