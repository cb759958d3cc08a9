"""Client side of the dual-call link: create a job, stream its events, cancel it.

Every tier talks to the tier below it through :class:`LinkClient`; the keeper
talks to the queen through it too. Transport errors become LinkError naming
the peer, so the operator learns *which* hop broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from rbee.errors import JobNotFoundError, LinkError, PeerError, RequestError
from rbee.link.auth import bearer
from rbee.link.events import DONE_DATA, Event, EventFormatError
from rbee.link.transport import async_client


class StallError(LinkError):
    code = "stalled"


@dataclass(frozen=True)
class JobHandle:
    job_id: str
    sse_url: str


class LinkClient:
    """Talks the link to one peer at ``base_url``; ``peer`` names it in errors (e.g. ``hive:localhost``)."""

    def __init__(
        self,
        base_url: str,
        peer: str,
        *,
        stall_timeout: float | None = 300.0,
        http: httpx.AsyncClient | None = None,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.peer = peer
        self.stall_timeout = stall_timeout
        self._http = http or async_client(
            base_url=self.base_url, timeout=httpx.Timeout(10.0, read=stall_timeout),
            headers=bearer(token),
        )
        self._owns_http = http is None

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> LinkClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A plain JSON call (health, admin, heartbeats) with errors mapped to rbee's tree."""
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise LinkError(f"{self.peer} at {self.base_url} did not answer {method} {path}: {_describe(exc)}") from exc
        if response.status_code >= 400:
            raise _status_error(self.peer, response.status_code, response.content)
        return response.json() if response.content else None

    async def create(self, body: dict[str, Any], path: str = "/v1/jobs") -> JobHandle:
        created = await self.request_json("POST", path, body)
        try:
            return JobHandle(created["job_id"], created["sse_url"])
        except (TypeError, KeyError) as exc:
            raise LinkError(f"{self.peer} answered the job creation without job_id/sse_url") from exc

    async def stream(self, handle: JobHandle, last_event_id: int = 0) -> AsyncIterator[Event]:
        """Yield the job's events until the terminal one; the stream must end with `[DONE]`.

        The terminal event is held back until the body has ended (``[DONE]`` follows it at
        once): a consumer stops at the terminal event, and a body read to its end puts the
        connection back in the pool instead of dropping it (a new TCP connection per job).
        """
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        terminal: Event | None = None
        done = False
        try:
            async with aconnect_sse(self._http, "GET", handle.sse_url, headers=headers) as source:
                if source.response.status_code >= 400:
                    await source.response.aread()
                    raise _status_error(self.peer, source.response.status_code, source.response.content)
                async for sse in source.aiter_sse():
                    if not sse.data or done:
                        continue  # a keep-alive comment, or anything after [DONE]
                    if sse.data == DONE_DATA:
                        done = True
                        continue
                    try:
                        event = Event.from_json(sse.data)
                    except EventFormatError as exc:
                        raise LinkError(f"{self.peer} sent a malformed event: {exc}") from exc
                    if event.terminal:
                        terminal = event
                    else:
                        yield event
        except httpx.HTTPError as exc:
            if terminal is None:
                raise self._broken(exc) from exc
            # the job's end arrived; only the stream's tail was lost
        if terminal is not None:
            yield terminal
        elif not done:
            raise LinkError(f"the stream from {self.peer} ended without [DONE]")

    def _broken(self, exc: httpx.HTTPError) -> LinkError:
        if isinstance(exc, httpx.ReadTimeout):
            return StallError(
                f"{self.peer} sent nothing for {self.stall_timeout:g} s (not even a keep-alive): it is stalled or hung"
            )
        return LinkError(f"the stream from {self.peer} broke: {_describe(exc)}")

    async def cancel(self, handle: JobHandle) -> None:
        """Best-effort DELETE; a job that already ended (or a client already closed) is not an error."""
        with contextlib.suppress(JobNotFoundError, LinkError, RuntimeError):
            await self.request_json("DELETE", handle.sse_url.rsplit("/stream", 1)[0])

    async def run(self, body: dict[str, Any], path: str = "/v1/jobs") -> AsyncGenerator[Event, None]:
        """Create a job and stream it; if the caller stops early or is cancelled, the job is
        cancelled at the peer (so a cancel travels down the chain at once)."""
        handle = await self.create(body, path)
        finished = False
        try:
            async for event in self.stream(handle):
                finished = event.terminal
                yield event
        finally:
            if not finished:
                await asyncio.shield(self.cancel(handle))


def _describe(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__


def _status_error(peer: str, status: int, content: bytes) -> Exception:
    code, message = f"http_{status}", content[:300].decode(errors="replace")
    with contextlib.suppress(ValueError, TypeError, KeyError):
        error = json.loads(content)["error"]
        code, message = error.get("code", code), error["message"]
    if status == 404 and code == "job_not_found":
        return JobNotFoundError(f"{peer}: {message}")
    if status in (400, 413, 422):
        exc = RequestError(f"{peer} refused the request: {message}")
        exc.code = code
        return exc
    return PeerError(f"{peer} answered {status}: {message}", code=code, actor=peer)
