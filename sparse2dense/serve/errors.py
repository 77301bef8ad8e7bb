"""Errors in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Every mistake a client can make is raised as :class:`APIError` with one sentence, turned into that
JSON by the app's handler; nothing a client sends produces a traceback or a 500.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class APIError(Exception):
    """A request the server refuses; ``status`` is the HTTP status (400, 401, 404, 413, 429)."""

    message: str
    status: int = 400
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __str__(self) -> str:
        return self.message


def bad(message: str, param: str | None = None) -> APIError:
    """A 400 for a bad request field."""
    return APIError(message, 400, "invalid_request_error", param)
