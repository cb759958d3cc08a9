"""The queen's OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

A thin adapter: each request becomes a job on the queen's own job registry — the
same path and the same dual-call chain as `rbee infer` — and the job's events are
reshaped into OpenAI's JSON. Parameters rbee cannot honour are refused with a 400
naming them, never ignored silently.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from quart import Quart, Response, jsonify

from rbee.errors import RbeeError, RequestError, http_status
from rbee.link import events
from rbee.link.events import Event
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.link.schemas import MAX_TOKENS_LIMIT
from rbee.link.server import read_json_body, sse_response
from rbee.queen.keys import ClientKey
from rbee.queen.tools import ToolPlan, call, plan


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def from_event(cls, event: Event) -> OpenAIError:
        status, kind = http_status(event["code"])
        return cls(status, f"{event['actor']}: {event['message']}", code=event["code"], kind=kind,
                   retry_after=event.get("retry_after"))


#: content parts rbee cannot read yet, and what they would need
UNREADABLE_PARTS = {"image_url": "a vision model (a GGUF with its multimodal projector)",
                    "input_audio": "an audio model", "file": "a model that reads files"}


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return ""
            raise OpenAIError(400, f"messages[{index}].content: missing; only an assistant turn with tool_calls "
                                   "may leave it out", param=f"messages[{index}].content")
        if isinstance(self.content, str):
            return self.content
        texts = []
        for number, part in enumerate(self.content):
            kind = part.get("type")
            where = f"messages[{index}].content[{number}]"
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in UNREADABLE_PARTS:
                raise OpenAIError(400, f"{where}: rbee serves text models only so far; a {kind} part needs "
                                       f"{UNREADABLE_PARTS[kind]}. Send text parts", param=where,
                                  code="unsupported_content")
            else:
                raise OpenAIError(400, f"{where}: a content part is {{\"type\": \"text\", \"text\": …}}; got "
                                       f"type {kind!r}", param=where)
        return "".join(texts)

    def job_message(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text(index)}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints share. Unknown fields are ignored (clients send many);
    known fields rbee cannot honour are refused in ``refuse_unsupported``."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=500)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    n: int | None = Field(default=1, ge=1, le=8)
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # llama.cpp's samplers, as llama-server and Ollama accept them beside OpenAI's fields
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    #: Ollama's: how long the model stays loaded once idle (seconds or "5m"; 0 unload after, -1 keep)
    keep_alive: float | str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 8 or any(not item for item in items):
            raise ValueError("stop takes up to 8 non-empty strings")
        return value

    def refuse_unsupported(self) -> None:
        if (self.n or 1) > 1 and self.tools:
            raise OpenAIError(400, "n > 1 with tools: ask for one choice per request", param="n")

    def job_logprobs(self) -> int | None:
        """Alternatives per token the job reports, or None for no logprobs (chat: ``logprobs``
        true with ``top_logprobs``; the completions API: ``logprobs`` is the count)."""
        if self.top_logprobs is not None and self.logprobs is not True:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logprobs is True:
            return self.top_logprobs or 0
        if self.logprobs is False or self.logprobs is None:
            return None
        if not 0 <= self.logprobs <= 20:
            raise OpenAIError(400, "logprobs: 0 to 20 alternatives per token", param="logprobs")
        return int(self.logprobs)

    def job_logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            biases = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        except ValueError as exc:
            raise OpenAIError(400, "logit_bias: keys are token ids (\"1234\"), values -100 to 100",
                              param="logit_bias") from exc
        if any(not -100 <= bias <= 100 for bias in biases.values()):
            raise OpenAIError(400, "logit_bias: values are -100 to 100", param="logit_bias")
        return biases

    def job_fields(self, max_tokens: int | None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "max_tokens": max_tokens or self.max_tokens, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "top_k": self.top_k, "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty, "keep_alive": self.keep_alive,
            "logprobs": self.job_logprobs(), "logit_bias": self.job_logit_bias(),
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
        }
        fields["response_format"] = self.structured()
        return {key: value for key, value in fields.items() if value is not None}

    def structured(self) -> dict[str, Any] | None:
        """OpenAI's response_format as the job's: json_object, or json_schema with its schema."""
        fmt = self.response_format
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return {"type": "json_object"}
        spec = fmt.get("json_schema")
        if fmt.get("type") == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return {"type": "json_schema", "schema": spec["schema"]}
        raise OpenAIError(400, 'response_format must be {"type": "text" | "json_object"} or {"type": "json_schema", '
                               '"json_schema": {"name": …, "schema": {…}}}', param="response_format")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    tool_choice: Any = None

    def tool_plan(self) -> ToolPlan | None:
        try:
            planned = plan(self.tools, self.tool_choice)
        except RequestError as exc:
            raise OpenAIError(400, exc.message, param="tools") from exc
        if planned is not None and planned.forced and self.structured() is not None:
            raise OpenAIError(400, "a forced tool call and a response_format both shape the answer; send one",
                              param="response_format")
        return planned


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise OpenAIError(400, "rbee takes one prompt per request", param="prompt")
            return self.prompt[0]
        return self.prompt


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=500)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    keep_alive: float | str | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts or len(texts) > 2048:
            raise OpenAIError(400, "input: one string, or a list of 1 to 2048 strings", param="input")
        if not all(isinstance(text, str) for text in texts):
            raise OpenAIError(400, "input: rbee embeds text; send strings, not token ids", param="input")
        if any(not text for text in texts):
            raise OpenAIError(400, "input: empty strings have no embedding", param="input")
        if self.dimensions is not None:
            raise OpenAIError(400, "dimensions: rbee returns the model's own dimension; leave it out",
                              param="dimensions")
        return [str(text) for text in texts]


def encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    """OpenAI's ``base64``: the float32 values, little-endian, base64-encoded."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise OpenAIError(400, f"{param or 'body'}: {first['msg']}", param=param) from exc
    if isinstance(parsed, SamplingFields):
        parsed.refuse_unsupported()
    return parsed


