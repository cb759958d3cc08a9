"""A client request's jobs and their events, the same for every dialect: jobs are created on the
queen's own registry (the path and chain of `rbee infer`), the answer starts only once the first
token or the failure is known (so errors keep their status code), and a client that leaves
cancels its jobs down to the worker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from quart import request

from rbee.errors import RbeeError, RequestError
from rbee.link import events
from rbee.link.events import Event
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.link.server import read_json_body
from rbee.queen.api.errors import ApiError

Events = AsyncGenerator[Event, None]
MakeProducer = Callable[[dict[str, Any]], Producer]


async def body() -> dict[str, Any]:
    """The request's JSON object, or a 400 in the dialect's shape."""
    try:
        return await read_json_body()
    except RequestError as exc:
        raise ApiError(400, exc.message) from exc


def client_name() -> str:
    """Who is asking, for the cancel reason: read while the request is current (a stream's
    cleanup runs after the request context is gone)."""
    return "the Ollama client" if request.path.startswith("/api/") else "the OpenAI client"


async def job_events(registry: JobRegistry, job: Job, client: str) -> Events:
    """The job's events; if the client leaves early, the job is cancelled at once (down to the worker)."""
    try:
        async for batch in registry.stream(job.id):
            for _, event in batch:
                yield event
    finally:
        if not job.finished:
            await registry.cancel(job.id, f"{client} disconnected")


def create_jobs(registry: JobRegistry, make_producer: MakeProducer, bodies: list[dict[str, Any]]) -> list[Job]:
    """Every body validated and checked against the caller's key before any job exists (a 4xx)."""
    try:
        producers = [make_producer(job_body) for job_body in bodies]
    except RbeeError as exc:
        raise ApiError.from_rbee(exc) from exc
    return [registry.create(producer) for producer in producers]


async def start(registry: JobRegistry, make_producer: MakeProducer,
                bodies: list[dict[str, Any]]) -> tuple[list[Job], list[Events]]:
    """One job per body, each stream started (its first token or end in hand); if one fails,
    the others are cancelled and its error raised."""
    jobs = create_jobs(registry, make_producer, bodies)
    client = client_name()
    streams: list[Events] = []
    try:
        for job in jobs:
            streams.append(await started(job_events(registry, job, client)))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        for job in jobs[len(streams):]:
            if not job.finished:
                await registry.cancel(job.id, "another choice of the request failed")
        raise
    return jobs, streams


async def one(registry: JobRegistry, make_producer: MakeProducer, job_body: dict[str, Any]) -> Events:
    """The started stream of a request that is one job."""
    return (await start(registry, make_producer, [job_body]))[1][0]


async def started(stream: Events) -> Events:
    """Wait for the first token (or the failure) before answering; the stream from that event on."""
    async for first in stream:
        if first.type == events.ERROR:
            await stream.aclose()
            raise ApiError.from_event(first)
        if first.type in (events.TOKEN, events.END, events.EMBEDDING):
            return _starting_with(first, stream)
    await stream.aclose()
    raise ApiError(502, "the job ended without an answer", kind="api_error")


async def _starting_with(first: Event, stream: Events) -> Events:
    """``first``, then the rest of ``stream``; closing this closes the stream (and cancels the job)."""
    try:
        yield first
        async for event in stream:
            yield event
    finally:
        await stream.aclose()


@dataclass
class Answer:
    """A whole job's output: its text, the logprob entries, embeddings by index, and its end."""

    text: list[str] = field(default_factory=list)
    scored: list[dict[str, Any]] = field(default_factory=list)
    vectors: dict[int, list[float]] = field(default_factory=dict)
    end: Event | None = None

    def add(self, event: Event) -> None:
        self.scored += event.get("logprobs") or []
        if event.type == events.TOKEN:
            self.text.append(event["text"])
        elif event.type == events.EMBEDDING:
            self.vectors[int(event["index"])] = event["embedding"]
        elif event.type == events.END:
            self.end = event
        elif event.type == events.ERROR:
            raise ApiError.from_event(event)

    @property
    def whole(self) -> str:
        return "".join(self.text)

    @property
    def ending(self) -> Event:
        assert self.end is not None, "a job stream ends with its end event or an error"
        return self.end


async def collect(stream: Events) -> Answer:
    answer = Answer()
    async with contextlib.aclosing(stream):
        async for event in stream:
            answer.add(event)
    return answer


def finish_of(end: Event) -> str:
    reason = str(end["finish_reason"])
    return reason if reason in ("stop", "length") else "stop"
