"""Job streams hand out everything emitted since the last wake-up as one batch."""

from __future__ import annotations

import asyncio

from rbee.link import events
from rbee.link.jobs import Job


async def _collect(job: Job, after: int = 0, ping: float | None = None) -> list[list[tuple[int, events.Event]]]:
    return [batch async for batch in job.subscribe(after, ping)]


async def test_events_emitted_together_arrive_as_one_batch() -> None:
    job = Job("job-1", "worker:test")
    reader = asyncio.create_task(_collect(job))
    await asyncio.sleep(0)  # the reader is waiting now
    for index in range(50):
        job.emit(events.token(index, "x"))
    job.emit(events.end(50, 0.1, "length"))
    batches = await asyncio.wait_for(reader, 5)
    assert len(batches) == 1
    assert [event_id for event_id, _ in batches[0]] == list(range(1, 52))


async def test_every_reader_gets_every_event_numbered_once() -> None:
    job = Job("job-1", "worker:test")
    readers = [asyncio.create_task(_collect(job)) for _ in range(3)]
    for index in range(5):
        await asyncio.sleep(0)
        job.emit(events.token(index, "x"))
    job.emit(events.end(5, 0.1, "length"))
    late = await _collect(job, after=2)  # a resume after the end replays the rest
    for batches in [*await asyncio.gather(*readers), late]:
        numbered = [item for batch in batches for item in batch]
        assert [event_id for event_id, _ in numbered] == list(range(numbered[0][0], 7))
        assert [event.type for _, event in numbered][-1] == "end"
    assert late[0][0][0] == 3
    assert job.subscriber_count == 0


async def test_a_quiet_job_yields_empty_keepalive_batches() -> None:
    job = Job("job-1", "worker:test")
    seen: list[int] = []

    async def read() -> None:
        async for batch in job.subscribe(0, ping=0.01):
            seen.append(len(batch))
            if seen.count(0) == 2:
                job.emit(events.end(0, 0.1, "length"))

    await asyncio.wait_for(read(), 5)
    assert seen == [0, 0, 1]
