"""The OpenAPI document of the queen, served at ``GET /openapi.json``.

Request schemas come from the pydantic models the routes validate with, so they
cannot drift; a test checks that every route of the app is documented here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from rbee import __version__
from rbee.link.schemas import FleetShare, FleetWorker, HiveReport, HiveView, JobRequest
from rbee.queen.api.ollama import ChatIn, EmbedIn, GenerateIn
from rbee.queen.api.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

ERROR = {"$ref": "#/components/schemas/Error"}
JOB_CREATED = {
    "type": "object",
    "required": ["job_id", "sse_url"],
    "properties": {"job_id": {"type": "string"}, "sse_url": {"type": "string"}},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(summary: str, *, body: type[BaseModel] | dict[str, Any] | None = None,
        ok: str = "200", ok_schema: dict[str, Any] | None = None, sse: bool = False,
        errors: tuple[str, ...] = ("400",)) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if sse:
        responses[ok] = {"description": "Server-sent events", "content": {"text/event-stream": {}}}
    else:
        responses[ok] = {"description": "OK", **_json(ok_schema or {"type": "object"})}
    for status in errors:
        responses[status] = {"description": "Error", **_json(ERROR)}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        schema = {"$ref": f"#/components/schemas/{body.__name__}"} if isinstance(body, type) else body
        operation["requestBody"] = {"required": True, **_json(schema)}
    return operation


JOB_ID = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
FLEET_JOB = {"type": "object", "required": ["action"],
             "properties": {"action": {"enum": ["up", "down"]}, "inventory": {"type": "string"}}}


PULL_JOB = {"type": "object", "required": ["ref"],
            "properties": {"ref": {"type": "string"}, "node": {"type": "string"}}}
NODE_Q = {"name": "node", "in": "query", "required": False, "schema": {"type": "string"}}


JOB_STATUS = {"type": "object", "properties": {"job_id": {"type": "string"}, "events": {"type": "integer"},
                                              "finished": {"type": "boolean"}}}


def _list(key: str, model: str, **more: str) -> dict[str, Any]:
    """An object of arrays: ``key`` of ``model``, and each of ``more`` (key: model)."""
    lists = {key: model, **more}
    return {"type": "object", "properties": {name: {"type": "array", "items": {"$ref": f"#/components/schemas/{kind}"}}
                                             for name, kind in lists.items()}}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _with(operation: dict[str, Any], parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {**operation, "parameters": parameters}


MODEL_BODY = {"type": "object", "required": ["model"], "properties": {"model": {"type": "string"}}}
NDJSON = {"description": "NDJSON lines (stream: true, the default) or one JSON object",
          "content": {"application/x-ndjson": {}, "application/json": {}}}


def _ollama(summary: str, body: type[BaseModel] | dict[str, Any] | None = None, ndjson: bool = False) -> dict[str, Any]:
    operation = _op(f"Ollama: {summary}", body=body, errors=("400", "404") if body is not None else ())
    if ndjson:
        operation["responses"]["200"] = NDJSON
    return operation


def ollama_paths() -> dict[str, Any]:
    """Ollama's API (rbee.queen.api.ollama); errors are ``{"error": "…"}``."""
    return {
        "/": {"get": {"summary": "Ollama: liveness, without a key", "responses": {"200": {
            "description": "Ollama is running", "content": {"text/plain": {}}}}}},
        "/api/version": {"get": _ollama("the API version rbee answers like")},
        "/api/tags": {"get": _ollama("models the fleet serves")},
        "/api/ps": {"get": _ollama("models loaded now, on which host")},
        "/api/show": {"post": _ollama("what a model's file says of itself", MODEL_BODY)},
        "/api/chat": {"post": _ollama("chat", ChatIn, ndjson=True)},
        "/api/generate": {"post": _ollama("completion (or load / unload with an empty prompt)", GenerateIn,
                                          ndjson=True)},
        "/api/embed": {"post": _ollama("embeddings", EmbedIn)},
        "/api/embeddings": {"post": _ollama("one embedding (the older route)", EmbedIn)},
        "/api/pull": {"post": _ollama("pull hf:org/repo[:file] with progress lines", MODEL_BODY, ndjson=True)},
        "/api/delete": {"delete": _ollama("remove a model from the catalogs", MODEL_BODY)},
    }


def _page(summary: str) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": {"description": "OK", "content": {"text/html": {}}}}}


