"""The model-owner thread: the only thread that touches the engine.

Generation runs on that one thread and hands each piece to the event loop
through a per-request queue the moment the engine yields it; an exception
travels through the same queue and is raised on the async side. Cancelling
is a flag the generation loop checks after every token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Backend, Piece

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ModelRunner:
    """Owns one loaded model; serves one generation at a time, the rest wait in line."""

    def __init__(self, backend: Backend, model_path: Path) -> None:
        self.backend = backend
        self.model_path = model_path
        self.state = "loading"
        self.tokens_generated = 0
        self.jobs_done = 0
        self.waiting = 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-owner")
        self._turn = asyncio.Lock()

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self.backend.load, self.model_path)
        self.state = "ready"

    @property
    def busy(self) -> bool:
        return self._turn.locked()

    async def generate(self, request: JobRequest) -> AsyncGenerator[Piece, None]:
        """Pieces of one generation, each as soon as the engine made it.

        Closing this generator early (or cancelling its consumer) stops the engine
        within one token and waits for the thread to let go of the model.
        """
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
                for piece in self.backend.generate(request, stop.is_set):
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
                    self.tokens_generated += 1
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

    def close(self) -> None:
        """Free the model on the thread that owns it, then end the thread."""
        self._thread.submit(self.backend.close).result()
        self._thread.shutdown(wait=True)
