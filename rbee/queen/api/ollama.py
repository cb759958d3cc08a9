"""Ollama's dialect on the queen's port: the clients people already run (Open WebUI, Continue,
Copilot, the ollama libraries, LangChain's ChatOllama) drive the whole fleet.

Translation only, as ``rbee.queen.api.openai``: a request's ``options`` and ``format`` become
the same fields an OpenAI request sets (``rbee.queen.api.requests``), run as the same jobs
(``rbee.queen.api.streams``), and the events come back as NDJSON lines. Durations are
nanoseconds, measured: the queen's clock for the whole request, the worker's for reading the
prompt and generating.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import Quart, Response, jsonify, request

from rbee.errors import RbeeError
from rbee.link import events
from rbee.link.events import Event
from rbee.link.jobs import JobRegistry, Producer
from rbee.link.schemas import JobRequest, seconds
from rbee.queen.api import streams
from rbee.queen.api.errors import ApiError
from rbee.queen.api.models import Listed, ModelIndex
from rbee.queen.api.requests import ChatCompletionRequest, CompletionRequest, chat_job, parse
from rbee.queen.api.streams import Events, MakeProducer, finish_of
from rbee.queen.fleet_models import FleetModels
from rbee.queen.tools import ToolPlan, answer_calls

#: the Ollama API version rbee answers like; clients parse it as integers (Copilot wants >= 0.6.4)
VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
#: characters JSON leaves raw that line splitters (httpx's, Python's str.splitlines) break lines at
LINE_BREAKERS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})

#: Ollama options that map one to one onto rbee's sampling fields
SAME_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "seed", "stop")


def line(payload: dict[str, Any]) -> bytes:
    """One NDJSON line: a newline inside a token is escaped by JSON, U+2028 and friends by us."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(LINE_BREAKERS).encode() + b"\n"


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat().replace("+00:00", "Z")


def not_found(model: str) -> ApiError:
    return ApiError(404, f'model "{model}" not found, try pulling it first', code="model_not_found")


class Generating(BaseModel):
    """What /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=500)
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    #: rbee's own: Ollama has no tool_choice; here as OpenAI's (also taken from ``options``)
    tool_choice: Any = None

    def sampling(self) -> dict[str, Any]:
        """The OpenAI-shaped fields these options set (for ``ChatCompletionRequest``)."""
        options = dict(self.options or {})
        if options.get("mirostat"):
            raise ApiError(400, "options.mirostat: rbee samples with top_k/top_p/min_p; leave mirostat at 0")
        fields: dict[str, Any] = {key: options[key] for key in SAME_OPTIONS if options.get(key) is not None}
        predict = options.get("num_predict")
        if isinstance(predict, int) and predict > 0:
            fields["max_tokens"] = predict
        if self.format == "json":
            fields["response_format"] = {"type": "json_object"}
        elif isinstance(self.format, dict):
            fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format",
                                                                                "schema": self.format}}
        elif self.format not in (None, ""):
            raise ApiError(400, 'format: "json" or a JSON schema object')
        if self.think not in (None, False):
            raise ApiError(400, f'"{self.model}" does not support thinking')
        if self.logprobs:
            fields["logprobs"] = True
            fields["top_logprobs"] = self.top_logprobs
        choice = self.tool_choice if self.tool_choice is not None else options.get("tool_choice")
        if choice is not None:
            fields["tool_choice"] = choice
        return {"model": self.model, "stream": self.stream, "keep_alive": self.keep_alive, **fields}

    def placement(self) -> dict[str, Any]:
        ctx = (self.options or {}).get("num_ctx")
        if ctx is None:
            return {}
        if not isinstance(ctx, int) or not 256 <= ctx <= 1_048_576:
            raise ApiError(400, "options.num_ctx: a whole number of tokens from 256 to 1048576")
        return {"ctx": ctx}

    def unloads(self) -> bool:
        """``keep_alive`` 0 in any of its spellings (0, "0", "0s", "0m", …), read as jobs read it."""
        try:
            return seconds(self.keep_alive) == 0
        except ValueError as exc:
            raise ApiError(400, f"keep_alive: {exc}") from exc


class ChatIn(Generating):
    messages: list[dict[str, Any]] = Field(default_factory=list, max_length=256)
    tools: list[Any] | None = None

    def openai_messages(self) -> list[dict[str, Any]]:
        """Ollama's messages as OpenAI's: tool calls' arguments objects become JSON text."""
        out = []
        for index, message in enumerate(self.messages):
            if message.get("images"):
                raise images_refused(f"messages[{index}].images")
            turn: dict[str, Any] = {"role": message.get("role"), "content": message.get("content") or ""}
            calls = message.get("tool_calls")
            if calls:
                turn["tool_calls"] = [_openai_call(number, c) for number, c in enumerate(calls)]
            if message.get("role") == "tool":
                turn["tool_call_id"] = message.get("tool_call_id") or message.get("tool_name") or ""
            out.append(turn)
        return out