class ModelIndex:
    """Which model ids the fleet serves: ``name`` anywhere, or ``node/name`` pinned to a host."""

    def __init__(self, nodes: Callable[[], dict[str, list[str]]],
                 client: Callable[[], ClientKey | None] = lambda: None) -> None:
        self.nodes = nodes  # node -> model names it can serve
        self.client = client  # the request's client key (None: the owner's), whose models are listed

    def listing(self) -> list[dict[str, Any]]:
        data = []
        seen: set[str] = set()
        key = self.client()
        for node, models in self.nodes().items():
            for name in models:
                if key is not None and key.models and name not in key.models:
                    continue
                if name not in seen:
                    seen.add(name)
                    data.append({"id": name, "object": "model", "created": 0, "owned_by": node})
                data.append({"id": f"{node}/{name}", "object": "model", "created": 0, "owned_by": node})
        return data

    def resolve(self, model_id: str) -> tuple[str | None, str]:
        nodes = self.nodes()
        node, _, name = model_id.partition("/")
        if name and node in nodes:
            if name in nodes[node] or name.startswith(("file:", "hf:")):
                return node, name
        elif any(model_id in models for models in nodes.values()) or model_id.startswith(("file:", "hf:")):
            return None, model_id
        known = ", ".join(sorted({m["id"] for m in self.listing()}))
        raise OpenAIError(404, f"the model {model_id!r} does not exist here; known models: {known}",
                          param="model", code="model_not_found")


