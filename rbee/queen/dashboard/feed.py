"""What the dashboard's pages stream, gathered as it happens rather than polled per page.

A pulse wakes every open page on each heartbeat, state change and job start or end; each
worker's token rate is sampled from its hive's heartbeats (the change in ``tokens_generated``
between two beats), kept for a few minutes for the chart; the narration of every job the
queen runs becomes one log as it is emitted (``Job.watch``), numbered so a page is sent only
what it has not shown yet.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from rbee.link import events
from rbee.link.events import Event
from rbee.link.jobs import Job
from rbee.link.schemas import HiveReport

#: how far back a worker's rate chart reaches
WINDOW_S = 300.0
LOG_LINES = 1000


@dataclass(frozen=True)
class LogLine:
    seq: int
    at: float  # wall clock
    host: str
    actor: str
    action: str
    message: str
    job: str


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic
    tokens_per_s: float


class Feed:
    def __init__(self, window_s: float = WINDOW_S, log_lines: int = LOG_LINES) -> None:
        self.window_s = window_s
        self._pulse = asyncio.Event()
        self.rates: dict[tuple[str, str], deque[Sample]] = {}
        self._counted: dict[tuple[str, str], tuple[float, int]] = {}
        self.log: deque[LogLine] = deque(maxlen=log_lines)
        self._seq = 0

    def notify(self) -> None:
        """Something a page shows changed: wake every page's stream."""
        self._pulse.set()
        self._pulse = asyncio.Event()  # the next wait waits for the next change

    async def wait(self, timeout: float) -> None:
        """Until the next pulse or ``timeout`` (the clock a page's ages tick on)."""
        try:
            async with asyncio.timeout(timeout):
                await self._pulse.wait()
        except TimeoutError:
            return

    def heartbeat(self, node: str, report: HiveReport, now: float | None = None) -> None:
        """Each worker's rate since its previous beat; workers no longer reported are dropped."""
        now = time.monotonic() if now is None else now
        seen = set()
        for worker in report.workers:
            key = (node, worker.worker_id)
            seen.add(key)
            before = self._counted.get(key)
            self._counted[key] = (now, worker.tokens_generated)
            if before is None or now <= before[0]:
                continue
            rate = max(0, worker.tokens_generated - before[1]) / (now - before[0])
            samples = self.rates.setdefault(key, deque())
            samples.append(Sample(now, rate))
            while samples and samples[0].at < now - self.window_s:
                samples.popleft()
        for key in [key for key in self._counted if key[0] == node and key not in seen]:
            self._counted.pop(key, None)
            self.rates.pop(key, None)
        self.notify()

    def rate(self, node: str, worker_id: str) -> float:
        samples = self.rates.get((node, worker_id))
        return samples[-1].tokens_per_s if samples else 0.0

    def observe(self, job: Job, event: Event) -> None:
        """Every event of the queen's jobs but tokens: narration joins the log, an end wakes
        the pages (the Jobs view loses a row)."""
        if event.type == events.NARRATION:
            self._seq += 1
            actor = str(event["actor"])
            self.log.append(LogLine(self._seq, time.time(), host_of(actor, job.info.get("node", "")), actor,
                                    str(event["action"]), str(event["message"]), job.id))
        elif event.terminal:
            self.notify()

    def lines_after(self, seq: int) -> list[LogLine]:
        return [line for line in self.log if line.seq > seq]

    @property
    def last_seq(self) -> int:
        return self._seq


def host_of(actor: str, node: str) -> str:
    """The host a narration came from: a hive names itself; a worker is on its job's hive."""
    kind, _, name = actor.partition(":")
    if kind == "hive":
        return name
    if kind == "worker":
        return node or "?"
    return kind  # the queen, the fleet work
