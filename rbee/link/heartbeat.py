"""Heartbeats: a sender loop (worker → hive, hive → queen) and the pure rule for
judging a peer from the beats it sent.

A peer that misses ``MISSES_ALLOWED`` beats in a row is down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from rbee.errors import RbeeError
from rbee.link.client import LinkClient

log = logging.getLogger(__name__)

MISSES_ALLOWED = 3


def is_overdue(last_beat: float, now: float, interval: float, misses: int = MISSES_ALLOWED) -> bool:
    """True once ``misses`` intervals have passed without a beat."""
    return now - last_beat > misses * interval


async def send_heartbeats(
    peer: LinkClient | Callable[[], LinkClient | None],
    path: str,
    payload: Callable[[], dict[str, Any]],
    interval: float,
    *,
    on_lost: Callable[[str], None] | None = None,
) -> None:
    """POST ``payload()`` every ``interval`` s until cancelled.

    ``peer`` may be a callable, for a peer whose address changes (a queen reached
    through an SSH forward that was re-opened). After ``MISSES_ALLOWED`` failures in
    a row ``on_lost`` is told why (once per outage); beats go on, so a peer that
    comes back is found again.
    """
    failures = 0
    while True:
        client = peer() if callable(peer) else peer
        if client is None:
            await asyncio.sleep(interval)
            continue
        try:
            await client.request_json("POST", path, payload())
            if failures >= MISSES_ALLOWED:
                log.info("%s answers heartbeats again", client.peer)
            failures = 0
        except RbeeError as exc:
            failures += 1
            log.debug("heartbeat to %s failed (%d): %s", client.peer, failures, exc)
            if failures == MISSES_ALLOWED and on_lost is not None:
                on_lost(f"{MISSES_ALLOWED} heartbeats to {client.peer} failed: {exc.message}")
        await asyncio.sleep(interval)