def dashboard_paths(stream: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's page and its API: a browser session's cookie (``rbee dashboard``), with
    the page's CSRF token in ``X-Rbee-Csrf`` on every action."""
    token = {"type": "object", "required": ["token"], "properties": {"token": {"type": "string"}}}
    return {
        "/v1/dashboard/logins": {"post": _op("A one-time dashboard login (the owner's key)", ok="201", errors=())},
        "/dashboard": {"get": _page("Redirects to /dashboard/")},
        "/dashboard/": {"get": _page("The dashboard, or a login notice that names nothing")},
        "/dashboard/static/{name}": {"get": _with(_page("The page's script, style and icon"), [_path("name")])},
        "/dashboard/login": {"post": _op("Trade a one-time login for the session cookie", body=token,
                                         errors=("401", "403"))},
        "/dashboard/api/logout": {"post": _op("End this browser's session", errors=())},
        "/dashboard/api/events": {"get": _op("The page's live views (SSE: HTML fragments by view, log lines)",
                                             sse=True, errors=("401",))},
        "/dashboard/api/jobs": {"post": _op("The playground: an inference job", body=JobRequest, ok="201",
                                            ok_schema=JOB_CREATED)},
        "/dashboard/api/jobs/{job_id}/stream": {"get": dict(stream)},
        "/dashboard/api/jobs/{job_id}": dict(job),
        "/dashboard/api/pull": {"post": _op("Pull a model; it runs to its end, followed in the Models view",
                                            body=PULL_JOB, ok="202")},
        "/dashboard/api/workers/{node}/{worker_id}/stop": {"post": _with(_op("Unload a worker", errors=("404",)),
                                                                        [_path("node"), _path("worker_id")])},
    }


def document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [JobRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                     HiveReport, HiveView, FleetWorker, FleetShare, ChatIn, GenerateIn, EmbedIn]
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Error"] = {"type": "object", "properties": {"error": {"type": "object"}}}
    stream = _op("Stream a job's events", sse=True, errors=("404",))
    stream["parameters"] = JOB_ID
    cancel = _op("Cancel a job", ok="202", errors=("404",))
    cancel["parameters"] = JOB_ID
    status = _op("Is the job still here (asked before resuming a broken stream)", ok_schema=JOB_STATUS,
                 errors=("404",))
    status["parameters"] = JOB_ID
    job = {"get": status, "delete": cancel}
    fleet_stream = dict(stream)
    logs = _op("The end of a hive's log", errors=("404",))
    logs["parameters"] = [*NAME, {"name": "lines", "in": "query", "schema": {"type": "integer"}}]
    beat = _op("A hive's heartbeat", body=HiveReport)
    beat["parameters"] = NAME
    paths = {
        "/health": {"get": _op("Liveness of the queen", errors=())},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "Prometheus text format", "content": {"text/plain": {}}}}}},
        "/openapi.json": {"get": _op("This document", errors=())},
        "/v1/jobs": {"post": _op("Create an inference job", body=JobRequest, ok="201", ok_schema=JOB_CREATED)},
        "/v1/jobs/{job_id}/stream": {"get": stream},
        "/v1/jobs/{job_id}": job,
        "/v1/fleet/jobs": {"post": _op("Run `fleet up` or `fleet down` as a job", body=FLEET_JOB, ok="201",
                                       ok_schema=JOB_CREATED)},
        "/v1/fleet/jobs/{job_id}/stream": {"get": fleet_stream},
        "/v1/fleet/jobs/{job_id}": dict(job),
        "/v1/fleet/plan": {"post": _op("What `fleet up` would do", body={"type": "object"})},
        "/v1/fleet/logs/{name}": {"get": logs},
        "/v1/hives": {"get": _op("Every hive and its live state", errors=(), ok_schema=_list("hives", "HiveView"))},
        "/v1/hives/{name}/heartbeat": {"post": beat},
        "/v1/admin/shutdown": {"post": _op("Stop the queen and what it started", ok="202", errors=())},
        "/v1/catalog": {"get": _with(_op("Models on each hive (or ?node=NAME)", errors=("404",)), [NODE_Q])},
        "/v1/catalog/jobs": {"post": _op("Pull a model onto a hive, as a job with progress", body=PULL_JOB,
                                         ok="201", ok_schema=JOB_CREATED)},
        "/v1/catalog/jobs/{job_id}/stream": {"get": dict(stream)},
        "/v1/catalog/jobs/{job_id}": dict(job),
        "/v1/catalog/{node}/{name}": {"delete": _with(_op("Remove a model from a hive", errors=("404",)),
                                                      [_path("node"), _path("name")])},
        "/v1/workers": {"get": _op("Every worker of every live hive, and the shares of split models they serve",
                                   errors=(), ok_schema=_list("workers", "FleetWorker", shares="FleetShare"))},
        "/v1/workers/{node}/{worker_id}/stop": {"post": _with(_op("Stop a worker", errors=("404",)),
                                                              [_path("node"), _path("worker_id")])},
        "/v1/models": {"get": _op("OpenAI: models the fleet serves", errors=())},
        "/v1/chat/completions": {"post": _op("OpenAI: chat completion", body=ChatCompletionRequest,
                                             errors=("400", "404", "503"))},
        "/v1/completions": {"post": _op("OpenAI: text completion", body=CompletionRequest,
                                        errors=("400", "404", "503"))},
        "/v1/embeddings": {"post": _op("OpenAI: embeddings (a worker loaded for them)", body=EmbeddingRequest,
                                       errors=("400", "404", "503"))},
        **ollama_paths(),
        **dashboard_paths(stream, job),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "rbee queen", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }
