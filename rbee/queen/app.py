"""The queen's HTTP face: the job entry point for keepers, the fleet, hive heartbeats,
status and shutdown."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from pathlib import Path
from typing import Any

import psutil
from quart import Quart, Response, jsonify, request

from rbee import __version__, inventory
from rbee.config import DEFAULT_MODEL, LOCAL_NODE, QueenConfig
from rbee.errors import ModelNotFoundError, RequestError, StartupError
from rbee.link import events
from rbee.link.auth import install_auth
from rbee.link.client import LinkClient
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.link.metrics import Metrics
from rbee.link.relay import relay
from rbee.link.schemas import JobRequest
from rbee.link.server import add_job_routes, install_error_handlers, read_json_body, request_producer
from rbee.queen.catalog import HiveCatalog
from rbee.queen.fleet.manager import Fleet, default_wheelhouse
from rbee.queen.hives import HiveRegistry, HiveState, LocalHiveLauncher
from rbee.queen.openai_api import ModelIndex, default_models, mount_openai
from rbee.queen.openapi import document as openapi_document
from rbee.queen.scheduler import HiveView, ModelLoad, choose_hive, model_keys


class UnknownNodeError(ModelNotFoundError):
    code = "unknown_node"


class NodeDownError(StartupError):
    code = "node_down"


class Queen:
    def __init__(self, config: QueenConfig, url: str, token: str | None = None) -> None:
        self.config = config
        self.token = token
        self.url = url
        self.hives = HiveRegistry(config.heartbeat_interval)
        self.local = LocalHiveLauncher(config, url, self.hives)
        self.metrics = Metrics(config.actor)
        self.registry = JobRegistry(config.actor, ping=config.ping_interval, on_finish=self.metrics.job_finished)
        self.clients: dict[str, LinkClient] = {}
        #: jobs this queen is relaying, per (hive, model): the scheduler's view between heartbeats
        self.in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        self.stop = asyncio.Event()
        self.catalog = HiveCatalog(config.home / "queen.db")
        self.fleet = Fleet(
            self.load_inventory(config.inventory),
            self.hives,
            self.catalog,
            default_wheelhouse(),
            queen_port=int(url.rsplit(":", 1)[1]),
            heartbeat_interval=config.heartbeat_interval,
            hive_ready_timeout=config.hive_ready_timeout,
            token=token,
        )

    @staticmethod
    def load_inventory(path: str) -> inventory.Inventory:
        return inventory.load(Path(path)) if path else inventory.Inventory.local_only()

    def use_inventory(self, path: str | None) -> None:
        if path:
            self.fleet.inventory = self.load_inventory(path)

    def client_for(self, hive: HiveState) -> LinkClient:
        client = self.clients.get(hive.name)
        if client is None or client.base_url != hive.url.rstrip("/"):
            client = self.clients[hive.name] = LinkClient(
                hive.url, f"hive:{hive.name}", stall_timeout=self.config.stall_timeout, token=self.token
            )
        return client

    def known_nodes(self) -> list[str]:
        return sorted({LOCAL_NODE, *self.fleet.inventory.names})

    def views(self) -> list[HiveView]:
        """What the scheduler needs of every hive, from the last heartbeats."""
        result = []
        for name in self.known_nodes():
            state = self.hives.hives.get(name)
            up = state is not None and state.state == "up"
            entry = self.fleet.inventory.get(name)
            local = name == LOCAL_NODE and (entry is None or not entry.remote)
            report = state.report if state is not None and up else {}
            models = report.get("models", [])
            by_path = {m.get("path"): model_keys(m["name"], m["ref"]) for m in models}
            sizes = {key: int(m.get("size", 0)) for m in models for key in model_keys(m["name"], m["ref"])}
            warm: set[str] = set()
            load: dict[str, ModelLoad] = {}
            for worker in report.get("workers", []):
                if worker.get("state") in ("ready", "busy"):
                    keys = by_path.get(worker.get("model_path"), set())
                    warm |= keys
                    busy = worker.get("load") or {}
                    this = ModelLoad(int(busy.get("slots", 1)), int(busy.get("slots_busy", 0)),
                                     int(busy.get("queue", 0)))
                    for key in keys:
                        load[key] = load.get(key, ModelLoad()) + this
            for (hive_name, model), jobs in self.in_flight.items():
                if hive_name == name and model in load:
                    load[model] = load[model].with_in_flight(jobs)
            on_disk = set().union(*(model_keys(m["name"], m["ref"]) for m in models)) if models else set()
            if "free_memory" in report:
                free = report["free_memory"]  # the hive's own admission rule: largest pool, budget applied
            else:
                free = psutil.virtual_memory().available if local else 0
            result.append(HiveView(name, up or local, frozenset(warm), frozenset(on_disk), int(free), load, sizes))
        return result

    async def hive_for(self, request: JobRequest, job: Job) -> HiveState:
        node = request.node
        if node is None:
            node = choose_hive(self.views(), request.model or DEFAULT_MODEL)
            job.narrate("schedule", f"scheduler picked hive:{node} for {request.model or DEFAULT_MODEL}")
        return await self.hive_named(node, job.narrate)

    async def hive_named(self, node: str, narrate: Any) -> HiveState:
        """A live hive by name: the local one or an inventory host, started when needed."""
        entry = self.fleet.inventory.get(node)
        if node == LOCAL_NODE and (entry is None or not entry.remote):
            return await self.local.ensure(narrate)
        if entry is None:
            raise UnknownNodeError(
                f"unknown node {node!r}; known nodes: {', '.join(self.known_nodes())} "
                f"(from {self.fleet.inventory.path or 'no inventory'})"
            )
        if not entry.remote:
            raise UnknownNodeError(f"node {node!r} has no ssh target in the inventory; only localhost runs here")
        state = self.hives.hives.get(node)
        if state is not None and state.state == "down":
            raise NodeDownError(
                f"node {node!r} is down ({state.reason}); see `rbee fleet logs {node}` and bring it back "
                "with `rbee fleet up`"
            )
        return await self.fleet.ensure(entry, narrate)

    async def on_hive(self, node: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        hive = await self.hive_named(node, lambda action, message, **extra: None)
        return await self.client_for(hive).request_json(method, path, body)

    def up_nodes(self, node: str | None) -> list[str]:
        if node is not None:
            return [node]
        return [v.name for v in self.views() if v.available]

    async def run_job(self, job: Job, request: JobRequest) -> None:
        hive = await self.hive_for(request, job)
        job.narrate("route", f"job goes to hive:{hive.name}")
        key = (hive.name, request.model or DEFAULT_MODEL)
        self.in_flight[key] += 1
        try:
            await relay(job, self.client_for(hive), self.body_for(request, hive.name))
        finally:
            self.in_flight[key] -= 1
            if self.in_flight[key] <= 0:
                del self.in_flight[key]

    def body_for(self, request: JobRequest, node: str) -> dict[str, Any]:
        """What the hive gets: a logical model's forms and settings, and the hive's own settings,
        each unless the job chose (job > model > hive > the hive's defaults)."""
        inventory = self.fleet.inventory
        changes: dict[str, Any] = {"node": None}
        logical = inventory.models.get(request.model) if request.model else None
        entry = inventory.get(node)
        if logical is not None:
            changes["forms"] = logical.forms()
            for key in ("ctx", "parallel", "queue"):
                if getattr(request, key) is None and getattr(logical, key) is not None:
                    changes[key] = getattr(logical, key)
        if entry is not None and entry.backend != "auto" and request.backend in (None, "auto"):
            changes["backend"] = entry.backend
        if request.gpu_layers is None:
            for source in (logical, entry):
                if source is not None and source.gpu_layers is not None:
                    changes["gpu_layers"] = source.gpu_layers
                    break
        if request.gpu_split is None and entry is not None and entry.gpu_split:
            changes["gpu_split"] = True
        return request.downstream(**changes)

    async def run_fleet_job(self, job: Job, action: str) -> None:
        started = time.monotonic()
        if action == "up":
            report = await self.fleet.up(job.narrate)
        else:
            report = await self.fleet.down(job.narrate)
        job.narrate("report", f"fleet {action} done", report=report)
        job.emit(events.end(0, time.monotonic() - started, "done"))

    def status(self) -> list[dict[str, Any]]:
        """Every hive of the inventory (plus any live one), with live state; no ghosts."""
        now = time.monotonic()
        listed = set(self.fleet.inventory.names)
        rows = []
        for name in sorted(listed | {h.name for h in self.hives.hives.values() if h.state == "up"}):
            hive = self.hives.hives.get(name) or HiveState(name, state="not running", reason="never started")
            row = hive.describe(now)
            record = self.catalog.get(name)
            row["installed"] = record.install_state if record else None
            entry = self.fleet.inventory.get(name)
            row["ssh"] = entry.ssh if entry else None
            rows.append(row)
        return rows

    async def watch_heartbeats(self) -> None:
        while True:
            self.hives.check_overdue()
            await asyncio.sleep(self.config.heartbeat_interval / 2)

    async def close(self) -> None:
        await self.registry.close()
        await self.local.stop()
        await self.fleet.close(stop_launched=self.config.ephemeral)
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self.clients.clear()
        with contextlib.suppress(Exception):
            self.catalog.close()


def create_app(queen: Queen) -> Quart:
    app = Quart(__name__)
    install_error_handlers(app, queen.config.actor)
    install_auth(app, queen.token)

    make_producer = request_producer(queen.run_job)

    def make_fleet_producer(body: dict[str, Any]) -> Producer:
        action = body.get("action")
        if action not in ("up", "down"):
            raise RequestError("fleet jobs need {\"action\": \"up\" | \"down\", \"inventory\"?: path}")
        queen.use_inventory(body.get("inventory"))

        async def produce(job: Job) -> None:
            await queen.run_fleet_job(job, action)

        return produce

    add_job_routes(app, queen.registry, make_producer)
    queen.metrics.mount(app, lambda: [("hive", h["name"], h["state"], h["heartbeat_age_s"]) for h in queen.status()])
    add_job_routes(app, queen.registry, make_fleet_producer, prefix="/v1/fleet/jobs")
    def served() -> dict[str, list[str]]:
        inventory = queen.fleet.inventory
        extra = {e.name: [*e.models, *inventory.models] for e in inventory.hive}
        return default_models(queen.known_nodes(), extra)

    index = ModelIndex(served)
    mount_openai(app, queen.registry, index, make_producer)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return jsonify(openapi_document())

    @app.get("/health")
    async def health() -> Response:
        return jsonify({"role": "queen", "version": __version__, "ephemeral": queen.config.ephemeral})

    @app.get("/v1/hives")
    async def hives() -> Response:
        return jsonify({"hives": queen.status()})

    @app.post("/v1/hives/<name>/heartbeat")
    async def hive_heartbeat(name: str) -> Response:
        queen.hives.heartbeat(name, await read_json_body())
        return jsonify({"ok": True})

    @app.post("/v1/fleet/plan")
    async def fleet_plan() -> Response:
        body = await read_json_body()
        path = body.get("inventory")
        plan_for = queen.load_inventory(path) if isinstance(path, str) and path else queen.fleet.inventory
        steps = await queen.fleet.plan(plan_for, lambda action, message: None)
        return jsonify({"plan": [step.as_dict() for step in steps]})

    @app.get("/v1/fleet/logs/<name>")
    async def fleet_logs(name: str) -> Response:
        lines = min(int(request.args.get("lines", "50")), 5000)
        return jsonify({"name": name, "lines": await queen.fleet.logs(name, lines)})

    def make_pull(body: dict[str, Any]) -> Producer:
        ref, node = body.get("ref"), body.get("node") or LOCAL_NODE
        if not isinstance(ref, str) or not ref or not isinstance(node, str):
            raise RequestError('pull needs {"ref": "hf:org/repo[:file.gguf]", "node"?: NAME}')

        async def produce(job: Job) -> None:
            hive = await queen.hive_named(node, job.narrate)
            await relay(job, queen.client_for(hive), {"ref": ref}, path="/v1/catalog/jobs")

        return produce

    add_job_routes(app, queen.registry, make_pull, prefix="/v1/catalog/jobs")

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
        rows = [{**w, "node": h["name"]} for h in queen.status() if h["state"] == "up" for w in h["workers"]]
        return jsonify({"workers": rows})

    @app.post("/v1/workers/<node>/<worker_id>/stop")
    async def stop_worker(node: str, worker_id: str) -> Response:
        return jsonify(await queen.on_hive(node, "POST", f"/v1/workers/{worker_id}/stop"))

    @app.post("/v1/admin/shutdown")
    async def shutdown() -> tuple[Response, int]:
        queen.stop.set()
        return jsonify({"stopping": "queen"}), 202

    return app
