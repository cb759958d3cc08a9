"""The hive's HTTP face: job link (relayed to a worker), model catalog, workers,
worker heartbeats, status, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from quart import Quart, Response, jsonify

from rbee import __version__
from rbee.config import DEFAULT_QUEUE, HiveConfig
from rbee.errors import LinkError, PeerError, RequestError
from rbee.hive.devices import free_memory, probe
from rbee.hive.engine import Choice, choose_engine, gpu_offload_supported, installed_engines
from rbee.hive.engine import Host as EngineHost
from rbee.hive.models import ModelCatalog, ModelEntry
from rbee.hive.placement import Memory, Sized, size_worker
from rbee.hive.supervisor import Supervisor, WorkerRecord, WorkerSpec
from rbee.link import events
from rbee.link.auth import install_auth
from rbee.link.client import LinkClient, StallError
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.link.metrics import Metrics
from rbee.link.relay import relay
from rbee.link.schemas import JobRequest
from rbee.link.server import add_job_routes, install_error_handlers, read_json_body, request_producer


class Hive:
    """The hive's state, shared by its routes and its background tasks."""

    def __init__(
        self, config: HiveConfig, supervisor: Supervisor, catalog: ModelCatalog, token: str | None = None
    ) -> None:
        self.config = config
        self.token = token
        self.supervisor = supervisor
        self.catalog = catalog
        self.metrics = Metrics(config.actor)
        self.registry = JobRegistry(config.actor, ping=config.ping_interval, on_finish=self.metrics.job_finished)
        self.stall_timeout = config.stall_timeout
        self.clients: dict[str, LinkClient] = {}
        self.stop = asyncio.Event()
        self.queen: LinkClient | None = None
        if config.queen_url:
            self.set_queen(config.queen_url)

    def set_queen(self, url: str) -> None:
        """Where heartbeats go; the queen re-sends it after it re-opened an SSH forward."""
        if self.queen is None or self.queen.base_url != url.rstrip("/"):
            self.queen = LinkClient(url, "queen", stall_timeout=10.0, token=self.token)

    def client_for(self, worker: WorkerRecord) -> LinkClient:
        client = self.clients.get(worker.worker_id)
        if client is None:
            client = self.clients[worker.worker_id] = LinkClient(
                worker.url, worker.actor, stall_timeout=self.stall_timeout, token=self.token
            )
        return client

    def status(self) -> dict[str, Any]:
        devices = probe()
        return {
            "name": self.config.name,
            "version": __version__,
            "workers": self.supervisor.describe(),
            "devices": devices,
            # what admission would grant a new worker now, so the queen's scheduler uses the same rule
            "free_memory": free_memory(devices, self.config.memory_budget, self.supervisor.reserved)[0],
            "models": [{"name": e.name, "ref": e.ref, "size": e.size, "path": str(e.path)}
                       for e in self.catalog.entries()],
        }

    def narrator(self, job: Job) -> Any:
        """A narrate function that may be called from a worker thread (downloads run on one)."""
        loop = asyncio.get_running_loop()

        def narrate(action: str, message: str, **extra: Any) -> None:
            loop.call_soon_threadsafe(lambda: job.narrate(action, message, **extra))

        return narrate

    async def provision(self, job: Job, ref: str | None, form: str | None = None) -> ModelEntry:
        return await asyncio.to_thread(self.catalog.resolve, ref, self.narrator(job), form)

    async def host(self) -> EngineHost:
        devices = probe()
        nvidia = any(g.get("kind") == "cuda" for g in devices["gpus"])
        offload = await asyncio.to_thread(gpu_offload_supported)  # cached after the first call
        return EngineHost(devices["os"], devices["arch"], installed_engines(), nvidia, offload)

    async def choose(self, job: Job, request: JobRequest) -> tuple[ModelEntry, Choice, EngineHost]:
        """The engine for this host and the model form it needs, then that form on disk."""
        requested = request.backend or self.config.backend
        host = await self.host()
        if request.forms:
            choice = choose_engine(host, set(request.forms), requested)
            entry = await self.provision(job, request.forms[choice.format], choice.format)  # type: ignore[index]
        else:
            entry = await self.provision(job, request.model)
            choice = choose_engine(host, {entry.format}, requested)
        job.narrate("engine", f"{choice.engine}: {choice.reason}")
        return entry, choice, host

    def sizer(self, entry: ModelEntry, engine: str, host: EngineHost, request: JobRequest,
              gpu_layers: int) -> Callable[[], Sized]:
        """Admission for a new worker, run when (and only when) one must be spawned."""

        def size() -> Sized:
            memory = Memory.from_probe(probe(), self.config.memory_budget, self.supervisor.reserved)
            return size_worker(
                memory, weights=entry.size, kv_per_token=entry.info.kv_cache_bytes(1), layers=entry.info.layers,
                trained_ctx=entry.info.context_length, requested_ctx=request.ctx, engine=engine,
                gpu_layers=gpu_layers, offload=host.offload if engine == "llama-cpp" else True,
                allow_split=bool(request.gpu_split), name=f"{entry.name} on {self.config.actor}",
            )

        return size

    async def run_job(self, job: Job, request: JobRequest) -> None:
        entry, choice, host = await self.choose(job, request)
        backend = choice.engine
        body = request.downstream(model=None, node=None, backend=None, forms=None, ctx=None, gpu_layers=None,
                                  gpu_split=None, parallel=None, queue=None)
        if request.gpu_layers is not None:
            gpu_layers = request.gpu_layers
        else:
            gpu_layers = -1 if host.offload or backend == "mlx" else 0
        spec = WorkerSpec(entry.path, backend, request.ctx, gpu_layers, slots=request.parallel or 0,
                          queue_limit=DEFAULT_QUEUE if request.queue is None else request.queue)
        worker = await self.supervisor.worker_for(
            spec, job.narrate, self.sizer(entry, backend, host, request, gpu_layers), choice.reason
        )
        try:
            await relay(job, self.client_for(worker), body)
        except LinkError as exc:
            raise await self._explain_worker_failure(worker, exc) from exc
        finally:
            worker.active_jobs -= 1
            worker.last_used = time.monotonic()

    async def _explain_worker_failure(self, worker: WorkerRecord, exc: LinkError) -> LinkError:
        """A broken worker stream usually means the worker died: say so, with its exit.
        A stalled one (hung, stopped) is killed, so the next job gets a fresh worker."""
        if isinstance(exc, StallError):
            worker.mark("down", f"stalled: nothing for {self.stall_timeout:g} s; killed")
            worker.child.process.kill()
            return PeerError(
                f"{worker.actor} on {self.config.actor} stalled (nothing for {self.stall_timeout:g} s) and was "
                "killed; the next job starts a fresh worker", code="worker_stalled", actor=worker.actor,
            )
        try:
            await asyncio.wait_for(worker.child.process.wait(), 1.0)
        except TimeoutError:
            return exc
        worker.mark("dead", f"process {worker.child.exit_reason()}")
        return PeerError(
            f"{worker.actor} on {self.config.actor} died during the job ({worker.reason})",
            code="worker_died",
            actor=worker.actor,
        )

    async def pull(self, job: Job, ref: str) -> None:
        started = time.monotonic()
        entry = await self.provision(job, ref)
        job.narrate("report", f"{entry.name} is in the catalog", model=entry.describe())
        job.emit(events.end(0, time.monotonic() - started, "done"))

    async def remove_model(self, name: str) -> dict[str, Any]:
        entry = self.catalog.get(name)
        if entry is not None:
            for record in list(self.supervisor.workers.values()):
                if record.model_path == entry.path and record.state in ("ready", "busy", "starting"):
                    await self.supervisor.stop(record.worker_id, f"its model {name} was removed")
        return self.catalog.remove(name).describe()

    async def close(self) -> None:
        await self.registry.close()
        await self.supervisor.stop_all()
        for client in self.clients.values():
            await client.aclose()
        if self.queen is not None:
            await self.queen.aclose()


