"""Relay: pass a downstream job's events into an upstream job, unchanged and at once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from rbee.errors import LinkError
from rbee.link.client import LinkClient, Resume, run_job
from rbee.link.events import Event
from rbee.link.jobs import Job


async def relay(job: Job, peer: LinkClient | Callable[[], LinkClient], body: dict[str, Any],
                path: str = "/v1/jobs", resume: Resume | None = None) -> Event:
    """Run ``body`` as a job at the peer and emit each of its events into ``job``.

    ``peer`` may be a callable giving the client to use now, so a stream broken by a
    re-opened SSH forward resumes at the peer's new address. The events keep their JSON
    text, so a token costs no re-encoding here. Returns the terminal event. Cancelling the
    caller cancels the downstream job (see :func:`rbee.link.client.run_job`).
    """
    source = peer if callable(peer) else (lambda: peer)
    name = source().peer
    async with contextlib.aclosing(run_job(source, body, path, resume or Resume())) as events:
        async for event in events:
            job.emit(event)
            if event.terminal:
                return event
    raise LinkError(f"{name} closed the job stream without an end or error event")
