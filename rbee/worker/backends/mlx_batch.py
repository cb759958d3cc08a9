"""Continuous batching for MLX with mlx-lm's own ``BatchGenerator``, as the step of the batch
loop (rbee/worker/backends/loop.py).

The loop's engine thread loads the model and runs every generation step (MLX streams are
thread-local, so both happen on that thread). Sampling is per request (temperature,
top_p, min_p, top_k); mlx-lm's batch generator has no per-request seed, so ``seed`` is not
honoured here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee.errors import ModelLoadError
from rbee.worker.backends.loop import Sequence, Token


@dataclass(eq=False)
class MlxState:
    """What the MLX step keeps for one sequence."""

    uid: int
    detokenizer: Any  # mlx-lm's streaming detokenizer, one per sequence


class MlxStep:
    """mlx-lm's ``BatchGenerator`` as one step of the batch loop: sequences join it as they are
    admitted and leave it the moment they end; each response's token becomes text at once."""

    name = "MLX"

    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self.n_slots = slots
        self.model: Any = None
        self.tokenizer: Any = None
        self.generator: Any = None
        self._by_uid: dict[int, Sequence] = {}
        self._finished: set[int] = set()  # uids the generator ended itself (its own length limit)
        self.decode_s = 0.0  # mlx-lm's generator forwards and samples in one call: all counted here

    def open(self) -> None:
        import mlx_lm
        from mlx_lm.generate import BatchGenerator

        try:
            self.model, self.tokenizer = mlx_lm.load(str(self.path))[:2]
            self.generator = BatchGenerator(self.model, stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
                                            completion_batch_size=self.n_slots, prefill_batch_size=self.n_slots)
        except Exception as exc:  # mlx-lm raises many kinds for a broken model
            raise ModelLoadError(f"mlx-lm could not load {self.path}: {exc}") from exc

    def close(self) -> None:
        if self.generator is not None:
            self.generator.close()

    def admit(self, seq: Sequence) -> int | None:
        from mlx_lm.sample_utils import make_sampler

        request = seq.request
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p if request.top_p < 1 else 0.0,
                               min_p=request.min_p, top_k=request.top_k)
        (uid,) = self.generator.insert([seq.prompt], [seq.max_new], samplers=[sampler])
        seq.state = MlxState(uid, self.tokenizer.detokenizer)  # a fresh detokenizer per caller
        self._by_uid[uid] = seq
        return 0  # mlx-lm keeps no prefix cache between requests

    def step(self, running: list[Sequence]) -> list[tuple[Sequence, Token]]:
        made = []
        started = time.perf_counter()
        responses = self.generator.next_generated()
        self.decode_s += time.perf_counter() - started
        for response in responses:
            seq = self._by_uid.get(response.uid)
            if seq is None:
                continue
            if response.finish_reason is not None:
                self._finished.add(response.uid)
            if response.finish_reason == "stop":  # an end-of-sequence token: no text
                made.append((seq, Token(end=True)))
                continue
            detokenizer = seq.state.detokenizer
            detokenizer.add_token(int(response.token))
            if response.finish_reason is not None:
                detokenizer.finalize()  # the last token: what it holds back goes out now
            made.append((seq, Token(detokenizer.last_segment, last=response.finish_reason is not None)))
        return made

    def release(self, seq: Sequence, keep: bool) -> None:
        uid = seq.state.uid
        self._by_uid.pop(uid, None)
        if uid in self._finished:
            self._finished.discard(uid)
        else:
            self.generator.remove([uid])