def mount_openai(app: Quart, registry: JobRegistry, index: ModelIndex,
                 make_producer: Callable[[dict[str, Any]], Producer]) -> None:
    @app.errorhandler(OpenAIError)
    async def _openai_error(exc: OpenAIError) -> tuple[Response, int, dict[str, str]]:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after is not None else {}
        return jsonify(exc.body()), exc.status, headers

    @app.get("/v1/models")
    async def models() -> Response:
        return jsonify({"object": "list", "data": index.listing()})

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await _body())
        node, model = index.resolve(req.model)
        messages = [message.job_message(number) for number, message in enumerate(req.messages)]
        tools = req.tool_plan()
        job_body = {"messages": messages, "model": model, "node": node,
                    **req.job_fields(req.max_completion_tokens)}
        if tools is not None:
            job_body["tools"] = tools.tools()
            if tools.forced:
                job_body["response_format"] = tools.response_format()
        return await _respond(registry, make_producer, job_body, req, chat=True, tools=tools)

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        req: EmbeddingRequest = parse(EmbeddingRequest, await _body())
        texts = req.texts()
        node, model = index.resolve(req.model)
        try:
            producer = make_producer({"input": texts, "model": model, "node": node, "keep_alive": req.keep_alive})
        except RbeeError as exc:
            raise OpenAIError(exc.status, exc.message, code=exc.code) from exc
        job = registry.create(producer)
        vectors: dict[int, list[float]] = {}
        async with contextlib.aclosing(_events(registry, job)) as stream:
            async for event in stream:
                if event.type == events.EMBEDDING:
                    vectors[int(event["index"])] = event["embedding"]
                elif event.type == events.ERROR:
                    raise OpenAIError.from_event(event)
                elif event.type == events.END:
                    tokens = int(event.get("prompt_tokens") or 0)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(vectors[i], req.encoding_format)}
                for i in range(len(texts))]
        return jsonify({"object": "list", "data": data, "model": req.model,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/completions")
    async def completions() -> Response:
        req: CompletionRequest = parse(CompletionRequest, await _body())
        if req.echo or req.suffix or (req.best_of or 1) > 1:
            raise OpenAIError(400, "rbee does not support echo, suffix or best_of", param="echo")
        node, model = index.resolve(req.model)
        job_body = {"prompt": req.text(), "model": model, "node": node, **req.job_fields(None)}
        return await _respond(registry, make_producer, job_body, req, chat=False)


async def _body() -> dict[str, Any]:
    try:
        return await read_json_body()
    except RequestError as exc:
        raise OpenAIError(400, exc.message) from exc


async def _events(registry: JobRegistry, job: Job) -> AsyncGenerator[Event, None]:
    """The job's events; if the client leaves early, the job is cancelled at once (down to the worker)."""
    try:
        async for batch in registry.stream(job.id):
            for _, event in batch:
                yield event
    finally:
        if not job.finished:
            await registry.cancel(job.id, "the OpenAI client disconnected")


async def _respond(registry: JobRegistry, make_producer: Callable[[dict[str, Any]], Producer],
                   job_body: dict[str, Any], req: SamplingFields, *, chat: bool,
                   tools: ToolPlan | None = None) -> Response:
    """One job per choice (``n`` of them run side by side in the worker's batch; a seed gives
    choice i the seed + i), shaped into one OpenAI response."""
    n = req.n or 1
    try:  # validates the bodies and the key's scope: a 4xx before any job exists
        producers = [make_producer(_choice_body(job_body, i)) for i in range(n)]
    except RbeeError as exc:
        raise OpenAIError(exc.status, exc.message, code=exc.code) from exc
    jobs = [registry.create(producer) for producer in producers]
    created = int(time.time())
    shapes = [Shape(jobs[0].id, req.model, chat, tools, index=i, logprobs=job_body.get("logprobs") is not None,
                    created=created) for i in range(n)]
    streams: list[AsyncGenerator[Event, None]] = []
    try:
        for job in jobs:
            streams.append(await _started(_events(registry, job)))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        for job in jobs[len(streams):]:
            if not job.finished:
                await registry.cancel(job.id, "another choice of the request failed")
        raise
    if not req.stream:
        wholes = await asyncio.gather(*(_collect(shape, stream) for shape, stream in zip(shapes, streams, strict=True)))
        return jsonify(_joined(wholes))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await sse_response(_frames(shapes, streams, include_usage))


def _choice_body(job_body: dict[str, Any], index: int) -> dict[str, Any]:
    if index and job_body.get("seed") is not None:
        return {**job_body, "seed": (job_body["seed"] + index) % 2**31}
    return job_body


async def _started(stream: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    """Wait for the first token (or the failure) before answering, so errors get their status code;
    the stream from that event on."""
    async for first in stream:
        if first.type == events.ERROR:
            await stream.aclose()
            raise OpenAIError.from_event(first)
        if first.type in (events.TOKEN, events.END):
            return _starting_with(first, stream)
    await stream.aclose()
    raise OpenAIError(502, "the job ended without an answer", kind="api_error")


async def _starting_with(first: Event, stream: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    """``first``, then the rest of ``stream``; closing this closes the stream (and cancels the job)."""
    try:
        yield first
        async for event in stream:
            yield event
    finally:
        await stream.aclose()


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
        """The answer's tool calls, or None for a text answer (or a forced call cut off by
        max_tokens before its JSON was whole: it is returned as text, with finish "length")."""
        if self.tools is None:
            return None
        try:
            return self.tools.calls(text)
        except (ValueError, KeyError, TypeError):
            if finish == "length":
                return None
            raise

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


def finish_of(end: Event) -> str:
    reason = str(end["finish_reason"])
    return reason if reason in ("stop", "length") else "stop"


async def _collect(shape: Shape, stream: AsyncGenerator[Event, None]) -> dict[str, Any]:
    text: list[str] = []
    scored: list[dict[str, Any]] = []
    end: Event | None = None
    async with contextlib.aclosing(stream):
        async for event in stream:
            scored += event.get("logprobs") or []
            if event.type == events.TOKEN:
                text.append(event["text"])
            elif event.type == events.END:
                end = event
            elif event.type == events.ERROR:
                raise OpenAIError.from_event(event)
    assert end is not None
    return shape.whole("".join(text), finish_of(end), usage_of(end), scored)


async def _frames(shapes: list[Shape], streams: list[AsyncGenerator[Event, None]],
                  include_usage: bool) -> AsyncIterator[bytes]:
    """Every choice's chunks as they come, interleaved; then the usage of all, and [DONE]."""
    def frame(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    usages: list[dict[str, int]] = []
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def pump(shape: Shape, stream: AsyncGenerator[Event, None]) -> None:
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


async def _chunks(shape: Shape, stream: AsyncGenerator[Event, None],
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
            yield OpenAIError.from_event(event).body()

