"""A cap on the connections a role's server holds, so a flood cannot lock its owner out.

Any local user can open connections to a queen on 127.0.0.1. Hypercorn has no connection
limit: 400 idle connections under ``ulimit -n 256`` took every descriptor, and the owner's
requests failed until the flood's connections timed out. So every role:

- raises its soft descriptor limit to the hard one at start (``raise_fd_limit``);
- holds at most ``limit`` connections (half the descriptors, at most 4096);
- when full, closes the connection that has been idle longest (no request in flight: a
  flood's connections are exactly that) to admit the new one; only when every connection is
  busy with a request is the new one refused;
- closes idle connections after ``IDLE_TIMEOUT`` seconds (Hypercorn's keep-alive timeout,
  which also runs from the moment a connection opens until its first request; was 75 s).

Hypercorn makes one ``TCPServer`` per connection and exposes no hook for this, so
:class:`GuardedTCPServer` (a subclass) is put in its place in ``hypercorn.asyncio.run``.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Event, Updated

log = logging.getLogger(__name__)

#: seconds a connection may sit without a request in flight: longer than the keep-alive of the
#: clients people use (httpx and the openai/ollama libraries 5 s, aiohttp 15 s), or a client
#: reusing a connection just as the server closes it gets "Server disconnected"; rbee's own
#: clients drop theirs after 3 s. A flood is answered by eviction, not by this timeout.
IDLE_TIMEOUT = 20.0
MAX_CONNECTIONS = 4096


def raise_fd_limit() -> int:
    """Raise the soft limit on open descriptors to the hard limit where allowed; the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else 65536


def connection_limit(fd_limit: int) -> int:
    """Connections a server may hold: half the descriptors (the rest are logs, workers,
    models, outgoing links), at most MAX_CONNECTIONS."""
    return max(8, min(MAX_CONNECTIONS, fd_limit // 2))


class ConnectionGuard:
    """The open connections of one server and the cap on them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[GuardedTCPServer, float] = {}  # connection -> idle since (0.0: a request in flight)
        self.evicted = 0
        self.refused = 0

    def admit(self, connection: GuardedTCPServer) -> bool:
        if len(self.open) >= self.limit:
            idle = [(since, id(conn), conn) for conn, since in self.open.items() if since > 0.0]
            if not idle:
                self.refused += 1
                return False
            _, _, oldest = min(idle)
            self.open.pop(oldest, None)
            self.evicted += 1
            if self.evicted in (1, 10, 100, 1000) or self.evicted % 10000 == 0:
                log.warning("connection limit (%d) reached: closed idle connections (%d so far)", self.limit,
                            self.evicted)
            oldest.writer.close()
        self.open[connection] = time.monotonic()
        return True

    def busy(self, connection: GuardedTCPServer, busy: bool) -> None:
        if connection in self.open:
            self.open[connection] = 0.0 if busy else time.monotonic()

    def release(self, connection: GuardedTCPServer) -> None:
        self.open.pop(connection, None)


class GuardedTCPServer(TCPServer):
    """Hypercorn's connection, counted against ``config.rbee_guard`` when the server has one."""

    async def run(self) -> None:
        guard: ConnectionGuard | None = getattr(self.config, "rbee_guard", None)
        if guard is None:
            await super().run()
            return
        if not guard.admit(self):
            self.writer.close()
            return
        try:
            await super().run()
        finally:
            guard.release(self)

    async def protocol_send(self, event: Event) -> None:
        guard: ConnectionGuard | None = getattr(self.config, "rbee_guard", None)
        if guard is not None and isinstance(event, Updated):
            guard.busy(self, not event.idle)
        await super().protocol_send(event)


def install(config: Any, limit: int) -> ConnectionGuard:
    """Cap the connections of the server Hypercorn runs with ``config``."""
    hypercorn_run.TCPServer = GuardedTCPServer  # type: ignore[misc]
    guard = ConnectionGuard(limit)
    config.rbee_guard = guard
    config.keep_alive_timeout = IDLE_TIMEOUT
    return guard
