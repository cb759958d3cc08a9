"""Apple's MLX through mlx-lm (Metal on Apple Silicon; ``mlx[cpu]`` elsewhere).

Like every backend it runs on the worker's model-owner thread: MLX streams are
thread-local, so loading and generating on that one thread is also what MLX needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rbee.errors import ModelLoadError, RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Piece
from rbee.worker.stops import StopMatcher

REQUIRED = ("config.json",)


class MlxBackend:
    name = "mlx"

    def __init__(self, *, n_ctx: int = 2048, threads: int = 0) -> None:
        self.n_ctx = n_ctx
        self._model: Any = None
        self._tokenizer: Any = None
        self.metadata: dict[str, str] = {}

    def load(self, path: Path) -> None:
        import mlx_lm  # lazy: only hosts that run MLX have it

        if not path.is_dir():
            raise ModelLoadError(f"MLX model directory not found: {path}")
        missing = [name for name in REQUIRED if not (path / name).is_file()]
        if not list(path.glob("*.safetensors")):
            missing.append("*.safetensors")
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
            missing.append("tokenizer.json")
        if missing:
            raise ModelLoadError(f"MLX model directory {path} lacks {', '.join(missing)}; provision it again")
        try:
            self._model, self._tokenizer = mlx_lm.load(str(path))[:2]
        except Exception as exc:  # mlx-lm raises many kinds for a broken model
            raise ModelLoadError(f"mlx-lm could not load {path}: {exc}") from exc
        config = json.loads((path / "config.json").read_text())
        self.metadata = {"general.architecture": str(config.get("model_type", "unknown"))}
        template = getattr(self._tokenizer, "chat_template", None)
        if template:
            self.metadata["tokenizer.chat_template"] = str(template)
        eos = getattr(self._tokenizer, "eos_token", None)
        if eos:
            self.metadata["rbee.eos_text"] = str(eos)

    def generate(self, request: JobRequest, should_stop: Callable[[], bool]) -> Iterator[Piece]:
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.sample_utils import make_sampler

        assert request.prompt is not None, "chat messages are rendered to a prompt before generation"
        prompt = self._tokenizer.encode(request.prompt)
        if len(prompt) + 1 > self.n_ctx:
            raise RequestError(f"the prompt is {len(prompt)} tokens; the context holds {self.n_ctx}. Shorten it")
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p if request.top_p < 1 else 0.0)
        stops = StopMatcher(request.stop)
        produced = 0
        finish = "stop"
        max_tokens = min(request.max_tokens, self.n_ctx - len(prompt))
        stream = mlx_lm.stream_generate(self._model, self._tokenizer, prompt, max_tokens=max_tokens, sampler=sampler)
        try:
            for response in stream:
                text, hit = stops.feed(response.text)
                if text:
                    produced += 1
                if hit:
                    yield Piece(text, "stop", produced, len(prompt))
                    return
                if response.finish_reason is not None:
                    finish = response.finish_reason
                    tail = stops.flush()
                    yield Piece(text + tail, finish, produced + bool(tail and not text), len(prompt))
                    return
                yield Piece(text)
                if should_stop():
                    yield Piece("", "cancelled", produced, len(prompt))
                    return
            yield Piece(stops.flush(), finish, produced, len(prompt))
        finally:
            stream.close()

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
