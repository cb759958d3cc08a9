"""Server side of the dual-call link: the job registry.

A job starts working as soon as it is created (so a worker spawn or a model
load overlaps the client opening its stream) and keeps every event it
emitted, numbered from 1, so a stream can resume after ``Last-Event-ID``.

Lifetimes, all measured on the event loop's clock:
- a job nobody streams within ``claim_timeout`` is cancelled and dropped;
- a job whose last stream closes before the end is cancelled after
  ``resume_grace`` unless a stream re-attaches;
- a finished job lingers ``linger`` seconds for late resumes, then goes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from rbee.errors import JobNotFoundError, QueueFullError, RbeeError
from rbee.link import events
from rbee.link.events import Event

log = logging.getLogger(__name__)

Producer = Callable[["Job"], Awaitable[None]]
#: Events numbered by their id (1, 2, …), as a stream hands them out.
Batch = list[tuple[int, Event]]


def new_job_id() -> str:
    """160 random bits, URL-safe: unguessable, so an id is the capability to read a job."""
    return "job-" + secrets.token_urlsafe(20)


class Job:
    """One unit of work and the ordered events it produced."""

    def __init__(self, job_id: str, actor: str) -> None:
        self.id = job_id
        self.actor = actor
        self.created = time.monotonic()
        self.history: list[Event] = []
        self.finished = False
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._streams = 0
        self._timer: asyncio.TimerHandle | None = None
        self.claimed = False
        self.detached = False  # runs to its end with or without a stream
        self.cancel_reason = ""
        self.tokens = 0
        self.first_token_at: float | None = None
        #: what the tier running it knows (the queen: kind, model, node), for status views
        self.info: dict[str, str] = {}
        #: sees every event but tokens (narration, the end): the queen's dashboard feed
        self.watch: Callable[[Job, Event], None] | None = None

    def emit(self, event: Event) -> None:
        """Record an event and hand it to every open stream. Events after the terminal one are dropped."""
        if self.finished:
            return
        if event.type == events.TOKEN:
            self.tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
        elif self.watch is not None:
            self.watch(self, event)
        self.history.append(event)
        if event.terminal:
            self.finished = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def fail(self, code: str, message: str) -> bool:
        """End the job now with an error event (e.g. its peer went silent) and stop its work;
        False if it had already ended."""
        if self.finished:
            return False
        self.emit(events.error(code, message, self.actor))
        if self.task is not None and not self.task.done():
            self.task.cancel()
        return True

    def narrate(self, action: str, message: str, **extra: object) -> None:
        self.emit(events.narration(self.actor, action, message, **extra))

    async def subscribe(self, after: int = 0, ping: float | None = None) -> AsyncIterator[Batch]:
        """Yield the events from ``after + 1`` to the terminal one as ``(event_id, event)``
        batches: each wake-up takes everything emitted since the last, so behind a fast
        producer a stream sends many events in one write instead of one write each. With
        ``ping``, an empty batch after each ``ping`` seconds without an event (a keep-alive:
        a live peer with a slow step is not taken for a hung one)."""
        sent = after
        loop = asyncio.get_running_loop()
        self._streams += 1
        try:
            while True:
                if sent < len(self.history):
                    batch = list(enumerate(self.history[sent:], start=sent + 1))
                    sent += len(batch)
                    yield batch
                    continue
                if self.finished:
                    return
                waiter = loop.create_future()
                self._waiters.add(waiter)
                try:
                    # asyncio.timeout, not wait_for: no extra task per wake-up (py-spy: wait_for
                    # was half of a relay's CPU per token).
                    async with asyncio.timeout(ping):
                        await waiter
                except TimeoutError:
                    yield []
                finally:
                    self._waiters.discard(waiter)
        finally:
            self._streams -= 1

    @property
    def subscriber_count(self) -> int:
        return self._streams


class JobRegistry:
    """All live jobs of one server. ``actor`` names this server in error events."""

    def __init__(
        self,
        actor: str,
        *,
        claim_timeout: float = 60.0,
        resume_grace: float = 0.25,
        linger: float = 30.0,
        ping: float | None = 5.0,
        on_finish: Callable[[Job], None] | None = None,
        watch: Callable[[Job, Event], None] | None = None,
    ) -> None:
        self.actor = actor
        self.on_finish = on_finish
        self.watch = watch
        self.ping = ping
        self.claim_timeout = claim_timeout
        self.resume_grace = resume_grace
        self.linger = linger
        self._jobs: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def create(self, producer: Producer, *, detached: bool = False) -> Job:
        """A new job, running now. ``detached``: it runs to its end whether or not anyone streams
        it (a pull started from the dashboard, watched through its narration, not a stream)."""
        job = Job(new_job_id(), self.actor)
        job.watch = self.watch
        self._jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, producer), name=job.id)
        log.info("job created", extra={"job": job.id})
        if detached:
            job.claimed = job.detached = True
        else:
            self._schedule(job, self.claim_timeout, self._expire_unclaimed)
        return job

    def jobs(self) -> list[Job]:
        """Every job held now, running or lingering after its end, oldest first."""
        return list(self._jobs.values())

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFoundError(
                f"no job {job_id!r} here: it never existed, expired unclaimed, or ended long ago"
            ) from None

    async def stream(self, job_id: str, after: int = 0) -> AsyncIterator[Batch]:
        """Stream a job in batches (see Job.subscribe); a stream that closes before the end
        may cancel the job (see module doc)."""
        job = self.get(job_id)
        job.claimed = True
        self._unschedule(job)
        try:
            async for batch in job.subscribe(after, self.ping):
                yield batch
        finally:
            if not job.finished and job.subscriber_count == 0 and not job.detached:
                self._schedule(job, self.resume_grace, self._cancel_abandoned)

    async def cancel(self, job_id: str, reason: str = "cancelled by the client") -> Job:
        job = self.get(job_id)
        await self._cancel(job, reason)
        return job

    async def close(self) -> None:
        """Cancel every running job (server shutdown)."""
        await asyncio.gather(
            *(self._cancel(job, f"{self.actor} is shutting down") for job in list(self._jobs.values()))
        )

    async def _run(self, job: Job, producer: Producer) -> None:
        try:
            await producer(job)
            if not job.finished:
                job.emit(events.error("internal", "the job ended without a result", self.actor))
        except asyncio.CancelledError:
            job.emit(events.error("cancelled", job.cancel_reason or "cancelled", self.actor))
        except RbeeError as exc:
            actor = getattr(exc, "actor", "") or self.actor
            extra = {"retry_after": exc.retry_after} if isinstance(exc, QueueFullError) else {}
            job.emit(events.error(exc.code, exc.message, actor, **extra))
        except Exception as exc:  # a bug: tell the client instead of hanging it
            log.exception("job %s failed", job.id)
            job.emit(events.error("internal", f"{type(exc).__name__}: {exc}", self.actor))
        finally:
            last = job.history[-1] if job.history else None
            log.info(
                "job ended: %s (%d tokens)", last.type if last else "nothing", job.tokens,
                extra={"job": job.id, "code": last.get("code") if last else None},
            )
            if self.on_finish is not None:
                self.on_finish(job)
            self._schedule(job, self.linger, self._forget)

    async def _cancel(self, job: Job, reason: str) -> None:
        if job.finished or job.task is None:
            return
        job.cancelled = True
        job.cancel_reason = reason
        job.task.cancel()
        try:
            await job.task
        except asyncio.CancelledError:
            if not job.task.cancelled():
                raise

    def _expire_unclaimed(self, job: Job) -> None:
        if not job.claimed:
            log.info("job %s expired: nobody streamed it", job.id)
            asyncio.get_running_loop().create_task(self._cancel(job, "nobody streamed the job"))
            self._jobs.pop(job.id, None)

    def _cancel_abandoned(self, job: Job) -> None:
        if job.subscriber_count == 0 and not job.finished:
            asyncio.get_running_loop().create_task(self._cancel(job, "the client closed the stream"))

    def _forget(self, job: Job) -> None:
        if job.subscriber_count == 0:
            self._jobs.pop(job.id, None)
        else:
            self._schedule(job, self.linger, self._forget)

    def _schedule(self, job: Job, delay: float, callback: Callable[[Job], None]) -> None:
        self._unschedule(job)
        job._timer = asyncio.get_running_loop().call_later(delay, callback, job)

    @staticmethod
    def _unschedule(job: Job) -> None:
        if job._timer is not None:
            job._timer.cancel()
            job._timer = None

