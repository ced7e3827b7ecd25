"""``llmtune api``: an OpenAI-compatible HTTP server over the generation engine.

* :mod:`llmtune.serve.server`: the command (keys, loading, uvicorn).
* :mod:`llmtune.serve.app`: the FastAPI app and its endpoints.
* :mod:`llmtune.serve.scheduler`: the thread that steps one :class:`llmtune.engine.Engine` for many clients.
* :mod:`llmtune.serve.protocol` and :mod:`llmtune.serve.respond`: OpenAI's request checks and response shapes.

Needs the ``api`` extra (fastapi, uvicorn); nothing here is imported by the rest of llmtune.
"""