class GenerateIn(Generating):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    raw: bool = False
    template: str | None = None
    images: list[Any] | None = None
    context: list[int] | None = None


class EmbedIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=500)
    input: str | list[str] | None = None
    prompt: str | None = None  # /api/embeddings, the older route
    keep_alive: float | str | None = None
    dimensions: int | None = None
    truncate: bool | None = None


def model_name(body: dict[str, Any], usage: str) -> str:
    """The model a body names (``model``, or the older ``name``), or a 400 showing ``usage``."""
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, usage)
    return name


def images_refused(where: str) -> ApiError:
    return ApiError(400, f"{where}: rbee serves text models only so far; images need a vision model (a GGUF "
                         "with its multimodal projector). Send text")


def _openai_call(number: int, given: Any) -> dict[str, Any]:
    function = given.get("function") if isinstance(given, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, 'tool_calls: each is {"function": {"name": …, "arguments": {…}}}')
    arguments = function.get("arguments", {})
    return {"id": given.get("id") or f"call_{number}", "type": "function",
            "function": {"name": function["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's tool calls as Ollama's: the arguments are an object."""
    out = []
    for index, given in enumerate(calls):
        arguments = given["function"]["arguments"]
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = {}
        out.append({"id": given.get("id"), "function": {"index": index, "name": given["function"]["name"],
                                                         "arguments": parsed}})
    return out


def parameter_size(count: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}".replace(".0" + unit, unit) if value < 100 else f"{value:.0f}{unit}"
    return str(count)


def details(found: dict[str, Any] | None) -> dict[str, Any]:
    """Ollama's ``details`` from a catalog entry (a reported one, or the hive's describe())."""
    found = found or {}
    family = found.get("architecture") or ""
    return {"parent_model": "", "format": found.get("format") or "gguf", "family": family,
            "families": [family] if family else None,
            "parameter_size": parameter_size(int(found.get("parameters") or 0)) if found.get("parameters") else "",
            "quantization_level": found.get("quantization") or ""}


def digest(sha256: str, ref: str) -> str:
    """The file's sha256 where the catalog checked it, else a stable id made from its reference."""
    return sha256 or hashlib.sha256(ref.encode()).hexdigest()


def tag(listed: Listed) -> dict[str, Any]:
    entry = listed.entry
    return {"name": listed.id, "model": listed.id,
            "modified_at": iso(entry.modified) if entry is not None and entry.modified else now_iso(),
            "size": entry.size if entry is not None else 0,
            "digest": digest(entry.sha256, entry.ref) if entry is not None else digest("", listed.name),
            "details": details(entry.model_dump() if entry is not None else None), "rbee": {"node": listed.node}}


def timings(started: float, end: Event) -> dict[str, Any]:
    """Ollama's counts and nanosecond durations, from the queen's clock and the worker's."""
    total = int((time.perf_counter() - started) * 1e9)
    worker = int(float(end.get("duration_ms") or 0) * 1e6)
    prompt = int(float(end.get("prompt_ms") or 0) * 1e6)
    return {"total_duration": total, "load_duration": max(0, total - worker),
            "prompt_eval_count": int(end.get("prompt_tokens") or 0), "prompt_eval_duration": prompt,
            "eval_count": int(end["tokens"]), "eval_duration": max(0, worker - prompt)}


class Reply:
    """Ollama's objects for one generation: chat's ``message`` or generate's ``response``."""

    def __init__(self, kind: Literal["chat", "generate"], model: str, tools: ToolPlan | None, started: float) -> None:
        self.kind, self.model, self.tools, self.started = kind, model, tools, started

    def chunk(self, text: str, done: bool = False, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        body["done"] = done
        body.update(extra)
        return body

    def calls_chunk(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        body = self.chunk("")
        body["message"]["tool_calls"] = ollama_calls(calls)
        return body

    def final(self, end: Event, text: str = "", logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body = self.chunk(text, True, done_reason=finish_of(end), **timings(self.started, end))
        if logprobs:
            body["logprobs"] = logprobs
        return body

    def held_calls(self, text: str, finish: str) -> list[dict[str, Any]] | None:
        return answer_calls(self.tools, text, finish)


async def ndjson(reply: Reply, stream: Events) -> AsyncIterator[bytes]:
    """Each token as its own line as it comes; with tools the answer is held and read whole
    (Ollama sends the calls in one message); a failure mid-stream is an ``{"error"}`` line."""
    held: list[str] = []
    async with contextlib.aclosing(stream):
        async for event in stream:
            if event.type == events.TOKEN and reply.tools is not None:
                held.append(event["text"])
            elif event.type == events.TOKEN:
                scored = event.get("logprobs")
                yield line(reply.chunk(event["text"], **({"logprobs": scored} if scored else {})))
            elif event.type == events.END:
                calls = reply.held_calls("".join(held), finish_of(event))
                if calls:
                    yield line(reply.calls_chunk(calls))
                elif held:
                    yield line(reply.chunk("".join(held)))
                yield line(reply.final(event))
            elif event.type == events.ERROR:
                yield line(ApiError.from_event(event).ollama_body())


async def whole(reply: Reply, stream: Events) -> dict[str, Any]:
    answer = await streams.collect(stream)
    end = answer.ending
    calls = reply.held_calls(answer.whole, finish_of(end))
    if calls:
        body = reply.final(end)
        body["message"]["tool_calls"] = ollama_calls(calls)
        return body
    return reply.final(end, answer.whole, answer.scored)


def mount_ollama(app: Quart, registry: JobRegistry, index: ModelIndex, make_producer: MakeProducer,
                 models: FleetModels, make_pull: Callable[[dict[str, Any]], Producer]) -> None:
    def resolve(name: str) -> tuple[str | None, str]:
        """(node, model) of a client's name; ``name:latest`` is ``name`` (clients add the tag)."""
        for candidate in (name, name.removesuffix(":latest")):
            with contextlib.suppress(ApiError):
                return index.resolve(candidate)
        raise not_found(name)

    async def answer(kind: Literal["chat", "generate"], req: Generating, job_body: dict[str, Any],
                     tools: ToolPlan | None, started: float) -> Response:
        stream = await streams.one(registry, make_producer, job_body)
        reply = Reply(kind, req.model, tools, started)
        if not req.stream:
            return jsonify(await whole(reply, stream))
        response = Response(ndjson(reply, stream), status=200, content_type=NDJSON)
        response.timeout = None
        return response

    async def load_or_unload(kind: Literal["chat", "generate"], req: Generating, node: str | None,
                             model: str, started: float) -> Response:
        """An empty prompt: load the model (a worker ready for it), or with keep_alive 0 unload it."""
        reply = Reply(kind, req.model, None, started)
        if req.unloads():
            await models.unload(node, model)
            return jsonify(reply.chunk("", True, done_reason="unload"))
        body = {"load_only": True, "model": model, "node": node, "keep_alive": req.keep_alive,
                **req.placement()}
        answer = await streams.collect(await streams.one(registry, make_producer, body))
        return jsonify(reply.chunk("", True, done_reason="load", **timings(started, answer.ending)))

    @app.after_request
    async def ollama_error_shape(response: Response) -> Response:
        """Errors made before a route ran (401/403, 404 of an unknown route, 405) in Ollama's shape
        on its paths: ``{"error": "…"}``, which its clients show as the message."""
        if request.path.startswith("/api/") and response.status_code >= 400 and response.is_json:
            body = await response.get_json()
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict):
                response.set_data(json.dumps({"error": error.get("message") or error.get("code") or "error"}))
        return response

    @app.route("/", methods=["GET", "HEAD"])
    async def ollama_root() -> Response:
        return Response("Ollama is running", content_type="text/plain; charset=utf-8")

    @app.get("/api/version")
    async def ollama_version() -> Response:
        return jsonify({"version": VERSION})

    @app.get("/api/tags")
    async def ollama_tags() -> Response:
        return jsonify({"models": [tag(listed) for listed in index.listed()]})

    @app.post("/api/chat")
    async def ollama_chat() -> Response:
        started = time.perf_counter()
        req: ChatIn = parse(ChatIn, await streams.body())
        node, model = resolve(req.model)
        if not req.messages:
            return await load_or_unload("chat", req, node, model, started)
        openai = parse(ChatCompletionRequest, {**req.sampling(), "messages": req.openai_messages(),
                                               "tools": req.tools})
        job_body, tools = chat_job(openai, node, model)
        return await answer("chat", req, {**job_body, **req.placement()}, tools, started)

    @app.post("/api/generate")
    async def ollama_generate() -> Response:
        started = time.perf_counter()
        req: GenerateIn = parse(GenerateIn, await streams.body())
        node, model = resolve(req.model)
        if req.images:
            raise images_refused("images")
        if req.suffix:
            raise ApiError(400, "suffix: rbee does not do fill-in-the-middle yet; send the prompt alone")
        if req.template:
            raise ApiError(400, "template: rbee formats with the model's own chat template; leave template out "
                                "(or send raw: true with the prompt already formatted)")
        if not req.prompt:
            return await load_or_unload("generate", req, node, model, started)
        sampling = req.sampling()
        if req.system and not req.raw:
            openai = parse(ChatCompletionRequest, {**sampling, "messages": [
                {"role": "system", "content": req.system}, {"role": "user", "content": req.prompt}]})
            job_body, _ = chat_job(openai, node, model)
        else:
            completion = parse(CompletionRequest, {**sampling, "prompt": req.prompt})
            job_body = {"prompt": req.prompt, "model": model, "node": node, **completion.job_fields(None)}
            if not req.raw:
                job_body["template"] = "auto"
        return await answer("generate", req, {**job_body, **req.placement()}, None, started)

    async def embed_answer(req: EmbedIn, texts: list[str]) -> tuple[dict[int, list[float]], Event, float]:
        started = time.perf_counter()
        if req.dimensions is not None:
            raise ApiError(400, "dimensions: rbee returns the model's own dimension; leave it out")
        if not texts or any(not text for text in texts) or len(texts) > 2048:
            raise ApiError(400, "input: one non-empty string, or a list of 1 to 2048")
        node, model = resolve(req.model)
        body = {"input": texts, "model": model, "node": node, "keep_alive": req.keep_alive}
        result = await streams.collect(await streams.one(registry, make_producer, body))
        return result.vectors, result.ending, started

    @app.post("/api/embed")
    async def ollama_embed() -> Response:
        req: EmbedIn = parse(EmbedIn, await streams.body())
        texts = [req.input] if isinstance(req.input, str) else list(req.input or [])
        vectors, end, started = await embed_answer(req, texts)
        spent = timings(started, end)
        return jsonify({"model": req.model, "embeddings": [vectors[i] for i in range(len(texts))],
                        "total_duration": spent["total_duration"], "load_duration": spent["load_duration"],
                        "prompt_eval_count": spent["prompt_eval_count"]})

    @app.post("/api/embeddings")
    async def ollama_embeddings() -> Response:
        req: EmbedIn = parse(EmbedIn, await streams.body())
        vectors, _, _ = await embed_answer(req, [req.prompt or ""])
        return jsonify({"embedding": vectors[0]})

    @app.post("/api/show")
    async def ollama_show() -> Response:
        body = await streams.body()
        name = model_name(body, 'show needs {"model": NAME}')
        node, model = resolve(name)
        try:
            shown = await models.show(node, model)
        except RbeeError as exc:
            raise (not_found(name) if exc.status == 404 else ApiError.from_rbee(exc)) from exc
        return jsonify(show_body(shown))

    @app.get("/api/ps")
    async def ollama_ps() -> Response:
        rows = []
        now = time.time()
        for loaded in models.loaded():
            worker, entry = loaded.worker, loaded.entry
            keep = worker.keep_alive_s if worker.keep_alive_s is not None else -1
            expires = now + 10 * 365 * 86400 if keep < 0 else now + max(0.0, keep - worker.idle_s)
            on_gpu = worker.gpu_layers != 0 and worker.placement not in ("", "cpu", "CPU")
            rows.append({"name": loaded.name, "model": loaded.name, "size": worker.memory,
                         "size_vram": worker.memory if on_gpu else 0,
                         "digest": digest(entry.sha256, entry.ref) if entry else digest("", worker.model_path),
                         "details": details(entry.model_dump() if entry else None),
                         "expires_at": iso(expires), "context_length": worker.n_ctx,
                         "rbee": {"node": loaded.node, "worker_id": worker.worker_id, "state": worker.state}})
        return jsonify({"models": rows})

    @app.post("/api/pull")
    async def ollama_pull() -> Response:
        body = await streams.body()
        name = model_name(body, 'pull needs {"model": "hf:org/repo[:file.gguf]"}')
        node, ref = name.partition("/")[::2] if not name.startswith("hf:") else ("", name)
        if not ref.startswith("hf:"):
            raise ApiError(400, f"rbee pulls from Hugging Face: name the model as hf:org/repo[:file.gguf] "
                                f"(or NODE/hf:…), not {name!r}")
        job = streams.create_jobs(registry, make_pull, [{"ref": ref, "node": node or None}])[0]
        statuses = pull_lines(streams.job_events(registry, job, streams.client_name()))
        if body.get("stream") is False:
            last: dict[str, Any] = {}
            async for status in statuses:
                last = status
                if "error" in status:
                    raise ApiError(500, status["error"])
            return jsonify(last)
        response = Response(_lines(statuses), status=200, content_type=NDJSON)
        response.timeout = None
        return response

    @app.delete("/api/delete")
    async def ollama_delete() -> Response:
        body = await streams.body()
        name = model_name(body, 'delete needs {"model": NAME}')
        node, _, bare = name.partition("/")
        pinned = bool(bare) and node in index.nodes()
        try:
            await models.delete(node if pinned else None, bare if pinned else name.removesuffix(":latest"))
        except RbeeError as exc:
            raise (not_found(name) if exc.status == 404 else ApiError.from_rbee(exc)) from exc
        return Response("", status=200)


async def _lines(statuses: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for status in statuses:
        yield line(status)


async def pull_lines(stream: Events) -> AsyncIterator[dict[str, Any]]:
    """rbee's pull events as Ollama's progress lines."""
    yield {"status": "pulling manifest"}
    async with contextlib.aclosing(stream):
        async for event in stream:
            if event.type == events.NARRATION and event["action"] == "download" and "total" in event.fields:
                yield {"status": f"pulling {event['message'].split(' (')[0].removeprefix('downloading ')}",
                       "digest": "", "total": int(event["total"]), "completed": int(event.get("bytes") or 0)}
            elif event.type == events.NARRATION and event["action"] == "verify":
                yield {"status": "verifying sha256 digest"}
            elif event.type == events.NARRATION and event["action"] == "report" and event.get("model"):
                model = event["model"]
                yield {"status": "writing manifest", "digest": digest(model.get("sha256", ""), model["ref"])}
            elif event.type == events.END:
                yield {"status": "success"}
            elif event.type == events.ERROR:
                yield ApiError.from_event(event).ollama_body()


def default_parameters(context_length: int) -> str:
    """What a request that sets no option gets, in a Modelfile's ``PARAMETER`` lines' form."""
    fields = JobRequest.model_fields
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repeat_penalty": "repeat_penalty", "num_predict": "max_tokens"}
    lines = [f"{name:<16}{fields[field].default}" for name, field in names.items()]
    if context_length:
        lines.append(f"{'num_ctx':<16}{context_length}")
    return "\n".join(lines)


def show_body(shown: dict[str, Any]) -> dict[str, Any]:
    """Ollama's /api/show from the hive's account of the file: the GGUF header's scalars as
    ``model_info``, its chat template, the capabilities the template and engine give."""
    entry, header = shown["model"], dict(shown["header"])
    template = str(header.pop("tokenizer.chat_template", "") or "")
    arch = entry.get("architecture") or header.get("general.architecture") or ""
    info = {key: value for key, value in header.items() if not isinstance(value, (list, dict))}
    info.setdefault("general.architecture", arch)
    if arch and f"{arch}.context_length" not in info and entry.get("context_length"):
        info[f"{arch}.context_length"] = entry["context_length"]
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if entry.get("format") == "gguf":
        capabilities.append("embedding")  # any GGUF embeds on a worker loaded for it
    return {"license": "", "modelfile": f"# rbee catalog entry\nFROM {entry['ref']}\n",
            "parameters": default_parameters(int(entry.get("context_length") or 0)), "template": template,
            "details": details(entry), "model_info": info,
            "capabilities": capabilities,
            "modified_at": iso(entry["modified"]) if entry.get("modified") else now_iso()}
