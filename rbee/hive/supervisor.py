"""Spawn, watch and stop this hive's workers; keep their registry.

A worker is one child process holding one model. It is reused by every job
for the same :class:`WorkerSpec` (model, engine, asked-for context, offload); it
is marked ``dead`` the moment its process exits and ``down`` once it misses its
heartbeats, each time with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee.config import DEFAULT_QUEUE, HiveConfig, ServeOptions, WorkerConfig, to_args
from rbee.errors import ModelNotFoundError, StartupError
from rbee.hive.placement import NoCapacityError, Sized
from rbee.link.heartbeat import is_overdue
from rbee.link.spawn import Child, bind_loopback, spawn
from rbee.worker.backends.engine_report import EngineReport

log = logging.getLogger(__name__)

Narrate = Callable[..., None]


def worker_threads(cores: int, live_workers: int) -> int:
    """CPU threads for a new worker: the cores not already given to live workers, at least one.
    llama.cpp's threads spin while they wait, so two workers each using every core starve
    each other (measured: a two-worker run on 2 cores slowed several-fold)."""
    return max(1, cores // (live_workers + 1))


LIVE_STATES = frozenset({"starting", "ready", "busy"})


@dataclass(frozen=True)
class WorkerSpec:
    """What makes two jobs able to share a worker."""

    model_path: Path
    backend: str
    ctx: int | None = None  # as asked; None = the automatic choice
    gpu_layers: int = 0
    #: how a new worker batches; not part of what makes two jobs share one
    slots: int = field(default=0, compare=False)
    queue_limit: int = field(default=DEFAULT_QUEUE, compare=False)


@dataclass
class WorkerRecord:
    worker_id: str
    spec: WorkerSpec
    child: Child
    sized: Sized
    state: str = "starting"
    reason: str = "spawned"
    last_heartbeat: float = field(default_factory=time.monotonic)
    report: dict[str, Any] = field(default_factory=dict)
    memory: int = 0  # what admission reserved for it
    last_used: float = field(default_factory=time.monotonic)
    active_jobs: int = 0
    engine_reason: str = ""
    engine: dict[str, Any] = field(default_factory=dict)  # the engine's own load report

    @property
    def slots(self) -> int:
        """Sequences it decodes together (from its heartbeats; 1 until the first)."""
        return max(int((self.report.get("load") or {}).get("slots", 0)) or self.spec.slots or 1, 1)

    @property
    def model_path(self) -> Path:
        return self.spec.model_path

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def url(self) -> str:
        return self.child.url

    @property
    def actor(self) -> str:
        return f"worker:{self.worker_id}"

    def mark(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason

    def describe(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "state": self.state,
            "reason": self.reason,
            "model_path": str(self.model_path),
            "backend": self.backend,
            "engine_reason": self.engine_reason,
            "n_ctx": self.sized.n_ctx,
            "gpu_layers": self.sized.placement.gpu_layers,
            "placement": self.sized.placement.device,
            "engine": self.engine or self.report.get("engine") or {},
            "pid": self.child.pid,
            "url": self.url,
            "heartbeat_age_s": round(time.monotonic() - self.last_heartbeat, 2),
            "tokens_generated": self.report.get("tokens_generated", 0),
            "load": self.report.get("load", {}),
            "memory": self.memory,
            "idle_s": round(time.monotonic() - self.last_used, 1) if not self.active_jobs else 0.0,
        }


#: workers one model may have on a host when its slots are all taken
MAX_WORKERS_PER_MODEL = 2


def scale_out(kind: str, live: int) -> bool:
    """Start another worker for a model whose slots are all taken? Only on a GPU with room: on a
    CPU the cores are the limit, and a second worker would only split them with the first."""
    return kind in ("cuda", "metal") and live < MAX_WORKERS_PER_MODEL


def engine_summary(report: dict[str, Any]) -> str:
    """One line from a worker's engine report; tolerant of an older or partial report."""
    try:
        return EngineReport(**report).summary
    except TypeError:
        return ""


