"""The queen's HTTP face: the job entry point for keepers, hive heartbeats, status, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from quart import Quart, Response, jsonify

from rbee import __version__
from rbee.config import LOCAL_NODE, QueenConfig
from rbee.errors import ModelNotFoundError, StartupError
from rbee.link.client import LinkClient
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.link.relay import relay
from rbee.link.schemas import JobRequest, parse_job_request
from rbee.link.server import add_job_routes, install_error_handlers, read_json_body
from rbee.queen.hives import HiveRegistry, HiveState, LocalHiveLauncher


class UnknownNodeError(ModelNotFoundError):
    code = "unknown_node"


class Queen:
    def __init__(self, config: QueenConfig, url: str) -> None:
        self.config = config
        self.url = url
        self.hives = HiveRegistry(config.heartbeat_interval)
        self.local = LocalHiveLauncher(config, url, self.hives)
        self.registry = JobRegistry(config.actor)
        self.clients: dict[str, LinkClient] = {}
        self.stop = asyncio.Event()

    def client_for(self, hive: HiveState) -> LinkClient:
        client = self.clients.get(hive.name)
        if client is None or client.base_url != hive.url:
            client = self.clients[hive.name] = LinkClient(hive.url, f"hive:{hive.name}")
        return client

    async def hive_for(self, request: JobRequest, job: Job) -> HiveState:
        node = request.node or LOCAL_NODE
        if node == LOCAL_NODE:
            return await self.local.ensure(job.narrate)
        hive = self.hives.get_up(node)
        if hive is not None:
            return hive
        known = sorted({LOCAL_NODE, *self.hives.hives})
        if node in self.hives.hives:
            state = self.hives.hives[node]
            raise StartupError(f"node {node!r} is {state.state} ({state.reason}); start it with `rbee fleet up`")
        raise UnknownNodeError(f"unknown node {node!r}; known nodes: {', '.join(known)}")

    async def run_job(self, job: Job, request: JobRequest) -> None:
        hive = await self.hive_for(request, job)
        job.narrate("route", f"job goes to hive:{hive.name}")
        await relay(job, self.client_for(hive), request.downstream(node=None))

    async def watch_heartbeats(self) -> None:
        while True:
            self.hives.check_overdue()
            await asyncio.sleep(self.config.heartbeat_interval / 2)

    async def close(self) -> None:
        await self.registry.close()
        await self.local.stop()
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()


def create_app(queen: Queen) -> Quart:
    app = Quart(__name__)
    install_error_handlers(app, queen.config.actor)

    def make_producer(body: dict[str, Any]) -> Producer:
        request = parse_job_request(body)

        async def produce(job: Job) -> None:
            await queen.run_job(job, request)

        return produce

    add_job_routes(app, queen.registry, make_producer)

    @app.get("/health")
    async def health() -> Response:
        return jsonify({"role": "queen", "version": __version__, "ephemeral": queen.config.ephemeral})

    @app.get("/v1/hives")
    async def hives() -> Response:
        return jsonify({"hives": queen.hives.describe()})

    @app.post("/v1/hives/<name>/heartbeat")
    async def hive_heartbeat(name: str) -> Response:
        queen.hives.heartbeat(name, await read_json_body())
        return jsonify({"ok": True})

    @app.post("/v1/admin/shutdown")
    async def shutdown() -> tuple[Response, int]:
        queen.stop.set()
        return jsonify({"stopping": "queen"}), 202

    return app
