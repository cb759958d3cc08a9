"""One error for every client dialect: the status and the operator's words, rendered in the
shape each dialect's clients parse (OpenAI's ``{"error": {…}}``, Ollama's ``{"error": "…"}``)."""

from __future__ import annotations

from typing import Any

from rbee.errors import RbeeError, http_status
from rbee.link.events import Event


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}

    @classmethod
    def from_event(cls, event: Event) -> ApiError:
        status, kind = http_status(event["code"])
        return cls(status, f"{event['actor']}: {event['message']}", code=event["code"], kind=kind,
                   retry_after=event.get("retry_after"))

    @classmethod
    def from_rbee(cls, exc: RbeeError) -> ApiError:
        return cls(exc.status, exc.message, code=exc.code)
