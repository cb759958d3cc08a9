"""A model-free step for the batch loop (rbee/worker/backends/loop.py), and a backend on it:
the loop's own tests and the worker app's drive the real loop and runner with them."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from rbee.errors import ModelLoadError, RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.loop import BatchLoop, LoopBackend, Sequence, Token


class FakeStep:
    """Each running sequence makes "w0 ", "w1 ", … one word per step. A prompt holding "eog"
    meets its end-of-generation token after two words; "refuse" is refused at admission;
    ``room`` limits how many may run at once below the slots (a full KV cache)."""

    name = "fake"

    def __init__(self, delay: float = 0.0, fail_at: int | None = None, room: int | None = None,
                 fail_open: bool = False) -> None:
        self.delay = delay
        self.fail_at = fail_at
        self.room = room
        self.fail_open = fail_open
        self.steps = 0
        self.running = 0
        self.threads: set[str] = set()
        self.batch_sizes: list[int] = []
        self.released: list[tuple[str, bool]] = []
        self.closed = False
        self.decode_s = 0.0

    def open(self) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail_open:
            raise ModelLoadError("the fake model does not load")

    def admit(self, seq: Sequence) -> int | None:
        if "refuse" in str(seq.request.prompt):
            raise RequestError("the fake engine refuses this request")
        if self.room is not None and self.running >= self.room:
            return None
        self.running += 1
        seq.state = 0
        return 3 if "cached" in str(seq.request.prompt) else 0

    def step(self, running: list[Sequence]) -> list[tuple[Sequence, Token]]:
        self.threads.add(threading.current_thread().name)
        if self.delay:
            started = time.perf_counter()
            time.sleep(self.delay)  # the fake's "forward pass"
            self.decode_s += time.perf_counter() - started
        self.steps += 1
        self.batch_sizes.append(len(running))
        if self.fail_at is not None and self.steps == self.fail_at:
            raise RuntimeError("engine exploded")
        made = []
        for seq in running:
            if "eog" in str(seq.request.prompt) and seq.state == 2:
                made.append((seq, Token(end=True)))
                continue
            made.append((seq, Token(f"w{seq.state} ")))
            seq.state += 1
        return made

    def release(self, seq: Sequence, keep: bool) -> None:
        self.running -= 1
        self.released.append((str(seq.request.prompt), keep))

    def close(self) -> None:
        self.closed = True


class FakeBackend(LoopBackend):
    """A generating backend on the fake step: the worker app's tests run the real loop with it."""

    name = "fake"
    metadata: ClassVar[dict[str, str]] = {"general.architecture": "gemma3"}
    report: ClassVar[dict[str, Any]] = {}

    def __init__(self, step: FakeStep | None = None, slots: int = 4, queue_limit: int = 8) -> None:
        self.step = step or FakeStep(delay=0.005)
        self.slots = slots
        self.queue_limit = queue_limit

    def load(self, path: Path) -> None:
        if path.name == "broken.gguf":
            raise ModelLoadError(f"cannot load {path}")
        self.engine = BatchLoop(self.step, self.slots, self.queue_limit)

    def submit(self, request: JobRequest, sink: asyncio.Queue[object], loop: asyncio.AbstractEventLoop,
               cancelled: threading.Event) -> int:
        prompt = list(range(len(str(request.prompt or ""))))
        return self.queue(request, prompt, request.max_tokens, sink, loop, cancelled)

    def close(self) -> None:
        self.close_engine()
