"""The one batch loop every generating engine runs under (llama.cpp and MLX alike).

An engine plugs in as a :class:`Step`: open the model on the engine thread, admit a
sequence (a slot, room in its cache, its sampler), run one decode for every running
sequence and say what each produced, release a sequence, close. Everything else is
written once, here, and tested with a fake step (tests/unit/test_batch_loop.py):

- the bounded FIFO queue in front of the slots, with a fair ``retry_after`` when full;
- admission in arrival order, cancel (queued or running), unload;
- stop sequences, ``max_tokens`` and the end-of-generation token, and the end piece;
- a failing step ending the sequences it ran, never the loop;
- the hand-off to the event loop: once per step, carrying every sequence's new pieces,
  instead of one wake-up of the event loop per token.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rbee.errors import QueueFullError, RbeeError, RequestError
from rbee.link.bounds import ENGINE_STACK_BYTES
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Piece
from rbee.worker.stops import StopMatcher


@dataclass(frozen=True)
class Started:
    """A sequence left the queue: ``reused`` prompt tokens were already in the cache."""

    reused: int


@dataclass(eq=False)  # compared by identity: the loop's lists hold each one once
class Sequence:
    """One request inside the loop. ``sink`` is the runner's queue on ``loop``: every piece,
    the :class:`Started` mark or an exception goes there, in order."""

    request: JobRequest
    prompt: list[int]
    max_new: int
    sink: asyncio.Queue[object]
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0
    stops: StopMatcher = field(init=False)
    #: what the step keeps for this sequence (its slot, sampler, decoder…)
    state: Any = None

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.request.stop)


@dataclass(frozen=True)
class Token:
    """What one step made for one sequence: its new text (decoded by the step), or the end of
    generation (``end``: no text, the sequence stops). ``last``: the engine will make no more for
    it (its own length limit)."""

    text: str = ""
    end: bool = False
    last: bool = False
    logprobs: dict[str, Any] | None = None


class Step(Protocol):
    """An engine as the loop drives it; every method runs on the engine thread."""

    name: str
    #: seconds spent in the engine's forward pass so far (the rest of ``step`` is sampling)
    decode_s: float

    def open(self) -> None:
        """Load or create what the engine needs on its own thread (MLX's streams are thread-local)."""

    def admit(self, seq: Sequence) -> int | None:
        """Start ``seq`` if there is room: returns the prompt tokens found in the cache, or None
        when it must wait for room. Raises RbeeError for a request the engine cannot run."""

    def step(self, running: list[Sequence]) -> list[tuple[Sequence, Token]]:
        """One decode for every running sequence; what each that sampled made."""

    def release(self, seq: Sequence, keep: bool) -> None:
        """``seq`` ended: free its slot; ``keep``: its cache may serve a later prompt."""

    def close(self) -> None:
        """Free the engine (after the last step)."""


class BatchLoop:
    def __init__(self, step: Step, slots: int, queue_limit: int) -> None:
        self.step = step
        self.n_slots = slots
        self.queue_limit = queue_limit
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.tokens_generated = 0
        self._rate: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._lock = threading.Condition()
        self._closed = False
        self._out: list[tuple[Sequence, object]] = []
        self.steps = 0
        self.step_s = 0.0  # in Step.step
        self.decode_s = 0.0  # of which in the engine's forward pass (the step's own count, after each step)
        self.loop_s = 0.0  # the rest of each turn of the loop: admission, stops, hand-off
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = start_with_stack(lambda: self._run(opened), f"{step.name}-engine", ENGINE_STACK_BYTES)
        opened.result()  # raises what opening raised

    # the event loop's side ---------------------------------------------------------------

    def submit(self, seq: Sequence) -> int:
        """Queue a sequence; return its place among those that must wait (0: it starts next step).
        Past the queue limit: QueueFullError with a fair ``retry_after``."""
        with self._lock:
            if self._closed:
                raise RbeeError("the model is being unloaded")
            ahead = len(self.waiting) - (self.n_slots - len(self.active))  # still waiting once free slots fill
            if ahead >= self.queue_limit:
                raise QueueFullError(
                    f"all {self.n_slots} slots are busy and {max(ahead, 0)} requests wait (queue limit "
                    f"{self.queue_limit}); retry later, or raise `queue` for this model in the inventory",
                    retry_after=self.retry_after(),
                )
            self.waiting.append(seq)
            self._lock.notify()
            return max(0, ahead + 1)

    def wake(self) -> None:
        """A sequence was cancelled: let a sleeping loop see it now."""
        with self._lock:
            self._lock.notify()

    def load(self) -> dict[str, Any]:
        """Slots, busy slots, queue depth and tokens/s (what the scheduler weighs)."""
        with self._lock:
            return {"slots": self.n_slots, "slots_busy": len(self.active), "queue": len(self.waiting),
                    "tokens_per_s": round(self.rate(), 1), "step_ms": self.step_ms()}

    def step_ms(self) -> dict[str, float]:
        """Milliseconds per step since load: the engine's decode, its sampling, the loop's own work
        (the caller holds the lock: the three counts move together)."""
        steps, decode = max(self.steps, 1), self.decode_s
        return {"steps": float(self.steps), "decode": round(decode / steps * 1000, 3),
                "sample": round(max(self.step_s - decode, 0.0) / steps * 1000, 3),
                "loop": round(self.loop_s / steps * 1000, 3)}

    def rate(self) -> float:
        """Tokens per second over the last steps (all sequences together)."""
        if len(self._rate) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def retry_after(self) -> float:
        """Seconds until the work ahead is done at the current rate (1 to 60)."""
        rate = self.rate()
        backlog = sum(s.max_new for s in self.waiting) + sum(s.max_new - s.produced for s in list(self.active))
        return max(1.0, min(60.0, backlog / rate)) if rate > 0 else 2.0

    def close(self) -> None:
        """Unload: every sequence still queued or running ends with an error; the step closes."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    # the engine thread ---------------------------------------------------------------------

    def _run(self, opened: concurrent.futures.Future[None]) -> None:
        try:
            self.step.open()
        except BaseException as exc:
            opened.set_exception(exc)
            return
        opened.set_result(None)
        try:
            while self._wait_for_work():
                turn = time.perf_counter()
                self._drop_cancelled()
                self._admit()
                stepped = self._step() if self.active else 0.0
                self._hand_off()
                with self._lock:
                    self.loop_s += time.perf_counter() - turn - stepped
        finally:
            with self._lock:
                self._closed = True
                left = [*self.active, *self.waiting]
                self.waiting.clear()
            for seq in left:
                self._send(seq, RbeeError("the model was unloaded"))
                if seq in self.active:
                    self.step.release(seq, keep=False)
            self.active.clear()
            self._hand_off()
            self.step.close()

    def _wait_for_work(self) -> bool:
        """Sleep while there is nothing to do; False once closed."""
        with self._lock:
            while not self._closed and not self.active and not self.waiting:
                self._lock.wait(0.5)
            return not self._closed

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s in self.waiting if s.cancelled.is_set()]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in gone:
            self._send(seq, Piece("", "cancelled", 0, len(seq.prompt)))
        for seq in [s for s in self.active if s.cancelled.is_set()]:
            self._end(seq, "cancelled")

    def _admit(self) -> None:
        """Start waiting sequences, first come first served, while a slot and room are free."""
        while len(self.active) < self.n_slots:
            with self._lock:
                if not self.waiting:
                    return
                seq = self.waiting[0]
            error: RbeeError | None = None
            try:
                reused = self.step.admit(seq)
            except RbeeError as exc:
                reused, error = None, exc
            if reused is None and error is None:
                return  # no room yet: it stays first in line
            with self._lock:
                self.waiting.popleft()
                if error is None:
                    self.active.append(seq)
            self._send(seq, error if error is not None else Started(reused or 0))

    def _step(self) -> float:
        """One step of the engine and what it made; returns the seconds the engine took."""
        started = time.perf_counter()
        try:
            made = self.step.step(list(self.active))
        except Exception as exc:  # a failed decode ends every running sequence, never the loop
            for seq in list(self.active):
                self._end(seq, error=RbeeError(f"{self.step.name} failed: {exc}"), keep=False)
            return 0.0
        took = time.perf_counter() - started
        with self._lock:
            self.steps += 1
            self.step_s += took
            self.decode_s = self.step.decode_s
        for seq, token in made:
            self._take(seq, token)
        self._rate.append((time.monotonic(), self.tokens_generated))
        return took

    def _take(self, seq: Sequence, token: Token) -> None:
        if token.end:
            self._end(seq, "stop")
            return
        seq.produced += 1
        self.tokens_generated += 1
        text, hit = seq.stops.feed(token.text)
        scored = None if token.logprobs is None else [token.logprobs]
        if hit:
            self._send(seq, Piece(text, logprobs=scored))
            self._end(seq, "stop")
        elif seq.produced >= seq.max_new or token.last:
            self._send(seq, Piece(text + seq.stops.flush(), logprobs=scored))
            self._end(seq, "length")
        else:  # an empty piece too: the runner times the first token by it
            self._send(seq, Piece(text, logprobs=scored))

    def _end(self, seq: Sequence, finish: str = "stop", error: BaseException | None = None, keep: bool = True) -> None:
        with self._lock:
            self.active.remove(seq)
        self.step.release(seq, keep)
        self._send(seq, error if error is not None else Piece("", finish, seq.produced, len(seq.prompt)))

    def _send(self, seq: Sequence, item: object) -> None:
        self._out.append((seq, item))

    def _hand_off(self) -> None:
        """What this step made, to the event loop(s) in one call each."""
        if not self._out:
            return
        out, self._out = self._out, []
        for loop, items in itertools.groupby(out, key=lambda pair: pair[0].loop):
            with contextlib.suppress(RuntimeError):  # that loop is closed: its worker is shutting down
                loop.call_soon_threadsafe(deliver, list(items))


def deliver(items: list[tuple[Sequence, object]]) -> None:
    """On the event loop: each item into its sequence's queue, in order."""
    for seq, item in items:
        seq.sink.put_nowait(item)


def start_with_stack(target: Callable[[], None], name: str, size: int) -> threading.Thread:
    """Start a daemon thread with a stack of ``size`` bytes: llama.cpp's grammar code recurses
    per nesting level on it (rbee.link.bounds)."""
    with _STACK_SIZE_LOCK:
        previous = threading.stack_size(size)
        try:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    return thread


_STACK_SIZE_LOCK = threading.Lock()


class LoopBackend:
    """What a generating backend shares: its batch loop, and no embeddings."""

    engine: BatchLoop | None = None

    def queue(self, request: JobRequest, prompt: list[int], max_new: int, sink: asyncio.Queue[object],
              loop: asyncio.AbstractEventLoop, cancelled: threading.Event) -> int:
        assert self.engine is not None, "load first"
        return self.engine.submit(Sequence(request, prompt, max_new, sink, loop, cancelled))

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        raise RequestError("this worker generates text; embeddings need a worker loaded for them (the hive "
                           "starts one when a job brings `input`)")

    def load_report(self) -> dict[str, Any]:
        return self.engine.load() if self.engine is not None else {}

    @property
    def tokens_generated(self) -> int:
        return self.engine.tokens_generated if self.engine is not None else 0

    def wake(self) -> None:
        if self.engine is not None:
            self.engine.wake()

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
