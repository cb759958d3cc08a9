"""Issue 24.1: the one batch loop, without a model: the queue, admission, cancel, stop and
length, unload, a failing step, and one hand-off to the event loop per step."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from rbee.errors import ModelLoadError, QueueFullError, RbeeError, RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Piece
from rbee.worker.backends.loop import BatchLoop, Sequence, Started
from tests.fake_step import FakeStep


def sequence(prompt: str = "x", max_tokens: int = 5, **fields: object) -> Sequence:
    request = JobRequest.model_validate({"prompt": prompt, "max_tokens": max_tokens, **fields})
    return Sequence(request, [1, 2, 3], max_tokens, asyncio.Queue(), asyncio.get_running_loop())


async def drain(seq: Sequence, timeout: float = 5.0) -> list[object]:
    """Everything the loop sent ``seq``, up to its end piece or error."""
    got: list[object] = []
    async with asyncio.timeout(timeout):
        while True:
            item = await seq.sink.get()
            got.append(item)
            if isinstance(item, BaseException) or (isinstance(item, Piece) and item.finish_reason is not None):
                return got


def text(items: list[object]) -> str:
    return "".join(item.text for item in items if isinstance(item, Piece))


def finish(items: list[object]) -> str | None:
    last = items[-1]
    return last.finish_reason if isinstance(last, Piece) else None


@pytest.fixture
async def engine() -> AsyncIterator[tuple[BatchLoop, FakeStep]]:
    step = FakeStep()
    loop = await asyncio.to_thread(BatchLoop, step, 2, 2)
    yield loop, step
    await asyncio.to_thread(loop.close)


async def test_length_stop_string_and_end_of_generation(engine: tuple[BatchLoop, FakeStep]) -> None:
    loop, step = engine
    long, stopped, ended = sequence(max_tokens=3), sequence(stop=["w2"]), sequence("eog", max_tokens=9)
    for seq in (long, stopped, ended):
        loop.submit(seq)
    got = [await drain(seq) for seq in (long, stopped, ended)]
    assert isinstance(got[0][0], Started) and got[0][0].reused == 0
    assert (text(got[0]), finish(got[0])) == ("w0 w1 w2 ", "length")
    assert got[0][-1].completion_tokens == 3 and got[0][-1].prompt_tokens == 3  # type: ignore[union-attr]
    assert (text(got[1]), finish(got[1])) == ("w0 w1 ", "stop")  # the stop string never reaches the client
    assert (text(got[2]), finish(got[2])) == ("w0 w1 ", "stop")
    assert step.threads == {"fake-engine"} and loop.tokens_generated == 3 + 3 + 2
    assert sorted(keep for _, keep in step.released) == [True, True, True]


async def test_a_sequence_waits_for_a_slot_and_cancel_while_queued(engine: tuple[BatchLoop, FakeStep]) -> None:
    loop, step = engine
    step.delay = 0.01
    first, second = sequence(max_tokens=50), sequence(max_tokens=50)
    assert loop.submit(first) == 0 and loop.submit(second) == 0  # two slots
    queued = sequence("cached", max_tokens=5)
    assert loop.submit(queued) == 1
    cancelled = sequence(max_tokens=5)
    assert loop.submit(cancelled) == 2
    cancelled.cancelled.set()
    loop.wake()
    got = await drain(cancelled)
    assert got == [Piece("", "cancelled", 0, 3)]  # it never ran
    first.cancelled.set()
    loop.wake()
    assert finish(await drain(first)) == "cancelled"
    started = await drain(queued)  # the freed slot goes to the next in line
    assert started[0] == Started(3) and finish(started) == "length"
    assert ("x", True) in step.released  # a cancelled running sequence keeps its cache
    second.cancelled.set()
    loop.wake()
    await drain(second)
    load = loop.load()
    assert (load["slots"], load["slots_busy"], load["queue"]) == (2, 0, 0)


async def test_the_queue_is_bounded_and_says_when_to_come_back(engine: tuple[BatchLoop, FakeStep]) -> None:
    loop, step = engine
    step.delay = 0.01
    held = [sequence(max_tokens=1000) for _ in range(4)]  # two run, two wait (the limit)
    for seq in held:
        loop.submit(seq)
    with pytest.raises(QueueFullError) as full:
        loop.submit(sequence())
    assert "queue limit 2" in full.value.message and 1 <= full.value.retry_after <= 60
    for seq in held:
        seq.cancelled.set()
    loop.wake()
    for seq in held:
        assert finish(await drain(seq)) == "cancelled"


async def test_no_room_keeps_the_line_in_order() -> None:
    step = FakeStep(room=1)  # a full cache: one runs although two slots are free
    loop = await asyncio.to_thread(BatchLoop, step, 2, 4)
    try:
        first, second = sequence(max_tokens=3), sequence(max_tokens=2)
        loop.submit(first)
        loop.submit(second)
        assert text(await drain(first)) == "w0 w1 w2 "
        assert text(await drain(second)) == "w0 w1 "
        assert max(step.batch_sizes) == 1
    finally:
        await asyncio.to_thread(loop.close)


async def test_a_refused_request_and_a_failing_step_end_their_sequences_not_the_loop(
        engine: tuple[BatchLoop, FakeStep]) -> None:
    loop, step = engine
    refused = sequence("refuse")
    loop.submit(refused)
    (error,) = await drain(refused)
    assert isinstance(error, RequestError) and "refuses" in error.message
    step.fail_at = step.steps + 2
    doomed = sequence(max_tokens=10)
    loop.submit(doomed)
    got = await drain(doomed)
    assert isinstance(got[-1], RbeeError) and "fake failed: engine exploded" in got[-1].message
    assert ("x", False) in step.released  # a failed step's cells are not kept as a cache
    after = sequence(max_tokens=2)
    loop.submit(after)
    assert text(await drain(after)) == "w0 w1 "


async def test_unload_ends_what_runs_and_what_waits() -> None:
    step = FakeStep(delay=0.01)
    loop = await asyncio.to_thread(BatchLoop, step, 1, 4)
    running, waiting = sequence(max_tokens=10_000), sequence(max_tokens=5)
    loop.submit(running)
    loop.submit(waiting)
    await running.sink.get()  # Started
    await asyncio.to_thread(loop.close)
    for seq in (running, waiting):
        last = (await drain(seq))[-1]
        assert isinstance(last, RbeeError) and "unloaded" in last.message
    assert step.closed
    with pytest.raises(RbeeError, match="being unloaded"):
        loop.submit(sequence())


async def test_a_step_that_cannot_open_fails_the_load() -> None:
    with pytest.raises(ModelLoadError, match="does not load"):
        await asyncio.to_thread(BatchLoop, FakeStep(fail_open=True), 1, 1)


async def test_one_hand_off_per_step_carries_every_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    step = FakeStep(delay=0.002)
    loop = await asyncio.to_thread(BatchLoop, step, 4, 4)
    event_loop = asyncio.get_running_loop()
    calls: list[int] = []
    original = event_loop.call_soon_threadsafe

    def counted(callback: object, *args: object) -> object:
        if threading.current_thread().name == "fake-engine":
            calls.append(len(args[0]))  # type: ignore[arg-type]
        return original(callback, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(event_loop, "call_soon_threadsafe", counted)
    try:
        seqs = [sequence(max_tokens=20) for _ in range(4)]
        for seq in seqs:
            loop.submit(seq)
        for seq in seqs:
            assert text(await drain(seq)) == "".join(f"w{i} " for i in range(20))
    finally:
        await asyncio.to_thread(loop.close)
    pieces = 4 * (1 + 20 + 1)  # Started, 20 words, the end: each
    assert sum(calls) == pieces
    assert len(calls) <= step.steps + 2 < pieces / 3  # one wake-up per step, not one per token


async def test_step_timers_say_where_a_step_goes(engine: tuple[BatchLoop, FakeStep]) -> None:
    """What the bench reads from /v1/workers: ms per step in the engine's decode, in the rest of
    the step, and in the loop's own work."""
    loop, step = engine
    step.delay = 0.02
    seq = sequence(max_tokens=4)
    loop.submit(seq)
    await drain(seq)
    timers = loop.load()["step_ms"]
    assert timers["steps"] == step.steps == 4
    assert 19 <= timers["decode"] < 200, timers  # the fake's sleep
    assert 0 <= timers["sample"] < timers["decode"] and 0 <= timers["loop"] < timers["decode"], timers
