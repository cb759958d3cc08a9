"""Quart routes of the dual-call link, mounted the same way by worker, hive and queen.

    POST {prefix}                 -> 201 {"job_id", "sse_url"}
    GET  {prefix}/<id>/stream     -> text/event-stream, ends with `data: [DONE]`; resumes after Last-Event-ID
    GET  {prefix}/<id>            -> {"job_id", "events", "finished"} (a resuming client checks the job is there)
    DELETE {prefix}/<id>          -> 202 {"job_id", "cancelled"}
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from quart import Quart, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from rbee.errors import RbeeError, RequestError
from rbee.link.events import DONE_FRAME, encode_frame
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.link.schemas import JobRequest, parse_job_request

log = logging.getLogger(__name__)

#: Request bodies above this are refused with 413 before they are read whole.
MAX_BODY_BYTES = 1024 * 1024
#: arrays and objects nested deeper than this are a 400: a schema's own bound is 32 levels
MAX_JSON_DEPTH = 64
TOO_DEEP = object()

PING_FRAME = b": ping\n\n"  # an SSE comment: resets the peer's read deadline, carries no event

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def install_error_handlers(app: Quart, actor: str) -> None:
    """Every error a server answers with is JSON naming the code, the message and who said it."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.errorhandler(RbeeError)
    async def _rbee_error(exc: RbeeError) -> tuple[Response, int]:
        body = error_body(exc.code, exc.message)
        body["error"]["actor"] = actor
        return jsonify(body), exc.status

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        name = (exc.name or "error").lower().replace(" ", "_")
        return jsonify(error_body(name, exc.description or name)), status


async def read_json_body() -> dict[str, Any]:
    """The request's JSON object, or a RequestError saying what is wrong with it."""
    raw = await request.get_data(as_text=False)
    if not raw:
        raise RequestError("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:
        body = TOO_DEEP  # nested deeper than Python's parser goes: refused below with the bound
    if body is TOO_DEEP or json_depth(body) > MAX_JSON_DEPTH:
        raise RequestError(f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep; "
                           "no rbee request needs that")
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def json_depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value``, without recursion of its own."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
            pending.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


async def sse_response(frames: AsyncIterator[bytes]) -> Response:
    response = Response(frames, status=200, headers=SSE_HEADERS)
    response.timeout = None  # a stream lasts as long as the generation
    return response


def request_producer(
    run: Callable[[Job, JobRequest], Awaitable[None]],
) -> Callable[[dict[str, Any]], Producer]:
    """``make_producer`` for routes that take a JobRequest: validate now (a bad body is a 400
    before any job exists), run later."""

    def make(body: dict[str, Any]) -> Producer:
        request = parse_job_request(body)

        async def produce(job: Job) -> None:
            await run(job, request)

        return produce

    return make


def add_job_routes(
    app: Quart,
    registry: JobRegistry,
    make_producer: Callable[[dict[str, Any]], Producer],
    *,
    prefix: str = "/v1/jobs",
) -> None:
    """Mount the link on ``app``. ``make_producer`` validates a body (raising RequestError) and
    returns the coroutine function that does the job, emitting events as it goes."""

    async def create_job() -> tuple[Response, int]:
        producer = make_producer(await read_json_body())
        job = registry.create(producer)
        return jsonify({"job_id": job.id, "sse_url": f"{prefix}/{job.id}/stream"}), 201

    async def stream_job(job_id: str) -> Response:
        after = _last_event_id(request.headers.get("Last-Event-ID"))
        registry.get(job_id)  # 404 now, before the stream starts

        async def frames() -> AsyncIterator[bytes]:
            ended = False
            async for batch in registry.stream(job_id, after):
                chunk = b"".join(encode_frame(event, event_id) for event_id, event in batch) or PING_FRAME
                ended = bool(batch) and batch[-1][1].terminal
                yield chunk + DONE_FRAME if ended else chunk  # the end and [DONE] in one write
            if not ended:
                yield DONE_FRAME

        return await sse_response(frames())

    async def job_status(job_id: str) -> Response:
        job = registry.get(job_id)  # what a client resuming a broken stream asks first
        return jsonify({"job_id": job.id, "events": len(job.history), "finished": job.finished})

    async def cancel_job(job_id: str) -> tuple[Response, int]:
        job = await registry.cancel(job_id)
        return jsonify({"job_id": job.id, "cancelled": job.cancelled}), 202

    name = prefix.strip("/").replace("/", "_")
    app.add_url_rule(prefix, f"{name}_create", create_job, methods=["POST"])
    app.add_url_rule(f"{prefix}/<job_id>/stream", f"{name}_stream", stream_job, methods=["GET"])
    app.add_url_rule(f"{prefix}/<job_id>", f"{name}_status", job_status, methods=["GET"])
    app.add_url_rule(f"{prefix}/<job_id>", f"{name}_cancel", cancel_job, methods=["DELETE"])


def _last_event_id(value: str | None) -> int:
    if not value:
        return 0
    try:
        after = int(value)
    except ValueError:
        raise RequestError(f"Last-Event-ID must be an event number, not {value!r}") from None
    if after < 0:
        raise RequestError("Last-Event-ID must not be negative")
    return after
