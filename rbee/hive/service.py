"""The hive as one object: config, worker supervisor, model catalog, job registry and
the link to the queen, wired together; and how a job runs here (engine choice,
provisioning, admission, relaying to a worker). Routes live in ``app.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rbee import __version__
from rbee.config import DEFAULT_MODEL, DEFAULT_QUEUE, EMBED_MAX_CTX, HiveConfig
from rbee.errors import (
    BadModelError,
    LinkError,
    ModelNotFoundError,
    RequestError,
    StallError,
    WorkerDiedError,
    WorkerStalledError,
)
from rbee.hive import rpc_cache
from rbee.hive.devices import free_memory, probe
from rbee.hive.engine import Choice, choose_engine, gpu_offload_supported, installed_engines
from rbee.hive.engine import Host as EngineHost
from rbee.hive.gguf_meta import read_header
from rbee.hive.models import ModelCatalog, ModelEntry
from rbee.hive.placement import Demand
from rbee.hive.provision import Progress
from rbee.hive.supervisor import Supervisor, WorkerRecord, WorkerSpec
from rbee.link import events
from rbee.link.auth import Callee, accepted, load_token
from rbee.link.client import LinkClient
from rbee.link.jobs import Job, JobRegistry
from rbee.link.metrics import Metrics
from rbee.link.peers import PeerState
from rbee.link.relay import relay
from rbee.link.schemas import CatalogModel, HiveReport, JobRequest, SharePart, ShareRequest, ShareView, SplitMain

log = logging.getLogger(__name__)


class Hive:
    """The hive's state, shared by its routes and its background tasks."""

    def __init__(
        self, config: HiveConfig, supervisor: Supervisor, catalog: ModelCatalog, token: str | None = None
    ) -> None:
        self.config = config
        self.token = token
        #: the secrets this hive accepts: its own, and on the queen's machine the owner's
        self.keys: list[str] = accepted(token) if token else []
        #: the queen's own host:port behind the forward its heartbeats go through
        self.queen_address = ""
        self.supervisor = supervisor
        self.catalog = catalog
        #: the host as the last heartbeat probed it (when), for jobs: a job does not query NVML
        self._probed: tuple[float, dict[str, Any]] | None = None
        self.metrics = Metrics(config.actor)
        self.registry = JobRegistry(config.actor, ping=config.ping_interval, resume_grace=config.resume_grace,
                                    on_finish=self.metrics.job_finished)
        self.stall_timeout = config.stall_timeout
        self.stop = asyncio.Event()
        self.queen: LinkClient | None = None
        self._closing: set[asyncio.Task[None]] = set()
        if config.queen_url:
            self.set_queen(config.queen_url)

    def set_queen(self, url: str, address: str = "", rotate: bool = False) -> None:
        """Where heartbeats go; the queen re-sends it after it re-opened an SSH forward, with
        its own ``address`` behind the forward (the queen proves itself bound to it on every
        new connection before a beat carries this hive's secret). ``rotate``: the queen has
        just replaced this hive's secret file over SFTP; read it now. The client it replaces
        is closed (its connections went with the old forward)."""
        if rotate:
            self.token = load_token(home=self.config.home)
            self.keys = accepted(self.token)
        if rotate or self.queen is None or self.queen.base_url != url.rstrip("/") or address != self.queen_address:
            self.queen_address = address
            callee = Callee(self.token, address, peer=self.config.name) if self.token else None
            old, self.queen = self.queen, LinkClient(url, "queen", stall_timeout=10.0, token=self.token, callee=callee)
            self._close_later(old)

    def queen_lost(self, reason: str) -> None:
        """Heartbeats through an SSH forward kept failing: the forward is gone, and its port may
        be taken by anyone on this host. Stop beating until the queen re-attaches (which tells
        the new address and rotates the secret). A queen on this machine is beaten on: its
        port is proven on every connection."""
        if self.queen_address and self.queen is not None:
            log.warning("%s: %s; no more heartbeats until the queen re-attaches", self.config.actor, reason)
            old, self.queen = self.queen, None
            self._close_later(old)

    def _close_later(self, client: LinkClient | None) -> None:
        if client is not None:
            task = asyncio.get_running_loop().create_task(client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def worker_link(self, worker: WorkerRecord) -> Callable[[], LinkClient]:
        """The client for a job's worker, asked again when its stream must be resumed: a worker
        whose process exited is not waited for."""

        def client() -> LinkClient:
            if not worker.child.alive:
                raise WorkerDiedError(
                    f"{worker.actor} on {self.config.actor} died during the job (process "
                    f"{self.supervisor.death(worker)})", actor=worker.actor,
                )
            return self.supervisor.client(worker)

        return client

    def status(self) -> HiveReport:
        """This hive now: its heartbeat body and /v1/status answer."""
        devices = probe()
        self._probed = (time.monotonic(), devices)
        return HiveReport(
            name=self.config.name, version=__version__, pid=os.getpid(),
            workers=self.supervisor.views(), devices=devices,
            free_memory=free_memory(devices, self.config.memory_budget, self.supervisor.reserved)[0],
            engine=self.supervisor.engine.line,
            models=[CatalogModel.model_validate(e.describe()) for e in self.catalog.entries()],
            shares=self.supervisor.shares.views(),
        )

    async def start_share(self, asked: ShareRequest) -> ShareView:
        """A share for a split job's main worker elsewhere; with ``layers``, its RPC cache holds
        that part of this host's copy of the model first (the split's pull filled it: this only
        checks, unless the file changed since)."""
        cache = ""
        if asked.layers is not None:
            cache = await self.fill_share_cache(asked.ref or asked.model, SharePart(layers=asked.layers,
                                                                                   output=asked.output))
        share = await self.supervisor.start_share(
            asked.model, asked.bytes,
            lambda: free_memory(probe(), self.config.memory_budget, self.supervisor.reserved)[0])
        share.cache = cache
        return share.view()

    async def fill_share_cache(self, ref: str, part: SharePart, job: Job | None = None) -> str:
        """What the share will read from this host's own copy of ``ref`` (rbee.hive.rpc_cache), in
        words; with ``job``, the fill's progress is narrated there. A host without the model, or
        without room for the cache, still serves the share: its weights then cross the link, and
        the words say why."""
        entry = await asyncio.to_thread(self.catalog.find, ref, "gguf")
        if entry is None or entry.format != "gguf":
            return f"{self.config.actor} has no GGUF of {ref} in its catalog: its weights cross the link"
        first, count = part.layers
        # a line every 2 s, not a bar: the keeper draws bars for downloads only
        progress = None if job is None else Progress(
            self.narrator(job), f"filling the RPC cache for layers {first}–{first + count - 1}"
            + (" and the output" if part.output else "") + f" from {entry.name}", interval=2.0, action="cache")
        try:
            primed = await asyncio.to_thread(rpc_cache.prime, entry.path, self.supervisor.shares.cache, first, count,
                                             part.output, progress)
        except (OSError, BadModelError) as exc:
            log.warning("could not fill the RPC cache from %s: %s", entry.path, exc)
            return (f"{self.config.actor} could not fill its RPC cache from {entry.path} ({exc}): its weights cross "
                    "the link")
        log.info("RPC cache for %s: %s in %.1f s", ref, primed.describe(), primed.seconds)
        return primed.describe()

    def narrator(self, job: Job) -> Any:
        """A narrate function that may be called from a worker thread (downloads run on one)."""
        loop = asyncio.get_running_loop()

        def narrate(action: str, message: str, **extra: Any) -> None:
            loop.call_soon_threadsafe(lambda: job.narrate(action, message, **extra))

        return narrate

    async def provision(self, job: Job, ref: str | None, form: str | None = None) -> ModelEntry:
        return await asyncio.to_thread(self.catalog.resolve, ref, self.narrator(job), form)

    def devices(self) -> dict[str, Any]:
        """The host's devices as the last heartbeat saw them, probed again only when that is older
        than two beats. Admission probes afresh (free memory must be now's)."""
        if self._probed is None or time.monotonic() - self._probed[0] > 2 * self.config.heartbeat_interval:
            self._probed = (time.monotonic(), probe())
        return self._probed[1]

    async def host(self) -> EngineHost:
        devices = self.devices()
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

    def demand(self, entry: ModelEntry, engine: str, host: EngineHost, request: JobRequest, gpu_layers: int) -> Demand:
        """What a new worker for this job would need; the supervisor sizes it if it must spawn one."""
        return Demand(weights=entry.size, kv_per_token=entry.info.kv_cache_bytes(1), layers=entry.info.layers,
                      trained_ctx=entry.info.context_length, requested_ctx=request.ctx, engine=engine,
                      gpu_layers=gpu_layers, offload=host.offload if engine == "llama-cpp" else True,
                      allow_split=bool(request.gpu_split), name=f"{entry.name} on {self.config.actor}")

    def split_main(self, job: Job, spec: WorkerSpec, demand: Demand, split: SplitMain) -> tuple[WorkerSpec, Demand]:
        """The main worker of a split job: its helpers' RPC shares behind the sockets the queen
        made under this hive's run folder (no other path is dialed), llama.cpp's layer count and
        split for them, and the bytes it holds here."""
        if spec.backend != "llama-cpp":
            raise RequestError(f"a split runs on llama.cpp with a GGUF model; {spec.model_path.name} is served by "
                               f"{spec.backend} on {self.config.actor}")
        allowed = (self.config.home / "run" / "splits").resolve()
        for path in split.sockets:
            if not Path(path).resolve().is_relative_to(allowed):
                raise RequestError(f"a split's sockets live under {allowed}; {path} is not there")
        job.narrate("split", f"main worker on {self.config.actor}: {split.gpu_layers} layers (the output counted) "
                             f"on {', '.join(split.helpers) or 'the helpers'} over RPC")
        spec = dataclasses.replace(spec, gpu_layers=split.gpu_layers, rpc=tuple(split.sockets))
        demand = dataclasses.replace(demand, gpu_layers=split.gpu_layers, split_bytes=split.bytes,
                                     split_layers=split.gpu_layers, rpc_split=tuple(split.tensor_split))
        return spec, demand

    async def run_job(self, job: Job, request: JobRequest) -> None:
        entry, choice, host = await self.choose(job, request)
        backend = choice.engine
        if request.input is not None:
            if backend != "llama-cpp":
                raise RequestError(f"embeddings run on llama.cpp with a GGUF model; {entry.name} is served by "
                                   f"{backend} here. Name a GGUF model (or its logical model's gguf form)")
            backend = "llama-cpp-embed"
            # its context is one input's room, so admission reserves that, not the trained length
            trained = entry.info.context_length or EMBED_MAX_CTX
            request = request.model_copy(update={"ctx": min(request.ctx or trained, EMBED_MAX_CTX)})
        body = request.for_tier("worker")
        if request.gpu_layers is not None:
            gpu_layers = request.gpu_layers
        else:
            gpu_layers = -1 if host.offload or backend == "mlx" else 0
        spec = WorkerSpec(entry.path, backend, request.ctx, gpu_layers, slots=request.parallel or 0,
                          queue_limit=DEFAULT_QUEUE if request.queue is None else request.queue)
        demand = self.demand(entry, choice.engine, host, request, gpu_layers)
        if request.split is not None:
            spec, demand = self.split_main(job, spec, demand, request.split)
        async with self.supervisor.lease(spec, job.narrate, demand, choice.reason, request.keep_alive) as worker:
            if request.load_only:
                job.narrate("load", f"{entry.name} is loaded on {worker.actor}")
                job.emit(events.end(0, 0.0, "load", prompt_tokens=0, prompt_ms=0.0))
                return
            try:
                with self.supervisor.peers.relaying(worker, job):
                    await relay(job, self.worker_link(worker), body)
            except LinkError as exc:
                raise await self._explain_worker_failure(worker, exc) from exc

    async def _explain_worker_failure(self, worker: WorkerRecord, exc: LinkError) -> LinkError:
        """A broken worker stream usually means the worker died: say so, with its exit.
        A stalled one (hung, stopped) is killed, so the next job gets a fresh worker."""
        if isinstance(exc, WorkerDiedError):
            worker.set_state(PeerState.DOWN, f"process {self.supervisor.death(worker)}")
            return exc
        if isinstance(exc, StallError):
            worker.set_state(PeerState.DOWN, f"stalled: nothing for {self.stall_timeout:g} s; killed")
            worker.child.process.kill()
            return WorkerStalledError(
                f"{worker.actor} on {self.config.actor} stalled (nothing for {self.stall_timeout:g} s) and was "
                "killed; the next job starts a fresh worker", actor=worker.actor,
            )
        try:
            await asyncio.wait_for(worker.child.process.wait(), 1.0)
        except TimeoutError:
            return exc
        worker.set_state(PeerState.DOWN, f"process {self.supervisor.death(worker)}")
        return WorkerDiedError(
            f"{worker.actor} on {self.config.actor} died during the job ({worker.reason})", actor=worker.actor
        )

    async def pull(self, job: Job, ref: str, share: SharePart | None = None) -> None:
        """``ref`` into the catalog; with ``share``, then that part of it into the RPC cache."""
        started = time.monotonic()
        entry = await self.provision(job, ref)
        job.narrate("report", f"{entry.name} is in the catalog", model=entry.describe())
        if share is not None:  # what the share will read there is said when it starts (start_share)
            await self.fill_share_cache(ref, share, job)
        job.emit(events.end(0, time.monotonic() - started, "done"))

    async def show(self, model: str | None, forms: dict[str, str] | None) -> dict[str, Any]:
        """What the catalog's file for ``model`` says of itself (a client's "show"), without
        provisioning it: a GGUF's header scalars and chat template; a 404 when it is not here yet."""
        form = "gguf" if forms and "gguf" in forms else ("mlx" if forms else None)
        ref = forms[form] if forms and form else model
        entry = await asyncio.to_thread(self.catalog.find, ref, form)
        if entry is None:
            raise ModelNotFoundError(f"{ref or DEFAULT_MODEL} is not in the catalog of {self.config.actor} yet; "
                                     "pull it (`rbee models pull`) or run it once")
        header: dict[str, Any] = {}
        if entry.format == "gguf":
            read = await asyncio.to_thread(read_header, entry.path)
            header = {**read.fields, "general.parameter_count": read.parameters}
        return {"model": entry.describe(), "header": header}

    async def remove_model(self, name: str) -> dict[str, Any]:
        entry = self.catalog.get(name)
        if entry is not None:
            for record in list(self.supervisor.workers.values()):
                if record.model_path == entry.path and record.live:
                    await self.supervisor.stop(record.worker_id, f"its model {name} was removed")
        removed = self.catalog.remove(name).describe()
        files, size = await asyncio.to_thread(rpc_cache.prune, self.supervisor.shares.cache)
        if files:
            log.info("RPC cache: %d file(s) (%.0f MB) of removed models pruned", files, size / 1e6)
        return removed

    async def close(self) -> None:
        await self.registry.close()
        await self.supervisor.stop_all()
        if self.queen is not None:
            await self.queen.aclose()
        await asyncio.gather(*self._closing, return_exceptions=True)
