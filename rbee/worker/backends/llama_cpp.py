"""llama.cpp through llama-cpp-python (CPU, CUDA or Metal, whatever it was built with),
serving many requests at once (continuous batching, rbee/worker/backends/llama_batch.py).

Layers go to the GPU as the hive asked (``gpu_layers``: -1 all, 0 none, N); the hive
has already chosen the GPU (``CUDA_VISIBLE_DEVICES``) or a ``tensor_split``. Where the
model really went is read from llama.cpp's own load log, not guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from collections.abc import Sequence as Floats
from pathlib import Path
from typing import Any

from rbee.errors import ModelLoadError, RbeeError, RequestError
from rbee.link.engine_report import parse_load_log
from rbee.link.schemas import JobRequest
from rbee.worker.backends.llama_batch import LlamaStep
from rbee.worker.backends.loop import BatchLoop, LoopBackend
from rbee.worker.structured import grammar_for

GGML_LOG_LEVEL_ERROR = 3
STUB_CTX = 256  # the high-level Llama's own context (and an 8-token batch): it computes nothing


@contextlib.contextmanager
def captured_llama_log(sink: list[str]) -> Iterator[None]:
    """Collect what llama.cpp logs (errors still reach the worker's log), then give the log
    back to llama-cpp-python's own handler."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        sink.append(line)
        if level == GGML_LOG_LEVEL_ERROR:
            print(line, end="", file=sys.stderr, flush=True)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def load_failure(path: Path, exc: BaseException, log: list[str]) -> ModelLoadError:
    """Why llama.cpp would not load ``path``, with its own error lines and what to do."""
    errors = " ".join(line.strip() for line in log if "error" in line.lower())[-500:]
    return ModelLoadError(
        f"llama.cpp could not load {path}: {exc}{f' ({errors})' if errors else ''}. The file is corrupt, "
        "truncated or not a GGUF model (remove it and provision it again), or it does not fit the "
        "memory it was placed in"
    )


def engine_report(llama_cpp: Any, model: Any, log: str, n_ctx: int, cpu_variant: str = "") -> dict[str, Any]:
    """Where the model went (device, layers, bytes), from llama.cpp's load log."""
    layers = int(llama_cpp.llama_model_n_layer(model)) + 1  # + the output layer, as llama.cpp counts
    return parse_load_log(log, layers_total=layers, n_ctx=n_ctx, cpu_variant=cpu_variant,
                          gpu_offload_supported=bool(llama_cpp.llama_supports_gpu_offload())).as_dict()


def default_slots(n_ctx: int) -> int:
    """Sequences one worker decodes together when the inventory does not say (`parallel`): up to 8,
    with at least 1024 tokens of the shared context per sequence."""
    return max(1, min(8, n_ctx // 1024))


class LlamaModel:
    """What both llama.cpp backends (generating, embedding) share: the hive's context, threads and
    layer placement, the high-level ``Llama`` they load, and its metadata. No ``submit`` here: the
    runner takes a backend with one for a batching engine."""

    def __init__(self, *, n_ctx: int, threads: int, gpu_layers: int, tensor_split: Floats[float]) -> None:
        self.n_ctx = n_ctx
        self.threads = threads or os.cpu_count() or 1
        self.gpu_layers = gpu_layers
        self.tensor_split = list(tensor_split) or None
        self._llm: Any = None
        self.metadata: dict[str, str] = {}
        self.report: dict[str, Any] = {}
        self.cpu_variant = ""

    def native(self) -> Any:
        """``llama_cpp``, with its build's backends registered first: for a portable build, the CPU
        variant the hive proved on this host (``RBEE_CPU_VARIANT``)."""
        from rbee.engine import backends

        self.cpu_variant = backends.load().variant
        import llama_cpp

        return llama_cpp

    @staticmethod
    def require_file(path: Path) -> None:
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")

    def read_metadata(self) -> None:
        self.metadata = {str(k): str(v) for k, v in self._llm.metadata.items()}

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


class LlamaCppBackend(LoopBackend, LlamaModel):
    """Loads the model with llama-cpp-python (weights, tokenizer, metadata) and serves it with
    a :class:`BatchLoop` of :class:`LlamaStep`: continuous batching over ``slots`` sequences on
    the low-level API."""

    name = "llama-cpp"

    def __init__(
        self, *, n_ctx: int = 2048, threads: int = 0, gpu_layers: int = 0, tensor_split: Floats[float] = (),
        slots: int = 0, queue_limit: int = 32,
    ) -> None:
        super().__init__(n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, tensor_split=tensor_split)
        self.slots = slots or default_slots(n_ctx)
        self.queue_limit = queue_limit
        self.n_ctx_engine = 0

    def load(self, path: Path) -> None:
        llama_cpp = self.native()  # lazy: importing it loads the native library
        self.require_file(path)
        log: list[str] = []
        engine_log: list[str] = []
        try:
            with captured_llama_log(log):
                # The high-level object gives weights, tokenizer and metadata; its own context is a
                # token stub: the engine's context (below) holds the real KV cache.
                self._llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=STUB_CTX, n_batch=8, n_ubatch=8, n_threads=self.threads,
                    n_gpu_layers=self.gpu_layers, tensor_split=self.tensor_split, verbose=False,
                )
            with captured_llama_log(engine_log):
                step = LlamaStep(llama_cpp, self._llm.model, n_ctx=self.n_ctx, slots=self.slots, threads=self.threads)
                self.engine = BatchLoop(step, self.slots, self.queue_limit)
                self.n_ctx_engine = step.n_ctx
        except (ValueError, RuntimeError, OSError, RbeeError) as exc:
            raise load_failure(path, exc, [*log, *engine_log]) from exc
        model_lines = [line for line in "".join(log).splitlines(keepends=True) if "KV buffer size" not in line]
        self.report = engine_report(llama_cpp, self._llm.model, "".join([*model_lines, *engine_log]),
                                    self.n_ctx_engine, self.cpu_variant)
        self.read_metadata()
        eos = self._llm.token_eos()
        if eos >= 0:
            self.metadata["rbee.eos_text"] = self._llm.detokenize([eos], special=True).decode(errors="replace")

    def submit(self, request: JobRequest, sink: asyncio.Queue[object], loop: asyncio.AbstractEventLoop,
               cancelled: threading.Event) -> int:
        """Tokenize and queue one request (see Backend.submit)."""
        assert request.prompt is not None, "chat is rendered before"
        if request.response_format is not None:
            request = request.model_copy(update={"grammar": grammar_for(request.response_format),
                                                 "response_format": None})
        prompt = self._llm.tokenize(str(request.prompt).encode(), add_bos=True, special=True)
        n_ctx = self.n_ctx_engine
        if len(prompt) + 1 > n_ctx:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens; the worker's context holds {n_ctx}. Shorten it, or ask for "
                "a larger context (`--ctx`, or `ctx =` for the model in the inventory)"
            )
        return self.queue(request, prompt, min(request.max_tokens, n_ctx - len(prompt)), sink, loop, cancelled)

    def close(self) -> None:
        self.close_engine()
        super().close()
