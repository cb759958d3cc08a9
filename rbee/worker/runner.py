"""The model-owner thread: the only thread that touches the engine.

A batching engine (llama.cpp and MLX both are) runs its own thread and serves
many requests at once: the runner submits each request and receives its pieces.
A serial engine (only the worker tests' fake one today) generates on the
runner's one thread, one request at a time. Either
way each piece reaches the event loop through a per-request queue the moment
the engine makes it; an exception travels through the same queue and is raised
on the async side. Cancelling is a flag the engine checks at every step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from rbee.errors import RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Backend, BatchingBackend, Piece, SerialBackend

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Started:
    def __init__(self, reused: int) -> None:
        self.reused = reused


Narrate = Callable[..., None]


class ModelRunner:
    """Owns one loaded model and hands requests to its engine: all at once to a batching engine,
    one after another to a serial one."""

    def __init__(self, backend: Backend, model_path: Path) -> None:
        self.backend = backend
        self.model_path = model_path
        self.state = "loading"
        self._tokens = 0
        self.jobs_done = 0
        self.waiting = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-owner")
        self._turn = asyncio.Lock()

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self.backend.load, self.model_path)
        self.state = "ready"

    @property
    def tokens_generated(self) -> int:
        """Tokens the engine sampled (a batching engine counts its own, cancelled streams included)."""
        engine = getattr(self.backend, "engine", None)
        return int(engine.tokens_generated) if engine is not None else self._tokens

    @property
    def batching(self) -> bool:
        return hasattr(self.backend, "submit")

    @property
    def busy(self) -> bool:
        if self.batching:
            load = self.occupancy()
            return bool(load) and load["slots_busy"] >= load["slots"]
        return self._turn.locked()

    def occupancy(self) -> dict[str, Any]:
        """Slots, busy slots, queue depth, tokens/s (what the scheduler weighs)."""
        if self.batching:
            if self.state in ("ready", "busy"):
                return cast(BatchingBackend, self.backend).load_report()
            return {"slots": int(getattr(self.backend, "slots", 1)), "slots_busy": 0, "queue": 0, "tokens_per_s": 0.0}
        return {"slots": 1, "slots_busy": int(self._turn.locked()), "queue": self.waiting, "tokens_per_s": 0.0}

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors for ``texts`` and their token count, from a backend loaded for embeddings."""
        embed = getattr(self.backend, "embed", None)
        if embed is None:
            raise RequestError("this worker generates text; embeddings need a worker loaded for them (the hive "
                               "starts one when a job brings `input`)")
        self.waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self.waiting -= 1
        try:
            result: tuple[list[list[float]], int] = await asyncio.get_running_loop().run_in_executor(
                self._thread, embed, texts)
        finally:
            self._turn.release()
        self.jobs_done += 1
        return result

    async def generate(self, request: JobRequest, narrate: Narrate | None = None) -> AsyncGenerator[Piece, None]:
        """Pieces of one generation, each as soon as the engine made it.

        Closing this generator early (or cancelling its consumer) stops the engine
        within one step and frees the request's slot.
        """
        if self.batching:
            async for piece in self._batched(request, narrate):
                yield piece
            return
        if narrate is not None and self.busy:
            narrate("queue", f"waiting, position {self.waiting + 1}")
        self.waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                for piece in cast(SerialBackend, self.backend).generate(request, stop.is_set):
                    put(piece)
            except BaseException as exc:  # handed to the async side, raised there
                put(_Failure(exc))
            finally:
                put(_END)

        self.state = "busy"
        done = loop.run_in_executor(self._thread, work)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                assert isinstance(item, Piece)
                if item.text:
                    self._tokens += 1
                yield item
        finally:
            stop.set()
            try:
                await asyncio.shield(done)
            finally:
                # The one-thread executor keeps the engine serial even if we stop waiting early.
                self.jobs_done += 1
                self.state = "ready"
                self._turn.release()

    async def _batched(self, request: JobRequest, narrate: Narrate | None) -> AsyncGenerator[Piece, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            position = await asyncio.to_thread(
                cast(BatchingBackend, self.backend).submit, request, put, cancelled,
                lambda reused: put(_Started(reused)),
            )
            if position and narrate is not None:
                narrate("queue", f"waiting, position {position}", position=position)
            while True:
                item = await queue.get()
                if isinstance(item, _Started):
                    if narrate is not None and item.reused:
                        narrate("cache", f"{item.reused} prompt tokens reused from the KV cache")
                    continue
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Piece)
                yield item
                if item.finish_reason is not None:
                    self.jobs_done += 1
                    return
        finally:
            cancelled.set()  # a no-op after the end; otherwise the engine frees the slot at its next step
            wake = getattr(self.backend, "engine", None)
            if wake is not None:
                wake.wake()

    def close(self) -> None:
        """Free the model on the thread that owns it, then end the thread."""
        self._thread.submit(self.backend.close).result()
        self._thread.shutdown(wait=True)
