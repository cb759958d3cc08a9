"""Client side of the dual-call link: create a job, stream its events, cancel it.

Every tier talks to the tier below it through :class:`LinkClient`; the keeper
talks to the queen through it too. Transport errors become LinkError naming
the peer, so the operator learns *which* hop broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from rbee.errors import JobNotFoundError, LinkError, PeerError, RequestError, StallError
from rbee.link.auth import Callee
from rbee.link.events import DONE_DATA, Event, EventFormatError
from rbee.link.transport import secret_client

log = logging.getLogger(__name__)


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
        callee: Callee | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.peer = peer
        self.stall_timeout = stall_timeout
        self._http = http or secret_client(
            token, callee, base_url=self.base_url, timeout=httpx.Timeout(10.0, read=stall_timeout),
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
        """Yield the job's events after ``last_event_id`` until the terminal one."""
        async for _, event in self.numbered(handle, last_event_id):
            yield event

    async def numbered(self, handle: JobHandle, last_event_id: int = 0) -> AsyncIterator[tuple[int, Event]]:
        """Yield ``(event id, event)`` after ``last_event_id`` until the terminal one; the stream
        must end with `[DONE]`.

        The terminal event is held back until the body has ended (``[DONE]`` follows it at
        once): a consumer stops at the terminal event, and a body read to its end puts the
        connection back in the pool instead of dropping it (a new TCP connection per job).
        """
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        terminal: tuple[int, Event] | None = None
        done = False
        event_id = last_event_id
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
                        # the peer's answer, not the connection: not resumed (same code as before)
                        raise PeerError(f"{self.peer} sent a malformed event: {exc}", code=LinkError.code) from exc
                    event_id = int(sse.id) if sse.id.isdigit() else event_id + 1
                    if event.terminal:
                        terminal = (event_id, event)
                    else:
                        yield event_id, event
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

    def run(self, body: dict[str, Any], path: str = "/v1/jobs", resume: Resume | None = None
            ) -> AsyncGenerator[Event, None]:
        """Create a job and stream it, resuming a broken stream (see :func:`run_job`)."""
        return run_job(lambda: self, body, path, resume or Resume())


@dataclass(frozen=True)
class Resume:
    """How a broken stream is resumed: up to ``attempts`` reconnects, backing off from
    ``first_delay`` to ``max_delay`` seconds, within ``budget`` seconds of the break.
    The server keeps an abandoned job alive for its resume grace, longer than this."""

    attempts: int = 6
    first_delay: float = 0.1
    max_delay: float = 2.0
    budget: float = 10.0


def resumable(exc: LinkError) -> bool:
    """A broken or refused connection may heal; an answer (an error status, a 404 job,
    a malformed event: a PeerError) or a stall (the peer is there but silent) will not."""
    return type(exc) is LinkError


async def run_job(
    peer: Callable[[], LinkClient], body: dict[str, Any], path: str = "/v1/jobs", resume: Resume = Resume()
) -> AsyncGenerator[Event, None]:
    """Create a job at ``peer()`` and yield its events. When the stream breaks, reconnect
    with ``Last-Event-ID`` (asking ``peer()`` again: the address may have changed, e.g. an
    SSH forward re-opened), so no event is lost or repeated. If the caller stops early or is
    cancelled, the job is cancelled at the peer, so a cancel travels down the chain at once."""
    client = peer()
    handle = await client.create(body, path)
    last_id = 0
    finished = False
    try:
        while True:
            try:
                async for event_id, event in client.numbered(handle, last_id):
                    last_id = event_id
                    finished = event.terminal
                    yield event
                return
            except LinkError as exc:
                if not resumable(exc):
                    raise
                client = await _reconnect(peer, client, handle, last_id, resume, exc)
    finally:
        if not finished:
            await asyncio.shield(client.cancel(handle))


async def _reconnect(peer: Callable[[], LinkClient], client: LinkClient, handle: JobHandle, last_id: int,
                     resume: Resume, broken: LinkError) -> LinkClient:
    """Wait until the stream can be resumed (the job still known at the peer); the client to use."""
    deadline = asyncio.get_running_loop().time() + resume.budget
    delay = resume.first_delay
    for attempt in range(1, resume.attempts + 1):
        if asyncio.get_running_loop().time() + delay > deadline:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, resume.max_delay)
        client = peer()
        try:
            await client.request_json("GET", handle.sse_url.rsplit("/stream", 1)[0])
        except JobNotFoundError:
            raise LinkError(f"{broken.message}; the job was gone when the stream was resumed") from broken
        except LinkError as exc:
            log.info("resume %d of the stream from %s: %s", attempt, client.peer, exc.message)
            continue
        log.info("resuming the stream from %s after event %d (attempt %d)", client.peer, last_id, attempt)
        return client
    raise LinkError(f"{broken.message}; it could not be resumed within {resume.budget:g} s") from broken


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
