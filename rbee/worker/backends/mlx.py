"""Apple's MLX through mlx-lm (Metal on Apple Silicon; ``mlx[cpu]`` elsewhere).

Like every backend it runs on the worker's model-owner thread: MLX streams are
thread-local, so loading and generating on that one thread is also what MLX needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rbee.errors import ModelLoadError, RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Piece
from rbee.worker.backends.engine_report import EngineReport
from rbee.worker.stops import StopMatcher

REQUIRED = ("config.json",)


class MlxBackend:
    name = "mlx"

    def __init__(
        self, *, n_ctx: int = 2048, threads: int = 0, gpu_layers: int = -1, tensor_split: Sequence[float] = (),
        slots: int = 1, queue_limit: int = 64,
    ) -> None:
        self.n_ctx = n_ctx  # MLX has no layer offload or split: it runs where MLX's default device is
        self._model: Any = None
        self._tokenizer: Any = None
        self.metadata: dict[str, str] = {}
        self.report: dict[str, Any] = {}

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
        self.report = self._report(config)

    def _report(self, config: dict[str, Any]) -> dict[str, Any]:
        """MLX puts everything on its default device: the GPU (unified memory) on Apple Silicon."""
        import mlx.core as mx

        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        layers = int(config.get("num_hidden_layers", 0) or 0)
        weights = int(mx.get_active_memory()) if hasattr(mx, "get_active_memory") else 0
        return EngineReport(
            device="Metal (unified memory)" if on_gpu else "CPU",
            layers_offloaded=layers if on_gpu else 0,
            layers_total=layers,
            weights_on_device=weights if on_gpu else 0,
            kv_on_device=0,  # MLX grows its KV cache per request
            weights_in_ram=0 if on_gpu else weights,
            kv_in_ram=0,
            n_ctx=self.n_ctx,
            gpu_offload_supported=bool(mx.metal.is_available()),
        ).as_dict()

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
