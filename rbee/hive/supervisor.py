"""Spawn, watch and stop this hive's workers; keep their registry.

A worker is one child process holding one model. It is reused by every job
for the same :class:`WorkerSpec` (model, engine, asked-for context, offload); it
is marked ``dead`` the moment its process exits and ``down`` once it misses its
heartbeats, each time with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rbee.config import DEFAULT_QUEUE, WORKER_MODULE, HiveConfig, ServeOptions, WorkerConfig, to_args
from rbee.engine.backends import VARIANT_ENV
from rbee.errors import NoCapacityError, StartupError, UnknownWorkerError
from rbee.hive.devices import probe
from rbee.hive.engine_proof import EngineProof
from rbee.hive.placement import Demand, Memory, Sized
from rbee.hive.shares import Share, Shares
from rbee.link.auth import ENV, Callee, write_secret
from rbee.link.client import LinkClient
from rbee.link.engine_report import EngineReport
from rbee.link.peers import Peer, PeerRegistry, PeerState
from rbee.link.schemas import Load, WorkerReport, WorkerView, parse_wire
from rbee.link.spawn import Child, bind_loopback, spawn

log = logging.getLogger(__name__)

Narrate = Callable[..., None]
T = TypeVar("T")


@dataclass(eq=False)
class Hold:
    """Bytes admission granted to a worker or share that is starting: counted as taken until its
    record counts them, or it failed to start."""

    bytes: int


def worker_threads(cores: int, live_workers: int) -> int:
    """CPU threads for a new worker: the cores not already given to live workers, at least one.
    llama.cpp's threads spin while they wait, so two workers each using every core starve
    each other (measured: a two-worker run on 2 cores slowed several-fold)."""
    return max(1, cores // (live_workers + 1))


@dataclass(frozen=True)
class WorkerSpec:
    """What makes two jobs able to share a worker."""

    model_path: Path
    backend: str
    ctx: int | None = None  # as asked; None = the automatic choice
    gpu_layers: int = 0
    #: a split job's main worker: the unix sockets of its helpers' RPC shares (never shared)
    rpc: tuple[str, ...] = ()
    #: how a new worker batches; not part of what makes two jobs share one
    slots: int = field(default=0, compare=False)
    queue_limit: int = field(default=DEFAULT_QUEUE, compare=False)


class WorkerRecord(Peer[WorkerReport]):
    """A worker as its hive tracks it: a peer, plus its process, spec and what admission gave it."""

    def __init__(self, worker_id: str, spec: WorkerSpec, child: Child, sized: Sized, engine_reason: str = "") -> None:
        super().__init__("worker", worker_id, child.url, reason="spawned")
        self.spec = spec
        self.child = child
        self.sized = sized
        self.memory = sized.need.total  # what admission reserved for it
        self.engine_reason = engine_reason
        self.engine: dict[str, Any] = {}  # the engine's own load report
        self.last_used = time.monotonic()
        self.active_jobs = 0
        #: seconds it stays loaded once idle, as its last job asked (None: the hive's default; -1: kept)
        self.keep_alive: float | None = None

    @property
    def worker_id(self) -> str:
        return self.name

    @property
    def load(self) -> Load:
        return self.report.load if self.report is not None else Load(slots=self.spec.slots or 1)

    @property
    def slots(self) -> int:
        """Sequences it decodes together (from its reports; 1 until the first)."""
        return max(self.load.slots or self.spec.slots or 1, 1)

    @property
    def model_path(self) -> Path:
        return self.spec.model_path

    @property
    def backend(self) -> str:
        return self.spec.backend

    def view(self, now: float | None = None, keep_alive: float | None = None) -> WorkerView:
        now = time.monotonic() if now is None else now
        report = self.report
        return WorkerView(
            worker_id=self.worker_id, state=self.state.value, reason=self.reason, model_path=str(self.model_path),
            backend=self.backend, engine_reason=self.engine_reason, n_ctx=self.sized.n_ctx,
            gpu_layers=self.sized.placement.gpu_layers, placement=self.sized.placement.device,
            engine=self.engine or (report.engine if report else {}), pid=self.child.pid, url=self.url,
            heartbeat_age_s=self.heartbeat_age(now), tokens_generated=report.tokens_generated if report else 0,
            load=self.load, memory=self.memory,
            idle_s=round(now - self.last_used, 1) if not self.active_jobs else 0.0, keep_alive_s=keep_alive,
            helpers=len(self.spec.rpc),
        )

    def describe(self) -> dict[str, Any]:
        return self.view().model_dump(mode="json")


#: workers one model may have on a host when its slots are all taken
MAX_WORKERS_PER_MODEL = 2


def scale_out(kind: str, live: int) -> bool:
    """Start another worker for a model whose slots are all taken? Only on a GPU with room: on a
    CPU the cores are the limit, and a second worker would only split them with the first."""
    return kind in ("cuda", "metal") and live < MAX_WORKERS_PER_MODEL


def engine_summary(report: dict[str, Any]) -> str:
    """One line from a worker's engine report; tolerant of an older or partial report."""
    known = {field.name for field in dataclasses.fields(EngineReport)}
    try:
        summary = EngineReport(**{key: value for key, value in report.items() if key in known}).summary
    except TypeError:
        return ""
    if "dimensions" in report:  # a worker loaded for embeddings
        summary += f"; {report['dimensions']}-dimension embeddings, {report.get('pooling', '')} pooling"
    return summary


