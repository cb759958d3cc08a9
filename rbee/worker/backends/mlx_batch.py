"""Continuous batching for MLX with mlx-lm's own ``BatchGenerator``.

One engine thread loads the model and runs every generation step (MLX streams are
thread-local, so both happen on that thread). Requests join the generator as they
arrive and leave it the moment they finish or are cancelled; each response's token
becomes text at once. Sampling is per request (temperature, top_p, min_p, top_k);
mlx-lm's batch generator has no per-request seed, so ``seed`` is not honoured here.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee.errors import ModelLoadError, RbeeError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Piece
from rbee.worker.backends.engine_queue import EngineQueue
from rbee.worker.backends.llama_batch import Emit
from rbee.worker.stops import StopMatcher


@dataclass
class MlxSequence:
    request: JobRequest
    prompt: list[int]
    max_new: int
    emit: Emit
    cancelled: threading.Event
    on_start: Any = None
    uid: int = -1
    tokens: list[int] = field(default_factory=list)
    detokenizer: Any = None  # mlx-lm's streaming detokenizer, one per sequence
    stops: StopMatcher = field(default_factory=lambda: StopMatcher([]))


class MlxBatchEngine(EngineQueue[MlxSequence]):
    def __init__(self, path: Path, *, slots: int, queue_limit: int) -> None:
        super().__init__(slots, queue_limit)
        self.model: Any = None
        self.tokenizer: Any = None
        self.active: dict[int, MlxSequence] = {}
        self._loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(path,), name="mlx-engine", daemon=True)
        self._thread.start()
        self._loaded.result()  # raises what loading raised

    def busy_slots(self) -> int:
        return len(self.active)

    def close(self) -> None:
        self.stop(self._thread)

    # the engine thread ---------------------------------------------------------------------

    def _run(self, path: Path) -> None:
        import mlx_lm
        from mlx_lm.generate import BatchGenerator

        try:
            self.model, self.tokenizer = mlx_lm.load(str(path))[:2]
            generator = BatchGenerator(self.model, stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
                                       completion_batch_size=self.n_slots, prefill_batch_size=self.n_slots)
        except Exception as exc:  # mlx-lm raises many kinds for a broken model
            self._loaded.set_exception(ModelLoadError(f"mlx-lm could not load {path}: {exc}"))
            return
        self._loaded.set_result(None)
        try:
            while self.wait_for_work(len(self.active)):
                self._drop_cancelled(generator)
                self._admit(generator)
                if self.active:
                    for response in generator.next_generated():
                        self._take(generator, response)
                    self.stepped()
        finally:
            generator.close()
            for seq in [*self.active.values(), *self.waiting]:
                seq.emit(RbeeError("the model was unloaded"))

    def _drop_cancelled(self, generator: Any) -> None:
        with self._lock:
            for seq in [s for s in self.waiting if s.cancelled.is_set()]:
                self.waiting.remove(seq)
                seq.emit(Piece("", "cancelled", 0, len(seq.prompt)))
        for seq in [s for s in self.active.values() if s.cancelled.is_set()]:
            self._end(generator, seq, "cancelled")

    def _admit(self, generator: Any) -> None:
        from mlx_lm.sample_utils import make_sampler

        while True:
            with self._lock:
                if not self.waiting or len(self.active) >= self.n_slots:
                    return
                seq = self.waiting.popleft()
            request = seq.request
            sampler = make_sampler(temp=request.temperature, top_p=request.top_p if request.top_p < 1 else 0.0,
                                   min_p=request.min_p, top_k=request.top_k)
            (seq.uid,) = generator.insert([seq.prompt], [seq.max_new], samplers=[sampler])
            seq.stops = StopMatcher(request.stop)
            seq.detokenizer = self.tokenizer.detokenizer  # a fresh copy per caller
            with self._lock:
                self.active[seq.uid] = seq
            if seq.on_start is not None:
                seq.on_start(0)

    def _take(self, generator: Any, response: Any) -> None:
        seq = self.active.get(response.uid)
        if seq is None:
            return
        if response.finish_reason == "stop":  # an end-of-sequence token: no text
            self._end(generator, seq, "stop", remove=False)
            return
        seq.tokens.append(int(response.token))
        self.tokens_generated += 1
        detokenizer = seq.detokenizer
        detokenizer.add_token(int(response.token))
        if response.finish_reason is not None:
            detokenizer.finalize()  # the last token: what it holds back goes out now
        out, hit = seq.stops.feed(detokenizer.last_segment)
        if hit:
            seq.emit(Piece(out))
            self._end(generator, seq, "stop")
        elif response.finish_reason is not None:
            seq.emit(Piece(out + seq.stops.flush()))
            self._end(generator, seq, "length", remove=False)
        else:
            seq.emit(Piece(out))

    def _end(self, generator: Any, seq: MlxSequence, finish: str, remove: bool = True) -> None:
        with self._lock:
            self.active.pop(seq.uid, None)
        if remove:
            generator.remove([seq.uid])
        seq.emit(Piece("", finish, len(seq.tokens), len(seq.prompt)))
