"""The queen's HTTP face: the job entry point for keepers, the fleet, hive heartbeats,
status and shutdown. Routes only: the work is in :mod:`rbee.queen.service`."""

from __future__ import annotations

import asyncio
from typing import Any

from quart import Quart, Response, g, jsonify, request

from rbee import __version__
from rbee.config import DEFAULT_MODEL, LOCAL_NODE
from rbee.errors import RequestError
from rbee.link.auth import install_auth
from rbee.link.jobs import Job, Producer
from rbee.link.relay import relay
from rbee.link.schemas import FleetShare, FleetWorker, parse_job_request
from rbee.link.server import add_job_routes, error_body, install_error_handlers, read_json_body
from rbee.queen import split
from rbee.queen.api.models import ModelIndex
from rbee.queen.api.ollama import mount_ollama
from rbee.queen.api.openai import mount_openai
from rbee.queen.dashboard.routes import mount_dashboard, session_gate
from rbee.queen.fleet_models import FleetModels
from rbee.queen.keys import ClientKey, check_model
from rbee.queen.openapi import document as openapi_document
from rbee.queen.service import Queen


def create_app(queen: Queen) -> Quart:
    app = Quart(__name__)
    install_error_handlers(app, queen.config.actor)

    def hive_key(name: str) -> str | None:
        """The secret the hive ``name`` was launched with."""
        peer = queen.hives.get(name)
        return peer.secret if peer is not None else None

    def hive_secret() -> str | None:
        """A heartbeat proves the hive with the secret it was launched with."""
        if request.endpoint != "hive_heartbeat":
            return None
        return hive_key(str((request.view_args or {}).get("name", "")))

    def client(secret: str) -> tuple[Response, int] | bool | None:
        """A scoped client key: inference routes only (rbee.queen.keys)."""
        key = queen.keys.find(secret)
        if key is None:
            return None
        if not key.allows_route(request.path):
            body = error_body("forbidden", f"the client key {key.name!r} runs inference only (the OpenAI routes, "
                                           "Ollama's chat, generate, embed, tags, show, ps and /v1/jobs); fleet, "
                                           "admin, logs, pull and delete need the owner's key")
            return jsonify(body), 403
        g.client_key = key
        queen.metrics.client_requests.labels(key.name).inc()
        return True

    install_auth(app, [queen.token or ""], "queen", peer_secret=hive_secret, peer_key=hive_key, client=client,
                 open_paths=("/",), session=session_gate(queen.sessions))

    def model_roots() -> list[str]:
        return list(queen.fleet.inventory.queen.model_roots)

    def make_producer(body: dict[str, Any]) -> Producer:
        """Every inference route's jobs: validated, and checked against the caller's key (one
        model policy for every route) before any job exists."""
        job_request = parse_job_request(body)
        key: ClientKey | None = g.get("client_key")
        check_model(key, [job_request.model, *(job_request.forms or {}).values()], model_roots(), DEFAULT_MODEL)

        async def produce(job: Job) -> None:
            try:
                await queen.run_job(job, job_request)
            finally:
                if key is not None:
                    queen.metrics.client_tokens.labels(key.name).inc(job.tokens)

        return produce

    def make_fleet_producer(body: dict[str, Any]) -> Producer:
        action = body.get("action")
        if action not in ("up", "down"):
            raise RequestError("fleet jobs need {\"action\": \"up\" | \"down\", \"inventory\"?: path}")
        queen.use_inventory(body.get("inventory"))

        async def produce(job: Job) -> None:
            await queen.run_fleet_job(job, action)

        return produce

    add_job_routes(app, queen.registry, make_producer)
    queen.metrics.mount(app, lambda: [("hive", h.name, h.state, h.heartbeat_age_s) for h in queen.status()])
    add_job_routes(app, queen.registry, make_fleet_producer, prefix="/v1/fleet/jobs")
    fleet_models = FleetModels(queen)
    index = ModelIndex(queen.model_names, lambda: g.get("client_key"), queen.catalogs)
    mount_openai(app, queen.registry, index, make_producer)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return jsonify(openapi_document())

    @app.get("/health")
    async def health() -> Response:
        return jsonify({"role": "queen", "version": __version__, "ephemeral": queen.config.ephemeral})

    @app.get("/v1/hives")
    async def hives() -> Response:
        return jsonify({"hives": [row.model_dump(mode="json") for row in queen.status()]})

    @app.post("/v1/hives/<name>/heartbeat")
    async def hive_heartbeat(name: str) -> Response:
        hive = queen.hives.heartbeat(name, await read_json_body())
        if hive.report is not None:
            queen.feed.heartbeat(name, hive.report)
            queen.reap_strays(name, hive.report)
        return jsonify({"ok": True})

    @app.post("/v1/fleet/plan")
    async def fleet_plan() -> Response:
        body = await read_json_body()
        path = body.get("inventory")
        plan_for = queen.load_inventory(path) if isinstance(path, str) and path else queen.fleet.inventory
        steps = await queen.fleet.plan(plan_for, lambda action, message: None)
        models = split.model_plans(queen.views(), plan_for, queen.catalogs())
        return jsonify({"plan": [step.as_dict() for step in steps],
                        "models": [{"model": m.model, "placement": m.placement, "fits": m.fits} for m in models]})

    @app.get("/v1/fleet/logs/<name>")
    async def fleet_logs(name: str) -> Response:
        given = request.args.get("lines", "50")
        if not given.isdigit() or not 1 <= int(given) <= 5000:
            raise RequestError(f"?lines= takes a whole number from 1 to 5000, not {given!r}")
        lines = int(given)
        return jsonify({"name": name, "lines": await queen.fleet.logs(name, lines)})

    def make_pull(body: dict[str, Any]) -> Producer:
        ref, node = body.get("ref"), body.get("node") or LOCAL_NODE
        if not isinstance(ref, str) or not ref or not isinstance(node, str):
            raise RequestError('pull needs {"ref": "hf:org/repo[:file.gguf]", "node"?: NAME}')

        async def produce(job: Job) -> None:
            job.info.update(kind="pull", ref=ref, node=node)  # the dashboard's Models view follows it
            hive = await queen.hive_named(node, job.narrate)
            with queen.hives.relaying(hive, job):
                await relay(job, queen.hive_link(hive), {"ref": ref}, path="/v1/catalog/jobs")

        return produce

    add_job_routes(app, queen.registry, make_pull, prefix="/v1/catalog/jobs")
    mount_ollama(app, queen.registry, index, make_producer, fleet_models, make_pull)
    mount_dashboard(app, queen, make_producer, make_pull,
                    lambda: sorted({name for names in queen.model_names().values() for name in names}))

    @app.get("/v1/catalog")
    async def catalog() -> Response:
        nodes = queen.up_nodes(request.args.get("node"))
        listed = await asyncio.gather(*(queen.on_hive(n, "GET", "/v1/catalog") for n in nodes))
        return jsonify({"nodes": {n: result["models"] for n, result in zip(nodes, listed, strict=True)}})

    @app.delete("/v1/catalog/<node>/<name>")
    async def remove_model(node: str, name: str) -> Response:
        return jsonify(await queen.on_hive(node, "DELETE", f"/v1/catalog/{name}"))

    @app.get("/v1/workers")
    async def workers() -> Response:
        hives = [h for h in queen.status() if h.state in ("up", "busy")]
        return jsonify({
            "workers": [FleetWorker(**w.model_dump(), node=h.name).model_dump(mode="json")
                        for h in hives for w in h.workers],
            "shares": [FleetShare(**s.model_dump(), node=h.name).model_dump(mode="json")
                       for h in hives for s in h.shares],
        })

    @app.post("/v1/workers/<node>/<worker_id>/stop")
    async def stop_worker(node: str, worker_id: str) -> Response:
        return jsonify(await queen.on_hive(node, "POST", f"/v1/workers/{worker_id}/stop"))

    @app.post("/v1/admin/shutdown")
    async def shutdown() -> tuple[Response, int]:
        queen.stop.set()
        return jsonify({"stopping": "queen"}), 202

    return app
