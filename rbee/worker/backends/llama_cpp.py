"""llama.cpp through llama-cpp-python (CPU, CUDA or Metal, whatever it was built with).

Layers go to the GPU as the hive asked (``gpu_layers``: -1 all, 0 none, N); the hive
has already chosen the GPU (``CUDA_VISIBLE_DEVICES``) or a ``tensor_split``. Where the
model really went is read from llama.cpp's own load log, not guessed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rbee.errors import ModelLoadError, RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Piece
from rbee.worker.backends.engine_report import parse_load_log

GGML_LOG_LEVEL_ERROR = 3


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


class LlamaCppBackend:
    name = "llama-cpp"

    def __init__(
        self, *, n_ctx: int = 2048, threads: int = 0, gpu_layers: int = 0, tensor_split: Sequence[float] = ()
    ) -> None:
        self.n_ctx = n_ctx
        self.threads = threads or os.cpu_count() or 1
        self.gpu_layers = gpu_layers
        self.tensor_split = list(tensor_split) or None
        self._llm: Any = None
        self.metadata: dict[str, str] = {}
        self.report: dict[str, Any] = {}

    def load(self, path: Path) -> None:
        import llama_cpp  # lazy: importing it loads the native library

        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        log: list[str] = []
        try:
            with captured_llama_log(log):
                self._llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=self.n_ctx, n_threads=self.threads, n_gpu_layers=self.gpu_layers,
                    tensor_split=self.tensor_split, verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            errors = " ".join(line.strip() for line in log if "error" in line.lower())[-500:]
            raise ModelLoadError(
                f"llama.cpp could not load {path}: {exc}{f' ({errors})' if errors else ''}. The file is corrupt, "
                "truncated or not a GGUF model (remove it and provision it again), or it does not fit the "
                "memory it was placed in"
            ) from exc
        layers = int(llama_cpp.llama_model_n_layer(self._llm.model)) + 1  # + the output layer, as llama.cpp counts
        self.report = parse_load_log(
            "".join(log), layers_total=layers, n_ctx=self._llm.n_ctx(),
            gpu_offload_supported=bool(llama_cpp.llama_supports_gpu_offload()),
        ).as_dict()
        self.metadata = {str(k): str(v) for k, v in self._llm.metadata.items()}
        eos = self._llm.token_eos()
        if eos >= 0:
            self.metadata["rbee.eos_text"] = self._llm.detokenize([eos], special=True).decode(errors="replace")

    def generate(self, request: JobRequest, should_stop: Callable[[], bool]) -> Iterator[Piece]:
        llm = self._llm
        assert request.prompt is not None, "chat messages are rendered to a prompt before generation"
        prompt_tokens = len(llm.tokenize(request.prompt.encode(), add_bos=True, special=True))
        if prompt_tokens + 1 > self.n_ctx:
            raise RequestError(
                f"the prompt is {prompt_tokens} tokens; the model's context holds {self.n_ctx}. Shorten it"
            )
        max_tokens = min(request.max_tokens, self.n_ctx - prompt_tokens)
        stream = llm.create_completion(
            request.prompt,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop or None,
            stream=True,
        )
        produced = 0
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                if choice["text"]:
                    produced += 1
                if choice["finish_reason"] is not None:
                    yield Piece(choice["text"], choice["finish_reason"], produced, prompt_tokens)
                    return
                yield Piece(choice["text"])
                if should_stop():
                    yield Piece("", "cancelled", produced, prompt_tokens)
                    return
            yield Piece("", "stop", produced, prompt_tokens)
        finally:
            stream.close()  # stops llama.cpp's decode loop now, not at garbage collection

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
