"""Relay: pass a downstream job's events into an upstream job, unchanged and at once."""

from __future__ import annotations

import contextlib
from typing import Any

from rbee.errors import LinkError
from rbee.link.client import LinkClient
from rbee.link.events import Event
from rbee.link.jobs import Job


async def relay(job: Job, client: LinkClient, body: dict[str, Any], path: str = "/v1/jobs") -> Event:
    """Run ``body`` as a job at ``client``'s peer and emit each of its events into ``job``.

    The events keep their JSON text, so a token costs no re-encoding here. Returns the
    terminal event. Cancelling the caller cancels the downstream job (see LinkClient.run).
    """
    async with contextlib.aclosing(client.run(body, path)) as events:
        async for event in events:
            job.emit(event)
            if event.terminal:
                return event
    raise LinkError(f"{client.peer} closed the job stream without an end or error event")
