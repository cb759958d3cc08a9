"""The worker's HTTP face: health, readiness, the inference link, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from quart import Quart, Response, jsonify

from rbee.config import WorkerConfig
from rbee.link import events
from rbee.link.auth import accepted, install_auth
from rbee.link.jobs import Job, JobRegistry
from rbee.link.schemas import ChatMessage, JobRequest, Load, WorkerReport
from rbee.link.server import add_job_routes, install_error_handlers, request_producer
from rbee.worker.chat import render as render_chat
from rbee.worker.runner import ModelRunner


def create_app(
    config: WorkerConfig, runner: ModelRunner, registry: JobRegistry, stop: asyncio.Event, token: str | None = None
) -> Quart:
    app = Quart(__name__)
    install_error_handlers(app, config.actor)
    install_auth(app, accepted(token or ""), config.actor)

    async def generate(job: Job, request: JobRequest) -> None:
        if request.input is not None:
            started = time.perf_counter()
            vectors, tokens = await runner.embed(request.input)
            for index, vector in enumerate(vectors):
                job.emit(events.embedding(index, vector))
            job.emit(events.end(0, time.perf_counter() - started, "stop", prompt_tokens=tokens))
            return
        request = as_chat(request, runner.backend.metadata, job.narrate)
        if request.messages is not None:
            chat = render_chat(request.messages, runner.backend.metadata, request.tools)
            job.narrate("template", f"chat formatted with {chat.template}")
            request = request.model_copy(
                update={"prompt": chat.prompt, "messages": None, "tools": None, "stop": [*request.stop, *chat.stop]}
            )
        started = time.perf_counter()
        index = 0
        finish = "stop"
        prompt_tokens = None
        first_at: float | None = None  # the prompt is read and the first token sampled
        scored: list[dict[str, Any]] = []  # logprobs of tokens whose text is not out yet (a split UTF-8 byte)
        async with contextlib.aclosing(runner.generate(request, job.narrate)) as pieces:
            async for piece in pieces:
                if first_at is None:
                    first_at = time.perf_counter()
                scored += piece.logprobs or []
                if piece.text:
                    job.emit(events.token(index, piece.text, **({"logprobs": scored} if scored else {})))
                    scored = []
                    index += 1
                if piece.finish_reason is not None:
                    finish, prompt_tokens = piece.finish_reason, piece.prompt_tokens
        ended = time.perf_counter()
        prompt_ms = round(((first_at or ended) - started) * 1000, 3)
        job.emit(events.end(index, ended - started, finish, prompt_tokens=prompt_tokens, prompt_ms=prompt_ms,
                            **({"logprobs": scored} if scored else {})))

    add_job_routes(app, registry, request_producer(generate))

    @app.get("/health")
    async def health() -> Response:
        return jsonify(info(config, runner))

    @app.get("/ready")
    async def ready() -> tuple[Response, int]:
        return jsonify(info(config, runner)), 200 if runner.state in ("ready", "busy") else 503

    @app.post("/v1/admin/shutdown")
    async def shutdown() -> tuple[Response, int]:
        stop.set()
        return jsonify({"stopping": config.actor}), 202

    return app


def as_chat(request: JobRequest, metadata: Mapping[str, str], narrate: Callable[[str, str], None]) -> JobRequest:
    """A prompt with ``template = "auto"`` becomes one user turn when the model has its own chat
    template; a base model (none) gets the prompt as it is, which is what it was trained on."""
    if request.template != "auto" or request.prompt is None:
        return request
    if not metadata.get("tokenizer.chat_template"):
        narrate("template", "the prompt is sent as it is: the model has no chat template (a base model)")
        return request
    return request.model_copy(update={"messages": [ChatMessage(role="user", content=request.prompt)],
                                      "prompt": None, "template": None})


def info(config: WorkerConfig, runner: ModelRunner) -> dict[str, Any]:
    """What the worker tells about itself, in /health, /ready and every heartbeat."""
    return WorkerReport(
        worker_id=config.worker_id,
        state="busy" if runner.busy else runner.state,  # type: ignore[arg-type]
        model_path=str(config.model_path),
        backend=config.backend,
        n_ctx=config.n_ctx,
        engine=runner.backend.report,
        tokens_generated=runner.tokens_generated,
        jobs_done=runner.jobs_done,
        waiting=runner.waiting,
        load=Load.model_validate(runner.occupancy()),
    ).model_dump(mode="json")