def create_app(hive: Hive) -> Quart:
    app = Quart(__name__)
    config = hive.config
    install_error_handlers(app, config.actor)
    install_auth(app, hive.token)

    def make_pull(body: dict[str, Any]) -> Producer:
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            raise RequestError('pull needs {"ref": "hf:org/repo[:file.gguf]" | "gemma3-270m"}')

        async def produce(job: Job) -> None:
            await hive.pull(job, ref)

        return produce

    add_job_routes(app, hive.registry, request_producer(hive.run_job))
    hive.metrics.mount(
        app, lambda: [("worker", w["worker_id"], w["state"], w["heartbeat_age_s"]) for w in hive.supervisor.describe()]
    )
    add_job_routes(app, hive.registry, make_pull, prefix="/v1/catalog/jobs")

    @app.get("/health")
    async def health() -> Response:
        return jsonify({"name": config.name, "version": __version__, "workers": len(hive.supervisor.workers)})

    @app.get("/v1/status")
    async def status() -> Response:
        return jsonify(hive.status())

    @app.get("/v1/catalog")
    async def catalog() -> Response:
        return jsonify({"models": [entry.describe() for entry in hive.catalog.entries()]})

    @app.delete("/v1/catalog/<name>")
    async def remove_model(name: str) -> Response:
        return jsonify({"removed": await hive.remove_model(name)})

    @app.get("/v1/workers")
    async def workers() -> Response:
        return jsonify({"workers": hive.supervisor.describe()})

    @app.post("/v1/workers/<worker_id>/stop")
    async def stop_worker(worker_id: str) -> Response:
        record = await hive.supervisor.stop(worker_id, "stopped by the operator")
        return jsonify({"stopped": record.describe()})

    @app.post("/v1/workers/<worker_id>/heartbeat")
    async def worker_heartbeat(worker_id: str) -> tuple[Response, int]:
        known = hive.supervisor.heartbeat(worker_id, await read_json_body())
        if not known:
            return jsonify({"error": {"code": "unknown_worker", "message": f"no worker {worker_id} here"}}), 404
        return jsonify({"ok": True}), 200

    @app.post("/v1/admin/queen")
    async def set_queen() -> Response:
        body = await read_json_body()
        url = body.get("url")
        if not isinstance(url, str) or not url.startswith("http://127.0.0.1:"):
            raise RequestError('body must be {"url": "http://127.0.0.1:PORT"}: a queen reached over loopback')
        hive.set_queen(url)
        return jsonify({"queen_url": url})

    @app.post("/v1/admin/shutdown")
    async def shutdown() -> tuple[Response, int]:
        hive.stop.set()
        return jsonify({"stopping": config.actor}), 202

    return app
