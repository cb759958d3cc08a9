"""llama.cpp through llama-cpp-python (CPU, CUDA or Metal, whatever it was built with)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rbee.errors import ModelLoadError, RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Piece


class LlamaCppBackend:
    name = "llama-cpp"

    def __init__(self, *, n_ctx: int = 2048, threads: int = 0) -> None:
        self.n_ctx = n_ctx
        self.threads = threads or os.cpu_count() or 1
        self._llm: Any = None
        self.metadata: dict[str, str] = {}

    def load(self, path: Path) -> None:
        from llama_cpp import Llama  # lazy: importing it loads the native library

        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            self._llm = Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.threads, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {path}: {exc}. The file is corrupt, truncated or not a GGUF "
                "model; remove it and provision it again"
            ) from exc
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