class Supervisor:
    def __init__(self, config: HiveConfig, hive_url: str, token: str | None = None) -> None:
        self.config = config
        self.token = token
        self.hive_url = hive_url
        self.workers: dict[str, WorkerRecord] = {}
        self._spawning: dict[WorkerSpec, asyncio.Lock] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def find(self, spec: WorkerSpec) -> WorkerRecord | None:
        """The live worker for ``spec`` with the most room (fewest jobs per slot)."""
        records = [r for r in self.workers.values() if r.spec == spec and r.state in ("ready", "busy")]
        return min(records, key=lambda r: (r.active_jobs / r.slots, r.worker_id)) if records else None

    def live_count(self) -> int:
        return sum(1 for r in self.workers.values() if r.state in LIVE_STATES)

    @property
    def reserved(self) -> int:
        return sum(r.memory for r in self.workers.values() if r.state in LIVE_STATES)

    async def worker_for(
        self, spec: WorkerSpec, narrate: Narrate, size: Callable[[], Sized], reason: str = ""
    ) -> WorkerRecord:
        """A ready worker for ``spec``, with the job counted on it (the caller ends it with
        ``record.active_jobs -= 1``): a warm one if there is one, else a new one.

        Admission (``size``: context and placement, or NoCapacityError) runs under the same
        lock as the spawn, so a second job for a model still loading waits for it instead
        of being refused for the memory the first one reserved. When every slot of the warm
        workers is taken and a GPU has room for another, a second worker starts."""
        async with self._spawning.setdefault(spec, asyncio.Lock()):
            record = self.find(spec)
            if record is not None and record.active_jobs >= record.slots:
                record = await self._scale_out(spec, record, narrate, size, reason)
            elif record is not None:
                narrate("reuse", f"reusing warm {record.actor} for {spec.model_path.name}")
            if record is None:
                record = await self._spawn(spec, narrate, size(), reason)
            record.active_jobs += 1
            return record

    async def _scale_out(self, spec: WorkerSpec, busy: WorkerRecord, narrate: Narrate, size: Callable[[], Sized],
                         reason: str) -> WorkerRecord:
        live = sum(1 for r in self.workers.values() if r.spec == spec and r.state in LIVE_STATES)
        try:
            sized = size()
        except NoCapacityError:
            sized = None
        if sized is None or not scale_out(sized.placement.kind, live):
            narrate("reuse", f"every slot of {busy.actor} is busy: the job waits in its queue")
            return busy
        narrate("scale", f"every slot of {busy.actor} is busy and {sized.placement.device} has room: starting "
                         f"worker {live + 1} for {spec.model_path.name}")
        return await self._spawn(spec, narrate, sized, reason)

    async def _spawn(self, spec: WorkerSpec, narrate: Narrate, sized: Sized, reason: str) -> WorkerRecord:
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
            slots=spec.slots,
            queue_limit=spec.queue_limit,
            ping_interval=self.config.ping_interval,
            serve=ServeOptions(),
        )
        log_path = self.config.home / "logs" / f"worker-{worker_id}.log"
        narrate("spawn", f"starting worker:{worker_id} ({spec.backend}) for {spec.model_path.name} on "
                         f"{placement.device}, context {sized.n_ctx} ({sized.why}), needs "
                         f"{placement.need / 1e9:.2f} GB of {placement.free / 1e9:.2f} GB free in {placement.pool}")
        child = await spawn(
            f"worker:{worker_id}", "rbee.worker", to_args(config), sock=bind_loopback(), log_path=log_path,
            env={**os.environ, **placement.env()},
        )
        record = WorkerRecord(worker_id, spec, child, sized, memory=sized.need.total, engine_reason=reason)
        self.workers[worker_id] = record
        self._watch(record)
        started = time.monotonic()
        try:
            ready = await child.wait_ready("/ready", timeout=self.config.worker_ready_timeout, token=self.token)
        except StartupError as exc:
            record.mark("dead", "failed to start")
            await child.stop(grace=1.0)
            self.workers.pop(worker_id, None)
            raise StartupError(f"worker:{worker_id} could not load {spec.model_path}: {exc.message}") from exc
        except BaseException:
            await child.stop(grace=1.0)
            self.workers.pop(worker_id, None)
            raise
        record.mark("ready", "model loaded")
        record.last_heartbeat = time.monotonic()
        record.report = dict(ready or {})  # the same info() its heartbeats carry: slots, engine
        record.engine = dict(record.report.get("engine") or {})
        where = f" {engine_summary(record.engine)}" if record.engine else ""
        narrate("ready", f"worker:{worker_id} loaded {spec.model_path.name} in {time.monotonic() - started:.1f} s"
                         f"{where}", engine=record.engine)
        return record

    def _watch(self, record: WorkerRecord) -> None:
        async def wait_exit() -> None:
            await record.child.process.wait()
            if record.state in LIVE_STATES:
                record.mark("dead", f"process {record.child.exit_reason()}")

        task = asyncio.get_running_loop().create_task(wait_exit())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def heartbeat(self, worker_id: str, report: dict[str, Any]) -> bool:
        record = self.workers.get(worker_id)
        if record is None:
            return False
        record.last_heartbeat = time.monotonic()
        record.report = report
        if record.state == "down":
            record.mark("ready", "heartbeats resumed")
        elif record.state in ("ready", "busy") and report.get("state") in ("ready", "busy"):
            record.state = report["state"]
        return True

    def check_overdue(self, now: float | None = None) -> list[WorkerRecord]:
        """Mark workers that missed their heartbeats as down; return those newly marked."""
        now = time.monotonic() if now is None else now
        newly = []
        for record in self.workers.values():
            if record.state in ("ready", "busy") and is_overdue(
                record.last_heartbeat, now, self.config.heartbeat_interval
            ):
                record.mark("down", f"missed heartbeats for {now - record.last_heartbeat:.1f} s")
                newly.append(record)
        return newly

    def idle(self, now: float | None = None) -> list[WorkerRecord]:
        now = time.monotonic() if now is None else now
        return [
            r for r in self.workers.values()
            if r.state == "ready" and not r.active_jobs and now - r.last_used > self.config.worker_idle_timeout
        ]

    async def watch_heartbeats(self) -> None:
        """Mark silent workers down; stop workers idle past the timeout."""
        while True:
            self.check_overdue()
            for record in self.idle():
                log.info("stopping %s: idle for %.0f s", record.actor, time.monotonic() - record.last_used)
                await self.stop(record.worker_id, f"idle for more than {self.config.worker_idle_timeout:.0f} s")
            await asyncio.sleep(min(self.config.heartbeat_interval / 2, 1.0))


    async def stop(self, worker_id: str, reason: str) -> WorkerRecord:
        record = self.workers.get(worker_id)
        if record is None:
            known = ", ".join(self.workers) or "none"
            raise ModelNotFoundError(f"no worker {worker_id!r} on {self.config.actor} (workers: {known})")
        record.mark("stopping", reason)
        await record.child.stop(grace=5.0)
        record.mark("stopped", reason)
        return record

    async def stop_all(self, reason: str = "hive shutting down") -> None:
        await asyncio.gather(*(self.stop(w, reason) for w in list(self.workers)))
        for task in list(self._watchers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def describe(self) -> list[dict[str, Any]]:
        return [record.describe() for record in self.workers.values()]