class Supervisor:
    """The hive's workers: a :class:`PeerRegistry` of :class:`WorkerRecord` plus spawning,
    admission and the idle/heartbeat watch."""

    #: what a worker process runs (``python -m``); tests put a light stand-in here (in a hive they
    #: start as a process: ``RBEE_WORKER_MODULE``)
    worker_module = WORKER_MODULE

    def __init__(self, config: HiveConfig, hive_url: str, token: str | None = None,
                 engine: EngineProof | None = None) -> None:
        self.config = config
        #: which CPU variant llama.cpp workers load, proven once per host
        self.engine = engine or EngineProof(config.models_dir)
        self.worker_module = os.environ.get("RBEE_WORKER_MODULE") or self.worker_module
        self.token = token
        self.hive_url = hive_url
        self.peers: PeerRegistry[WorkerRecord] = PeerRegistry(
            config.heartbeat_interval, self._connect, retention=config.peer_retention
        )
        self._spawning: dict[WorkerSpec, asyncio.Lock] = {}
        #: shares of split models served here, held against memory as workers are
        self.shares = Shares(config)
        #: one admission at a time, workers and shares alike: free memory is checked and what it
        #: grants is held before the next check, whichever model either is for
        self._admission = asyncio.Lock()
        self._holds: set[Hold] = set()
        self._watchers: set[asyncio.Task[None]] = set()

    def secret_path(self, worker_id: str) -> Path:
        return self.config.home / "run" / f"worker-{worker_id}.secret"

    def _connect(self, record: WorkerRecord) -> LinkClient:
        return LinkClient(record.url, record.actor, stall_timeout=self.config.stall_timeout,
                          token=record.secret or self.token, callee=Callee(record.secret) if record.secret else None)

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        return self.peers.peers

    def client(self, record: WorkerRecord) -> LinkClient:
        return self.peers.client(record)

    def find(self, spec: WorkerSpec) -> WorkerRecord | None:
        """The live worker for ``spec`` with the most room (fewest jobs per slot)."""
        records = [r for r in self.peers if r.spec == spec and r.serving]
        return min(records, key=lambda r: (r.active_jobs / r.slots, r.worker_id)) if records else None

    def live_count(self) -> int:
        return sum(1 for r in self.peers if r.live)

    @property
    def reserved(self) -> int:
        return (sum(r.memory for r in self.peers if r.live) + self.shares.reserved
                + sum(hold.bytes for hold in self._holds))

    async def admitted(self, check: Callable[[], Awaitable[tuple[T, int]]]) -> tuple[T, Hold]:
        """``check`` (what it grants and its bytes, or NoCapacityError) under the hive's one
        admission lock, its bytes held from then on; the caller discards the hold once the
        worker's or share's record counts them."""
        async with self._admission:
            granted, need = await check()
            hold = Hold(need)
            self._holds.add(hold)
        return granted, hold

    def release(self, hold: Hold) -> None:
        """``hold``'s bytes no longer counted here: its record counts them, or it did not start."""
        self._holds.discard(hold)

    async def start_share(self, model: str, need: int, room: Callable[[], int]) -> Share:
        """A share of ``need`` bytes of ``model``, admitted as a worker is (``room()``: what a new
        worker could take now)."""
        async def check() -> tuple[None, int]:
            self.shares.check(model, need, room())
            return None, need

        _, hold = await self.admitted(check)
        try:
            return await self.shares.start(model, need, counted=lambda: self.release(hold))
        finally:
            self.release(hold)

    @contextlib.asynccontextmanager
    async def lease(self, spec: WorkerSpec, narrate: Narrate, demand: Demand, reason: str = "",
                    keep_alive: float | None = None) -> AsyncIterator[WorkerRecord]:
        """A ready worker for one job, the job counted on it while the block runs; at the end,
        its last use, and the keep-alive the job asked for. The one place a worker's jobs are
        counted up and down."""
        record = await self.worker_for(spec, narrate, demand, reason)
        try:
            yield record
        finally:
            if keep_alive is not None:
                record.keep_alive = keep_alive
            record.active_jobs -= 1
            record.last_used = time.monotonic()

    async def worker_for(self, spec: WorkerSpec, narrate: Narrate, demand: Demand, reason: str = "") -> WorkerRecord:
        """A ready worker for ``spec``, with the job counted on it (``lease`` ends it): a warm one
        if there is one, else a new one.

        Admission (``demand`` sized against the memory free now: context and placement, or
        NoCapacityError) runs under the same lock as the spawn, so a second job for a model
        still loading waits for it instead of being refused for the memory the first one
        reserved. When every slot of the warm workers is taken and a GPU has room for another,
        a second worker starts."""
        async with self._spawning.setdefault(spec, asyncio.Lock()):
            record = self.find(spec)
            if record is not None and record.active_jobs >= record.slots:
                fresh = await self._scale_out(spec, record, narrate, demand, reason)
                if fresh is not None:
                    return fresh
            elif record is not None:
                narrate("reuse", f"reusing warm {record.actor} for {spec.model_path.name}")
            if record is None:
                sized, hold = await self.admitted(lambda: self.admit(spec, narrate, demand))
                return await self._spawn(spec, narrate, sized, hold, reason)
            record.active_jobs += 1
            return record

    async def _scale_out(self, spec: WorkerSpec, busy: WorkerRecord, narrate: Narrate, demand: Demand,
                         reason: str) -> WorkerRecord | None:
        """A second worker for ``spec``, or None: the job waits in ``busy``'s queue."""
        live = sum(1 for r in self.peers if r.spec == spec and r.live)

        async def check() -> tuple[Sized | None, int]:
            try:
                sized = demand.size(self.memory())
            except NoCapacityError:
                return None, 0
            return (sized, sized.need.total) if scale_out(sized.placement.kind, live) else (None, 0)

        sized, hold = await self.admitted(check)
        if sized is None:
            self.release(hold)
            narrate("reuse", f"every slot of {busy.actor} is busy: the job waits in its queue")
            return None
        narrate("scale", f"every slot of {busy.actor} is busy and {sized.placement.device} has room: starting "
                         f"worker {live + 1} for {spec.model_path.name}")
        return await self._spawn(spec, narrate, sized, hold, reason)

    async def _spawn(self, spec: WorkerSpec, narrate: Narrate, sized: Sized, hold: Hold,
                     reason: str) -> WorkerRecord:
        try:
            record = await self._start(spec, narrate, sized, reason)
        finally:
            self.release(hold)
        return await self._load(record, narrate)

    async def _start(self, spec: WorkerSpec, narrate: Narrate, sized: Sized, reason: str) -> WorkerRecord:
        worker_id = "w-" + secrets.token_hex(3)
        placement = sized.placement
        config = WorkerConfig(
            worker_id=worker_id,
            model_path=spec.model_path,
            hive_url=self.hive_url,
            backend=spec.backend,
            heartbeat_interval=self.config.heartbeat_interval,
            n_ctx=sized.n_ctx,
            threads=worker_threads(os.cpu_count() or 1, self.live_count()),
            gpu_layers=placement.gpu_layers,
            tensor_split=",".join(str(part) for part in placement.tensor_split),
            rpc=",".join(spec.rpc),
            slots=spec.slots,
            queue_limit=spec.queue_limit,
            ping_interval=self.config.ping_interval,
            resume_grace=self.config.resume_grace,
            serve=ServeOptions(),
        )
        env = {**os.environ, **placement.env()}
        if spec.backend.startswith("llama-cpp"):
            env[VARIANT_ENV] = await self.engine.variant(narrate)
        log_path = self.config.home / "logs" / f"worker-{worker_id}.log"
        secret_path = self.secret_path(worker_id)
        secret = write_secret(secret_path)  # its own: it proves itself with it, the hive calls it with it
        narrate("spawn", f"starting worker:{worker_id} ({spec.backend}) for {spec.model_path.name} on "
                         f"{placement.device}, context {sized.n_ctx} ({sized.why}), needs "
                         f"{placement.need / 1e9:.2f} GB of {placement.free / 1e9:.2f} GB free in {placement.pool}")
        child = await spawn(
            f"worker:{worker_id}", self.worker_module, to_args(config), sock=bind_loopback(), log_path=log_path,
            env={**env, ENV: str(secret_path)},
        )
        record = self.peers.add(WorkerRecord(worker_id, spec, child, sized, engine_reason=reason))
        record.secret = secret
        # the job it starts for counts from now: a heartbeat may mark it up before wait_ready
        # returns, and a load slower than the keep-alive must not make it look idle
        record.active_jobs = 1
        self._watch(record)
        return record

    async def _load(self, record: WorkerRecord, narrate: Narrate) -> WorkerRecord:
        """``record`` once its worker has loaded the model (or StartupError, the worker gone)."""
        worker_id, spec, child, secret = record.worker_id, record.spec, record.child, record.secret
        secret_path = self.secret_path(worker_id)
        started = time.monotonic()
        try:
            ready = await child.wait_ready("/ready", timeout=self.config.worker_ready_timeout, token=secret)
        except BaseException as exc:
            await child.stop(grace=1.0)
            await self.peers.remove(worker_id)
            secret_path.unlink(missing_ok=True)
            if isinstance(exc, StartupError):
                cure = self.engine.remedy(child.process.returncode)  # its exit is in the message already
                why = f"{exc.message}\n{cure}" if cure else exc.message
                raise StartupError(f"worker:{worker_id} could not load {spec.model_path}: {why}") from exc
            raise
        report = parse_wire(WorkerReport, ready, f"ready answer of worker:{worker_id}")
        record.beat(report)  # the same report its heartbeats carry: slots, engine
        record.set_state(PeerState.UP, "model loaded")
        record.engine = dict(report.engine)
        where = f" {engine_summary(record.engine)}" if record.engine else ""
        narrate("ready", f"worker:{worker_id} loaded {spec.model_path.name} in {time.monotonic() - started:.1f} s"
                         f"{where}", engine=record.engine)
        return record

    def _watch(self, record: WorkerRecord) -> None:
        async def wait_exit() -> None:
            await record.child.process.wait()
            if record.live:
                record.set_state(PeerState.DOWN, f"process {self.death(record)}")
            if not record.jobs:
                await record.close()  # its connection pool; a job still relayed closes it on its way out

        task = asyncio.get_running_loop().create_task(wait_exit())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def death(self, record: WorkerRecord) -> str:
        """How a worker's process ended, explained (a signal: what it means, the engine, the fix)."""
        return self.engine.explain_death(record.child.process.returncode)

    def heartbeat(self, worker_id: str, body: Any) -> bool:
        """A worker's heartbeat; False for a worker this hive does not know (a 404 for it).
        A malformed body raises RequestError (a 400)."""
        record = self.peers.get(worker_id)
        if record is None:
            return False
        report = parse_wire(WorkerReport, body, f"heartbeat of worker:{worker_id}")
        record.beat(report, busy=report.state == "busy", ready=report.state in ("ready", "busy"))
        return True

    def check_overdue(self, now: float | None = None) -> list[WorkerRecord]:
        """Workers that missed their heartbeats: marked down, their jobs ended, they are killed
        (a hung worker holds memory and slots); returns those newly marked."""
        newly = self.peers.check(now)
        for record in newly:
            with contextlib.suppress(ProcessLookupError):
                record.child.process.kill()
        return newly

    def keep_alive(self, record: WorkerRecord) -> float:
        return self.config.worker_idle_timeout if record.keep_alive is None else record.keep_alive

    def idle(self, now: float | None = None) -> list[WorkerRecord]:
        """Workers idle past their keep-alive (0: as soon as their job ended; -1: never)."""
        now = time.monotonic() if now is None else now
        return [
            r for r in self.peers
            if r.state == PeerState.UP and not r.active_jobs and 0 <= self.keep_alive(r) < now - r.last_used
        ]

    def least_recently_used(self, spec: WorkerSpec) -> WorkerRecord | None:
        """The idle worker to unload when a new one needs its memory: not one of ``spec``, not
        one kept with keep_alive -1, the longest unused first."""
        idle = [r for r in self.peers if r.state == PeerState.UP and not r.active_jobs and r.spec != spec
                and self.keep_alive(r) >= 0]
        return min(idle, key=lambda r: r.last_used) if idle else None

    def memory(self) -> Memory:
        """What a new worker may take now: the host probed afresh, capped by the memory budget,
        less what live workers hold."""
        return Memory.from_probe(probe(), self.config.memory_budget, self.reserved)

    async def admit(self, spec: WorkerSpec, narrate: Narrate, demand: Demand) -> tuple[Sized, int]:
        """Room for a new worker of ``spec`` (and its bytes): when memory is short, idle workers
        are unloaded, least recently used first, until it fits; with none left, NoCapacityError."""
        while True:
            try:
                sized = demand.size(self.memory())
                return sized, sized.need.total
            except NoCapacityError:
                victim = self.least_recently_used(spec)
                if victim is None:
                    raise
                unused = time.monotonic() - victim.last_used
                narrate("unload", f"memory is short for {spec.model_path.name}: unloading {victim.actor} "
                                  f"({victim.model_path.name}, idle for {unused:.0f} s, the least recently used)")
                await self.stop(victim.worker_id, f"unloaded to make room for {spec.model_path.name}")

    async def watch_heartbeats(self) -> None:
        """Mark silent workers down; stop workers idle past their keep-alive; drop long-gone ones."""
        while True:
            self.check_overdue()
            for record in self.idle():
                limit = self.keep_alive(record)
                log.info("stopping %s: idle for %.0f s", record.actor, time.monotonic() - record.last_used)
                await self.stop(record.worker_id, "keep_alive 0: unloaded after its job" if limit == 0
                                else f"idle for more than {limit:.0f} s")
            for record in await self.peers.prune():
                record.child.log_path.unlink(missing_ok=True)  # kept while the worker was listed, for post-mortems
                self.secret_path(record.worker_id).unlink(missing_ok=True)
            await asyncio.sleep(min(self.config.heartbeat_interval / 2, 1.0))

    async def stop(self, worker_id: str, reason: str) -> WorkerRecord:
        record = self.peers.get(worker_id)
        if record is None:
            known = ", ".join(self.workers) or "none"
            raise UnknownWorkerError(f"no worker {worker_id!r} on {self.config.actor} (workers: {known})")
        record.set_state(PeerState.STOPPING, reason)
        await record.child.stop(grace=5.0)
        record.set_state(PeerState.STOPPED, reason)
        await record.close()
        return record

    async def stop_all(self, reason: str = "hive shutting down") -> None:
        await asyncio.gather(*(self.stop(w, reason) for w in list(self.workers)), self.shares.stop_all(reason))
        for worker_id in self.workers:
            self.secret_path(worker_id).unlink(missing_ok=True)
        for task in list(self._watchers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.peers.close()

    def views(self) -> list[WorkerView]:
        now = time.monotonic()
        return [record.view(now, self.keep_alive(record)) for record in self.peers]

    def describe(self) -> list[dict[str, Any]]:
        return [view.model_dump(mode="json") for view in self.views()]
