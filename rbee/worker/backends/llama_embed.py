"""A llama.cpp worker loaded for embeddings (``embedding=True``): one vector per input.

Pooled as the model says; a model that says none (a causal LM, such as the default model)
is pooled by the mean of its token vectors, as llama-server does for such models. Vectors
are L2-normalised, as OpenAI's are. One request at a time, on the runner's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence as Floats
from pathlib import Path
from typing import Any

from rbee.config import EMBED_MAX_CTX
from rbee.errors import RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.llama_cpp import LlamaModel, captured_llama_log, engine_report, load_failure


class LlamaEmbedBackend(LlamaModel):
    name = "llama-cpp-embed"
    slots = 1  # one request at a time, on the runner's thread

    def __init__(self, *, n_ctx: int = 2048, threads: int = 0, gpu_layers: int = 0, tensor_split: Floats[float] = (),
                 slots: int = 0, queue_limit: int = 0) -> None:
        super().__init__(n_ctx=min(n_ctx, EMBED_MAX_CTX), threads=threads, gpu_layers=gpu_layers,
                         tensor_split=tensor_split)
        self.pooling = ""
        self.embedding = False

    def load(self, path: Path) -> None:
        llama_cpp = self.native()
        self.require_file(path)
        log: list[str] = []
        try:
            with captured_llama_log(log):
                self._llm = self._open(llama_cpp, path, llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)
                self.pooling = "the model's own"
                if self._llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                    self._llm.close()
                    log.clear()
                    self._llm = self._open(llama_cpp, path, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
                    self.pooling = "mean (the model defines none)"
        except (ValueError, RuntimeError, OSError) as exc:
            raise load_failure(path, exc, log) from exc
        self.report = engine_report(llama_cpp, self._llm.model, "".join(log), self.n_ctx, self.cpu_variant)
        self.report["pooling"] = self.pooling
        self.report["dimensions"] = int(self._llm.n_embd())
        self.read_metadata()

    def _open(self, llama_cpp: Any, path: Path, pooling: int) -> Any:
        return llama_cpp.Llama(model_path=str(path), embedding=True, pooling_type=pooling, n_ctx=self.n_ctx,
                               n_batch=self.n_ctx, n_ubatch=self.n_ctx, n_threads=self.threads,
                               n_gpu_layers=self.gpu_layers, tensor_split=self.tensor_split, verbose=False)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """The vectors of ``texts``, in order, and how many tokens they were."""
        counts = [len(self._llm.tokenize(text.encode(), add_bos=True, special=False)) for text in texts]
        for index, count in enumerate(counts):
            if count > self.n_ctx:
                raise RequestError(f"input[{index}] is {count} tokens; this embedding worker takes up to "
                                   f"{self.n_ctx} per input. Split it")
        # one decode per text: llama.cpp's sums run in another order when texts share a batch, which
        # moved vectors by ~1e-3 (seen); alone, a text gets the same vector in any request
        self.embedding = True
        try:
            vectors = [self._llm.embed(text, normalize=True, truncate=False) for text in texts]
        finally:
            self.embedding = False
        return [list(map(float, vector)) for vector in vectors], sum(counts)

    def submit(self, request: JobRequest, sink: asyncio.Queue[object], loop: asyncio.AbstractEventLoop,
               cancelled: threading.Event) -> int:
        raise RequestError("this worker is loaded for embeddings: send `input`, not a prompt")

    def load_report(self) -> dict[str, Any]:
        return {"slots": 1, "slots_busy": int(self.embedding), "queue": 0, "tokens_per_s": 0.0}

    @property
    def tokens_generated(self) -> int:
        return 0

    def wake(self) -> None:
        pass
