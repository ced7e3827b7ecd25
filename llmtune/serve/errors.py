"""The client-facing error of ``llmtune api`` (its own module so that the request parsing and the tool
formats can both raise it without importing each other)."""

from __future__ import annotations

from typing import Optional


class APIError(Exception):
    """A client-facing error: ``status`` (int HTTP status), ``message`` (str), ``param`` (the request field or
    None), ``code`` (OpenAI's short code or None)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
