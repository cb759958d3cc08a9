"""The runner: what the worker's app asks of its one loaded model.

A generating engine runs its own thread under the batch loop
(rbee/worker/backends/loop.py) and serves many requests at once: the runner submits
each request and reads its pieces from a queue the loop fills once per step. An
exception travels through the same queue and is raised here. Cancelling sets the
request's flag and wakes the loop, which frees the slot at its next step.

Loading, embedding and closing run on the model-owner thread, one at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Backend, Piece
from rbee.worker.backends.loop import Started

Narrate = Callable[..., None]


class ModelRunner:
    """Owns one loaded model and hands requests to its engine."""

    def __init__(self, backend: Backend, model_path: Path) -> None:
        self.backend = backend
        self.model_path = model_path
        self.state = "loading"
        self.jobs_done = 0
        self.waiting = 0  # embedding requests waiting for the model-owner thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-owner")
        self._turn = asyncio.Lock()

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self.backend.load, self.model_path)
        self.state = "ready"

    @property
    def tokens_generated(self) -> int:
        """Tokens the engine sampled, cancelled streams included."""
        return self.backend.tokens_generated

    @property
    def busy(self) -> bool:
        load = self.occupancy()
        return load["slots_busy"] >= load["slots"]

    def occupancy(self) -> dict[str, Any]:
        """Slots, busy slots, queue depth, tokens/s (what the scheduler weighs)."""
        if self.state not in ("ready", "busy"):
            return {"slots": self.backend.slots, "slots_busy": 0, "queue": 0, "tokens_per_s": 0.0}
        report = dict(self.backend.load_report())
        report["queue"] = report.get("queue", 0) + self.waiting
        return report

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors for ``texts`` and their token count, from a backend loaded for embeddings."""
        self.waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self.waiting -= 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._thread, self.backend.embed, texts)
        finally:
            self._turn.release()
        self.jobs_done += 1
        return result

    async def generate(self, request: JobRequest, narrate: Narrate | None = None) -> AsyncGenerator[Piece, None]:
        """Pieces of one generation, each step's as soon as the engine made them.

        Closing this generator early (or cancelling its consumer) stops the engine
        within one step and frees the request's slot.
        """
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()
        try:
            # tokenizing a long prompt takes a while: off the event loop
            position = await asyncio.to_thread(self.backend.submit, request, queue, asyncio.get_running_loop(),
                                               cancelled)
            if position and narrate is not None:
                narrate("queue", f"waiting, position {position}", position=position)
            while True:
                item = await queue.get()
                if isinstance(item, Started):
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
            self.backend.wake()

    def close(self) -> None:
        """Free the model on the thread that owns it, then end the thread."""
        self._thread.submit(self.backend.close).result()
        self._thread.shutdown(wait=True)
