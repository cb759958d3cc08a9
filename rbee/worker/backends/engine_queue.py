"""What both batching engines (llama.cpp, MLX) share: the bounded FIFO queue in front of
their slots, the tokens/s gauge, and the engine thread's sleep, wake-up and stop."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Generic, TypeVar

from rbee.errors import QueueFullError, RbeeError

S = TypeVar("S")


class EngineQueue(Generic[S]):
    def __init__(self, slots: int, queue_limit: int) -> None:
        self.n_slots = slots
        self.queue_limit = queue_limit
        self.waiting: collections.deque[S] = collections.deque()
        self.tokens_generated = 0
        self._rate: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._lock = threading.Condition()
        self._closed = False

    def busy_slots(self) -> int:
        raise NotImplementedError

    def retry_after(self) -> float:
        return 2.0

    def submit(self, seq: S) -> int:
        """Queue a sequence; return its place among those that must wait (0: it starts next step).
        Past the queue limit: QueueFullError with a fair ``retry_after``."""
        with self._lock:
            if self._closed:
                raise RbeeError("the model is being unloaded")
            ahead = len(self.waiting) - (self.n_slots - self.busy_slots())  # still waiting once free slots fill
            if ahead >= self.queue_limit:
                raise QueueFullError(
                    f"all {self.n_slots} slots are busy and {max(ahead, 0)} requests wait (queue limit "
                    f"{self.queue_limit}); retry later, or raise `queue` for this model in the inventory",
                    retry_after=self.retry_after(),
                )
            self.waiting.append(seq)
            self._lock.notify()
            return max(0, ahead + 1)

    def rate(self) -> float:
        """Tokens per second over the last steps (all sequences together)."""
        if len(self._rate) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def stepped(self) -> None:
        self._rate.append((time.monotonic(), self.tokens_generated))

    def load(self) -> dict[str, Any]:
        with self._lock:
            return {"slots": self.n_slots, "slots_busy": self.busy_slots(), "queue": len(self.waiting),
                    "tokens_per_s": round(self.rate(), 1)}

    def wait_for_work(self, running: int) -> bool:
        """On the engine thread: sleep while there is nothing to do; False once closed."""
        with self._lock:
            while not self._closed and not running and not self.waiting:
                self._lock.wait(0.5)
            return not self._closed

    def wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def stop(self, thread: threading.Thread) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        thread.join()
