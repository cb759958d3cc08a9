"""The peers one role tracks by heartbeat: the queen's hives, a hive's workers.

One :class:`PeerRegistry` serves both. A :class:`Peer` owns its :class:`LinkClient`,
a typed state with the reason and time of each change, its last typed report, and
the jobs being relayed through it. The registry turns silence into action, as SPEC
says: a peer that misses ``MISSES_ALLOWED`` heartbeats is marked down and every job
relayed through it ends at once with an error naming the peer. Peers down or stopped
for longer than the retention are dropped (their clients closed), so a long-running
hive or queen does not accumulate dead peers in its heartbeats and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from rbee.errors import PeerDownError
from rbee.link.client import LinkClient
from rbee.link.heartbeat import MISSES_ALLOWED, is_overdue
from rbee.link.jobs import Job

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)

#: how long a down or stopped peer stays listed (status, metrics) before it is dropped
DEFAULT_RETENTION_S = 300.0


class PeerState(enum.StrEnum):
    STARTING = "starting"
    UP = "up"
    BUSY = "busy"
    DOWN = "down"
    STOPPING = "stopping"
    STOPPED = "stopped"


LIVE = frozenset({PeerState.STARTING, PeerState.UP, PeerState.BUSY})
SERVING = frozenset({PeerState.UP, PeerState.BUSY})
GONE = frozenset({PeerState.DOWN, PeerState.STOPPED})


@dataclass(frozen=True)
class Change:
    state: PeerState
    reason: str
    at: float  # wall clock, for people


class Peer(Generic[R]):
    """One peer: ``kind`` and ``name`` make its actor (``hive:mac``, ``worker:w-1a2b3c``)."""

    def __init__(self, kind: str, name: str, url: str = "", reason: str = "launched") -> None:
        self.kind = kind
        self.name = name
        self.url = url
        self.client: LinkClient | None = None
        self.state = PeerState.STARTING
        self.reason = reason
        self.since = time.monotonic()
        self.changes: deque[Change] = deque([Change(self.state, reason, time.time())], maxlen=16)
        self.last_beat: float | None = None
        self.report: R | None = None
        self.jobs: set[Job] = set()
        self.beaten = asyncio.Event()
        #: the secret this peer was launched with: it proves itself with it, and is called with it
        self.secret: str | None = None
        #: the peer's own host:port when it is reached through an SSH forward (its proofs are
        #: bound to it); empty: the address dialled
        self.address = ""

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def serving(self) -> bool:
        return self.state in SERVING

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def set_state(self, state: PeerState, reason: str, now: float | None = None) -> None:
        if state == self.state and reason == self.reason:
            return
        self.state, self.reason = state, reason
        self.since = time.monotonic() if now is None else now
        self.changes.append(Change(state, reason, time.time()))
        if state not in SERVING:
            self.beaten.clear()

    def beat(self, report: R, busy: bool = False, ready: bool = True, now: float | None = None) -> None:
        """A heartbeat (or the ready answer) arrived with ``report``; ``ready`` False: the peer
        is alive but still starting (a worker loading its model)."""
        self.last_beat = time.monotonic() if now is None else now
        self.report = report
        if self.state in (PeerState.STOPPING, PeerState.STOPPED) or not ready:
            return  # a late beat from a peer being stopped, or one still loading, changes no state
        if self.state == PeerState.DOWN:
            self.set_state(PeerState.UP, "heartbeats resumed", now)
        elif self.state == PeerState.STARTING:
            self.set_state(PeerState.UP, "heartbeating", now)
        if self.state in SERVING:
            self.set_state(PeerState.BUSY if busy else PeerState.UP, self.reason, now)
        self.beaten.set()

    def heartbeat_age(self, now: float | None = None) -> float | None:
        if self.last_beat is None:
            return None
        return round((time.monotonic() if now is None else now) - self.last_beat, 2)

    def end_jobs(self, error: PeerDownError) -> int:
        """End every job relayed through this peer with ``error``; returns how many."""
        ended = 0
        for job in list(self.jobs):
            if job.fail(error.code, error.message):
                ended += 1
        self.jobs.clear()
        return ended

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
            self.client = None


P = TypeVar("P", bound=Peer)


class PeerRegistry(Generic[P]):
    """Peers of one kind by name; ``connect`` makes the client for a peer's URL."""

    def __init__(
        self,
        interval: float,
        connect: Callable[[P], LinkClient],
        *,
        misses: int = MISSES_ALLOWED,
        retention: float = DEFAULT_RETENTION_S,
        excused: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.interval = interval
        self.connect = connect
        self.misses = misses
        self.retention = retention
        #: a peer whose silence is its transport's, being re-opened (an SSH reconnect), is not judged
        self.excused = excused
        self.peers: dict[str, P] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __contains__(self, name: object) -> bool:
        return name in self.peers

    def __iter__(self) -> Iterator[P]:
        return iter(list(self.peers.values()))

    def get(self, name: str) -> P | None:
        return self.peers.get(name)

    def serving(self, name: str) -> P | None:
        peer = self.peers.get(name)
        return peer if peer is not None and peer.serving else None

    def add(self, peer: P) -> P:
        """Track ``peer``; one already there under its name is replaced and its client closed."""
        old = self.peers.get(peer.name)
        if old is not None and old is not peer:
            self.drop_client(old)
        self.peers[peer.name] = peer
        return peer

    def set_url(self, peer: P, url: str) -> None:
        """A peer's address changed (a relaunch, an SSH forward re-opened): a new client."""
        if peer.url != url:
            peer.url = url
            self.drop_client(peer)

    def client(self, peer: P) -> LinkClient:
        if peer.client is None:
            peer.client = self.connect(peer)
        return peer.client

    @contextlib.contextmanager
    def relaying(self, peer: P, job: Job) -> Iterator[None]:
        """While a job is relayed through ``peer``, a missed-heartbeat verdict ends it."""
        peer.jobs.add(job)
        try:
            yield
        finally:
            peer.jobs.discard(job)

    def check(self, now: float | None = None) -> list[P]:
        """Mark serving peers that missed their heartbeats down, end their jobs; return them."""
        now = time.monotonic() if now is None else now
        newly = []
        for peer in self:
            if peer.serving and peer.last_beat is not None and is_overdue(
                peer.last_beat, now, self.interval, self.misses
            ) and not self.excused(peer.name):
                silent = now - peer.last_beat
                peer.set_state(PeerState.DOWN, f"missed {self.misses} heartbeats ({silent:.1f} s silent)", now)
                ended = peer.end_jobs(PeerDownError(
                    f"{peer.actor} missed {self.misses} heartbeats (nothing for {silent:.1f} s): it is hung or "
                    "unreachable, so the job was ended"
                ))
                log.warning("%s is down: %s; %d job(s) ended", peer.actor, peer.reason, ended)
                newly.append(peer)
        return newly

    def expired(self, now: float | None = None) -> list[P]:
        now = time.monotonic() if now is None else now
        return [peer for peer in self if peer.state in GONE and now - peer.since > self.retention and not peer.jobs]

    async def prune(self, now: float | None = None) -> list[P]:
        """Drop peers gone for longer than the retention; close their clients."""
        dropped = self.expired(now)
        for peer in dropped:
            await self.remove(peer.name)
        return dropped

    async def remove(self, name: str) -> P | None:
        peer = self.peers.pop(name, None)
        if peer is not None:
            await peer.close()
        return peer

    async def close(self) -> None:
        await asyncio.gather(*(peer.close() for peer in self), *list(self._closing), return_exceptions=True)

    def drop_client(self, peer: P) -> None:
        """Forget ``peer``'s client (its address or secret changed): the next call makes a new one.
        The old one is closed in the background; jobs streaming on it see their stream end."""
        if peer.client is not None:
            task = asyncio.get_running_loop().create_task(peer.client.aclose())
            peer.client = None
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
