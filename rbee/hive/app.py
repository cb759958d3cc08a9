"""The hive's HTTP face: job link (relayed to a worker), model catalog, workers,
worker heartbeats, status, shutdown. Routes only: the work is in :mod:`rbee.hive.service`."""

from __future__ import annotations

from typing import Any

from quart import Quart, Response, jsonify, request

from rbee import __version__
from rbee.errors import RequestError, UnknownWorkerError
from rbee.hive.service import Hive
from rbee.link.auth import install_auth, loopback_url
from rbee.link.jobs import Job, Producer
from rbee.link.schemas import PullRequest, ShareRequest, parse_wire
from rbee.link.server import add_job_routes, install_error_handlers, read_json_body, request_producer


def create_app(hive: Hive) -> Quart:
    app = Quart(__name__)
    config = hive.config
    install_error_handlers(app, config.actor)

    def worker_key(worker_id: str) -> str | None:
        """The secret the worker ``worker_id`` was spawned with."""
        record = hive.supervisor.workers.get(worker_id)
        return record.secret if record is not None else None

    def worker_secret() -> str | None:
        """A worker's heartbeat proves the worker with the secret it was spawned with."""
        if request.endpoint != "worker_heartbeat":
            return None
        return worker_key(str((request.view_args or {}).get("worker_id", "")))

    install_auth(app, lambda: hive.keys, config.actor, peer_secret=worker_secret, peer_key=worker_key)

    def make_pull(body: dict[str, Any]) -> Producer:
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            raise RequestError('pull needs {"ref": "hf:org/repo[:file.gguf]" | "gemma3-270m"}')
        asked = parse_wire(PullRequest, body, "pull request")

        async def produce(job: Job) -> None:
            await hive.pull(job, asked.ref, asked.share)

        return produce

    add_job_routes(app, hive.registry, request_producer(hive.run_job))
    hive.metrics.mount(app, lambda: [(w.kind, w.name, w.state.value, w.heartbeat_age()) for w in hive.supervisor.peers])
    add_job_routes(app, hive.registry, make_pull, prefix="/v1/catalog/jobs")

    @app.get("/health")
    async def health() -> Response:
        return jsonify({"name": config.name, "version": __version__, "workers": len(hive.supervisor.workers)})

    @app.get("/v1/status")
    async def status() -> Response:
        return jsonify(hive.status().model_dump(mode="json"))

    @app.get("/v1/catalog")
    async def catalog() -> Response:
        return jsonify({"models": [entry.describe() for entry in hive.catalog.entries()]})

    @app.post("/v1/catalog/show")
    async def show_model() -> Response:
        body = await read_json_body()
        model, forms = body.get("model"), body.get("forms")
        if not (model is None or isinstance(model, str)) or not (forms is None or isinstance(forms, dict)):
            raise RequestError('show needs {"model": REF, "forms"?: {"gguf": REF, "mlx": REF}}')
        return jsonify(await hive.show(model, forms))

    @app.delete("/v1/catalog/<name>")
    async def remove_model(name: str) -> Response:
        return jsonify({"removed": await hive.remove_model(name)})

    @app.get("/v1/workers")
    async def workers() -> Response:
        return jsonify({"workers": hive.supervisor.describe()})

    @app.post("/v1/shares")
    async def start_share() -> Response:
        asked = parse_wire(ShareRequest, await read_json_body(), "share request")
        return jsonify({"share": (await hive.start_share(asked)).model_dump(mode="json")})

    @app.delete("/v1/shares/<share_id>")
    async def stop_share(share_id: str) -> Response:
        share = await hive.supervisor.shares.stop(share_id, "stopped by the queen")
        return jsonify({"stopped": share.view().model_dump(mode="json")})

    @app.post("/v1/workers/<worker_id>/stop")
    async def stop_worker(worker_id: str) -> Response:
        record = await hive.supervisor.stop(worker_id, "stopped by the operator")
        return jsonify({"stopped": record.describe()})

    @app.post("/v1/workers/<worker_id>/heartbeat")
    async def worker_heartbeat(worker_id: str) -> tuple[Response, int]:
        if not hive.supervisor.heartbeat(worker_id, await read_json_body()):
            raise UnknownWorkerError(f"no worker {worker_id!r} on {config.actor}: it was stopped or never started")
        return jsonify({"ok": True}), 200

    @app.post("/v1/admin/queen")
    async def set_queen() -> Response:
        body = await read_json_body()
        url = loopback_url(body.get("url"))
        address = body.get("address", "")
        if not isinstance(address, str) or (address and loopback_url(f"http://{address}") != f"http://{address}"):
            raise RequestError("address must be the queen's own 127.0.0.1:PORT")
        hive.set_queen(url, address, rotate=body.get("rotate") is True)
        return jsonify({"queen_url": url})

    @app.post("/v1/admin/shutdown")
    async def shutdown() -> tuple[Response, int]:
        hive.stop.set()
        return jsonify({"stopping": config.actor}), 202

    return app
