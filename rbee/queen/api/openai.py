"""OpenAI's dialect: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Translation only: requests are parsed into job bodies (``rbee.queen.api.requests``), run as jobs
(``rbee.queen.api.streams``), and their events reshaped into OpenAI's JSON and SSE chunks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Quart, Response, jsonify, request

from rbee.link import events
from rbee.link.events import Event
from rbee.link.jobs import JobRegistry
from rbee.link.server import sse_response
from rbee.queen.api import streams
from rbee.queen.api.errors import ApiError
from rbee.queen.api.models import ModelIndex
from rbee.queen.api.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingFields,
    chat_job,
    parse,
)
from rbee.queen.api.streams import Events, MakeProducer, finish_of
from rbee.queen.tools import ToolPlan, answer_calls, call


def encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    """OpenAI's ``base64``: the float32 values, little-endian, base64-encoded."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def mount_openai(app: Quart, registry: JobRegistry, index: ModelIndex, make_producer: MakeProducer) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> tuple[Response, int, dict[str, str]]:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after is not None else {}
        body = exc.ollama_body() if request.path.startswith("/api/") else exc.openai_body()
        return jsonify(body), exc.status, headers

    @app.get("/v1/models")
    async def models() -> Response:
        return jsonify({"object": "list", "data": index.listing()})

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await streams.body())
        node, model = index.resolve(req.model)
        job_body, tools = chat_job(req, node, model)
        return await _respond(registry, make_producer, job_body, req, chat=True, tools=tools)

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        req: EmbeddingRequest = parse(EmbeddingRequest, await streams.body())
        texts = req.texts()
        node, model = index.resolve(req.model)
        body = {"input": texts, "model": model, "node": node, "keep_alive": req.keep_alive}
        answer = await streams.collect(await streams.one(registry, make_producer, body))
        tokens = int(answer.ending.get("prompt_tokens") or 0)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(answer.vectors[i], req.encoding_format)}
                for i in range(len(texts))]
        return jsonify({"object": "list", "data": data, "model": req.model,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/completions")
    async def completions() -> Response:
        req: CompletionRequest = parse(CompletionRequest, await streams.body())
        if req.echo or req.suffix or (req.best_of or 1) > 1:
            raise ApiError(400, "rbee does not support echo, suffix or best_of", param="echo")
        node, model = index.resolve(req.model)
        job_body = {"prompt": req.text(), "model": model, "node": node, **req.job_fields(None)}
        return await _respond(registry, make_producer, job_body, req, chat=False)


async def _respond(registry: JobRegistry, make_producer: MakeProducer, job_body: dict[str, Any],
                   req: SamplingFields, *, chat: bool, tools: ToolPlan | None = None) -> Response:
    """One job per choice (``n`` of them run side by side in the worker's batch; a seed gives
    choice i the seed + i), shaped into one OpenAI response."""
    n = req.n or 1
    created = int(time.time())
    jobs, choices = await streams.start(registry, make_producer, [_choice_body(job_body, i) for i in range(n)])
    shapes = [Shape(jobs[0].id, req.model, chat, tools, index=i, logprobs=job_body.get("logprobs") is not None,
                    created=created) for i in range(n)]
    if not req.stream:
        wholes = await asyncio.gather(*(_collect(shape, stream) for shape, stream in zip(shapes, choices, strict=True)))
        return jsonify(_joined(wholes))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await sse_response(_frames(shapes, choices, include_usage))


def _choice_body(job_body: dict[str, Any], index: int) -> dict[str, Any]:
    if index and job_body.get("seed") is not None:
        return {**job_body, "seed": (job_body["seed"] + index) % 2**31}
    return job_body


class Shape:
    """OpenAI's JSON for one choice (``index``) of a response."""

    def __init__(self, job_id: str, model: str, chat: bool, tools: ToolPlan | None = None, *, index: int = 0,
                 logprobs: bool = False, created: int | None = None) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id.removeprefix("job-")
        self.model = model
        self.chat = chat
        self.tools = tools
        self.index = index
        self.logprobs = logprobs
        self.offset = 0  # text offset of the next token, for the completions API's logprobs
        self.created = int(time.time()) if created is None else created

    def calls(self, text: str, finish: str) -> list[dict[str, Any]] | None:
        return answer_calls(self.tools, text, finish)

    def scores(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """OpenAI's ``logprobs`` of a choice or chunk: chat's ``content`` list, or the completions
        API's parallel lists."""
        if not self.logprobs:
            return None
        entries = entries or []
        if self.chat:
            return {"content": entries, "refusal": None}
        offsets = []
        for entry in entries:
            offsets.append(self.offset)
            self.offset += len(entry["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def tool_chunk(self, calls: list[dict[str, Any]], first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": None} if first else {}
        delta["tool_calls"] = [{"index": number, **c} for number, c in enumerate(calls)]
        return self._chunk_of(delta, None)

    def arguments_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk_of({"tool_calls": [{"index": 0, "function": {"arguments": text}}]}, None)

    def _chunk_of(self, delta: dict[str, Any], finish: str | None,
                  logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": self.index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

    def chunk(self, text: str | None, finish: str | None, first: bool = False,
              scored: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        logprobs = self.scores(scored) if scored or (self.logprobs and text) else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text is not None else {})
            return self._chunk_of(delta, finish, logprobs)
        choice = {"index": self.index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}

    def whole(self, text: str, finish: str, usage: dict[str, int],
              scored: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        calls = self.calls(text, finish)
        if calls:
            choice: dict[str, Any] = {"index": self.index, "message": {"role": "assistant", "content": None,
                                                                       "tool_calls": calls},
                                      "finish_reason": "tool_calls" if finish == "stop" else finish,
                                      "logprobs": None}
            kind = "chat.completion"
        elif self.chat:
            choice = {"index": self.index, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish, "logprobs": self.scores(scored)}
            kind = "chat.completion"
        else:
            choice = {"index": self.index, "text": text, "finish_reason": finish, "logprobs": self.scores(scored)}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [],
                "usage": usage}


def usage_of(end: Event) -> dict[str, int]:
    prompt = int(end.get("prompt_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": int(end["tokens"]), "total_tokens": prompt + end["tokens"]}


def joined_usage(usages: list[dict[str, int]]) -> dict[str, int]:
    """The prompt once (every choice shares it), the completions of all choices."""
    prompt = usages[0]["prompt_tokens"]
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _joined(wholes: list[dict[str, Any]]) -> dict[str, Any]:
    return {**wholes[0], "choices": [w["choices"][0] for w in wholes],
            "usage": joined_usage([w["usage"] for w in wholes])}


async def _collect(shape: Shape, stream: Events) -> dict[str, Any]:
    answer = await streams.collect(stream)
    return shape.whole(answer.whole, finish_of(answer.ending), usage_of(answer.ending), answer.scored)


async def _frames(shapes: list[Shape], streams: list[Events],
                  include_usage: bool) -> AsyncIterator[bytes]:
    """Every choice's chunks as they come, interleaved; then the usage of all, and [DONE]."""
    def frame(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    usages: list[dict[str, int]] = []
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def pump(shape: Shape, stream: Events) -> None:
        try:
            async for payload in _chunks(shape, stream, usages):
                await queue.put(payload)
        finally:
            await queue.put(None)

    pumps = [asyncio.ensure_future(pump(shape, stream)) for shape, stream in zip(shapes, streams, strict=True)]
    try:
        running = len(pumps)
        while running:
            payload = await queue.get()
            if payload is None:
                running -= 1
                continue
            yield frame(payload)
        for task in pumps:
            task.result()  # a choice that broke raises here
        if include_usage and len(usages) == len(shapes):
            yield frame(shapes[0].usage_chunk(joined_usage(usages)))
        yield events.DONE_FRAME
    finally:
        for task in pumps:
            task.cancel()
        for stream in streams:
            await stream.aclose()


async def _chunks(shape: Shape, stream: Events,
                  usages: list[dict[str, int]]) -> AsyncIterator[dict[str, Any]]:
    """One choice's chunks; its usage is appended to ``usages`` at its end."""
    first = True
    tools = shape.tools
    held: list[str] = []  # a call whose name comes last (required among several, auto) is read whole
    async for event in stream:
        if event.type == events.TOKEN and tools is not None:
            if not tools.streams_arguments:
                held.append(event["text"])
                continue
            if first:
                yield shape.tool_chunk([call(tools.name or "", "")], first=True)
                first = False
            yield shape.arguments_chunk(event["text"])
        elif event.type == events.TOKEN:
            yield shape.chunk(event["text"], None, first=first, scored=event.get("logprobs"))
            first = False
        elif event.type == events.END:
            finish = finish_of(event)
            if tools is not None and tools.streams_arguments and not first:
                finish = "tool_calls" if finish == "stop" else finish
            elif tools is not None:
                calls = shape.calls("".join(held), finish)
                if calls:
                    yield shape.tool_chunk(calls, first=True)
                    finish = "tool_calls"
                else:
                    yield shape.chunk("".join(held), None, first=True)
                first = False
            if first and shape.chat:
                yield shape.chunk("", None, first=True)
            yield shape.chunk(None if shape.chat else "", finish, scored=event.get("logprobs"))
            usages.append(usage_of(event))
        elif event.type == events.ERROR:
            yield ApiError.from_event(event).openai_body()
