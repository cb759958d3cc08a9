"""The engine interface a worker drives. Engines are imported lazily by name,
so a host without llama.cpp (or MLX) can still run the other one."""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rbee.errors import ConfigError
from rbee.link.schemas import JobRequest


@dataclass(frozen=True)
class Piece:
    """What the engine produced for one step: text (may be empty) and, on the last
    step, why it stopped and the token counts."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    #: when the job asked for logprobs: the token sampled in this step, in OpenAI's shape
    logprobs: list[dict[str, Any]] | None = None


class Backend(Protocol):
    """What the runner drives: a generating engine (a :class:`~rbee.worker.backends.loop.BatchLoop`
    and its step) or an embedding one; each refuses the other kind of request."""

    name: str
    #: The model's metadata (GGUF keys such as ``general.architecture`` and
    #: ``tokenizer.chat_template``), plus ``rbee.eos_text``: the end-of-sequence text.
    metadata: dict[str, str]
    #: Where the engine put the model, in its own words, after ``load``
    #: (:class:`rbee.link.engine_report.EngineReport` as a dict).
    report: dict[str, Any]
    #: sequences decoded together (1 for an embedding engine)
    slots: int

    def load(self, path: Path) -> None:
        """Load the model; raise ModelLoadError naming the file when it cannot."""

    def submit(self, request: JobRequest, sink: asyncio.Queue[object], loop: asyncio.AbstractEventLoop,
               cancelled: threading.Event) -> int:
        """Queue a generation; its pieces (a ``Started`` mark first, or an exception) reach ``sink``
        on ``loop``. Returns its place among those that must wait (0: it starts at the next step)."""

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """The vectors of ``texts`` and their token count (on the runner's thread)."""

    def load_report(self) -> dict[str, Any]:
        """Slots, busy slots, queue depth and tokens/s."""

    @property
    def tokens_generated(self) -> int:
        """Tokens sampled so far, cancelled streams included."""

    def wake(self) -> None:
        """A request was cancelled: the engine notices at once."""

    def close(self) -> None:
        """Free the model."""


BACKENDS = {
    "llama-cpp": "rbee.worker.backends.llama_cpp:LlamaCppBackend",
    "llama-cpp-embed": "rbee.worker.backends.llama_embed:LlamaEmbedBackend",
    "mlx": "rbee.worker.backends.mlx:MlxBackend",
}


def create_backend(
    name: str, *, n_ctx: int, threads: int, gpu_layers: int = 0, tensor_split: Sequence[float] = (), slots: int = 0,
    queue_limit: int = 64,
) -> Backend:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None
    module_name, class_name = target.split(":")
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = backend_cls(n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, tensor_split=tensor_split,
                                   slots=slots, queue_limit=queue_limit)
    return backend
