"""SSE events of the dual-call link, and their wire codec.

An event is a small JSON object with a ``type``. Relays (hive, queen) pass
events they did not make through unchanged, so an event keeps the JSON text
it arrived as and is never re-encoded on the way up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

NARRATION = "narration"
TOKEN = "token"
EMBEDDING = "embedding"
END = "end"
ERROR = "error"

#: Fields every event of a type must carry, besides ``type``.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    NARRATION: ("actor", "action", "message"),
    TOKEN: ("index", "text"),
    EMBEDDING: ("index", "embedding"),
    END: ("tokens", "duration_ms", "tokens_per_s", "finish_reason"),
    ERROR: ("code", "message", "actor"),
}
TERMINAL = frozenset({END, ERROR})

DONE_DATA = "[DONE]"
DONE_FRAME = b"data: [DONE]\n\n"


class EventFormatError(ValueError):
    """A peer sent something that is not a link event (a protocol bug, not user input)."""


class Event:
    """One link event: the parsed fields plus the exact JSON text that carries them."""

    __slots__ = ("_json", "fields", "type")

    def __init__(self, fields: Mapping[str, Any], raw: str | None = None) -> None:
        self.fields = dict(fields)
        self.type: str = self.fields["type"]
        self._json = raw

    @property
    def json(self) -> str:
        if self._json is None:
            self._json = json.dumps(self.fields, ensure_ascii=False, separators=(",", ":"))
        return self._json

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __repr__(self) -> str:
        return f"Event({self.json})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and other.fields == self.fields

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_json(cls, raw: str) -> Event:
        """Parse and check one `data:` payload; raises EventFormatError on anything else."""
        try:
            fields = json.loads(raw)
        except ValueError as exc:
            raise EventFormatError(f"event is not JSON: {raw[:80]!r}") from exc
        if not isinstance(fields, dict):
            raise EventFormatError(f"event is not a JSON object: {raw[:80]!r}")
        kind = fields.get("type")
        required = REQUIRED_FIELDS.get(kind) if isinstance(kind, str) else None
        if required is None:
            raise EventFormatError(f"unknown event type {kind!r}")
        missing = [name for name in required if name not in fields]
        if missing:
            raise EventFormatError(f"{kind} event lacks {', '.join(missing)}")
        return cls(fields, raw)


def narration(actor: str, action: str, message: str, **extra: Any) -> Event:
    return Event({"type": NARRATION, "actor": actor, "action": action, "message": message, **extra})


def token(index: int, text: str, **extra: Any) -> Event:
    """``extra``: ``logprobs``, the entries of the tokens this text came from, when asked for."""
    return Event({"type": TOKEN, "index": index, "text": text, **extra})


def embedding(index: int, vector: list[float]) -> Event:
    return Event({"type": EMBEDDING, "index": index, "embedding": vector})


def end(tokens: int, duration_s: float, finish_reason: str, **extra: Any) -> Event:
    rate = tokens / duration_s if duration_s > 0 else 0.0
    return Event(
        {
            "type": END,
            "tokens": tokens,
            "duration_ms": round(duration_s * 1000, 3),
            "tokens_per_s": round(rate, 2),
            "finish_reason": finish_reason,
            **extra,
        }
    )


def error(code: str, message: str, actor: str, **extra: Any) -> Event:
    """``extra``: e.g. ``retry_after`` (seconds) for a full queue."""
    return Event({"type": ERROR, "code": code, "message": message, "actor": actor, **extra})


def encode_frame(event: Event, event_id: int) -> bytes:
    """One SSE frame. JSON never holds a raw newline, so one `data:` line suffices."""
    return f"id: {event_id}\ndata: {event.json}\n\n".encode()
