"""Apple's MLX through mlx-lm (Metal on Apple Silicon; ``mlx[cpu]`` elsewhere), serving
many requests at once with mlx-lm's batch generator (rbee/worker/backends/mlx_batch.py),
whose one thread both loads the model and generates: MLX streams are thread-local.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rbee.errors import ModelLoadError, RequestError
from rbee.link.engine_report import EngineReport
from rbee.link.schemas import JobRequest
from rbee.worker.backends.loop import BatchLoop, LoopBackend
from rbee.worker.backends.mlx_batch import MlxStep

REQUIRED = ("config.json",)


class MlxBackend(LoopBackend):
    name = "mlx"

    def __init__(
        self, *, n_ctx: int = 2048, threads: int = 0, gpu_layers: int = -1, tensor_split: Sequence[float] = (),
        slots: int = 0, queue_limit: int = 64,
    ) -> None:
        self.n_ctx = n_ctx  # MLX has no layer offload or split: it runs where MLX's default device is
        self.slots = slots or 8  # its KV caches grow per sequence: the context does not bound the slots
        self.queue_limit = queue_limit
        self._tokenizer: Any = None
        self.metadata: dict[str, str] = {}
        self.report: dict[str, Any] = {}

    def load(self, path: Path) -> None:

        if not path.is_dir():
            raise ModelLoadError(f"MLX model directory not found: {path}")
        missing = [name for name in REQUIRED if not (path / name).is_file()]
        if not list(path.glob("*.safetensors")):
            missing.append("*.safetensors")
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
            missing.append("tokenizer.json")
        if missing:
            raise ModelLoadError(f"MLX model directory {path} lacks {', '.join(missing)}; provision it again")
        step = MlxStep(path, self.slots)
        self.engine = BatchLoop(step, self.slots, self.queue_limit)
        self._tokenizer = step.tokenizer
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

    def submit(self, request: JobRequest, sink: asyncio.Queue[object], loop: asyncio.AbstractEventLoop,
               cancelled: threading.Event) -> int:
        assert request.prompt is not None, "chat is rendered before"
        if request.logprobs is not None or request.logit_bias:
            raise RequestError("MLX workers give no logprobs and take no logit_bias yet; use the model's GGUF form "
                               "on llama.cpp for them")
        if request.grammar is not None or request.response_format is not None:
            raise RequestError("MLX workers cannot constrain their output (grammar, response_format); run the "
                               "model's GGUF form on llama.cpp (--backend llama-cpp) for that")
        prompt = list(self._tokenizer.encode(request.prompt))
        if len(prompt) + 1 > self.n_ctx:
            raise RequestError(f"the prompt is {len(prompt)} tokens; the worker's context holds {self.n_ctx}. "
                               "Shorten it, or ask for a larger context (`--ctx`)")
        return self.queue(request, prompt, min(request.max_tokens, self.n_ctx - len(prompt)), sink, loop, cancelled)

    def close(self) -> None:
        self.close_engine()
        self._tokenizer = None
