"""What each view of the dashboard shows, as plain rows built from the queen's state: the
hives' last reports, the feed's rates, the jobs the queen holds. No Quart here, so the rows
are tested without a server and the templates only lay them out."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from rbee.inventory import Inventory
from rbee.link import events
from rbee.link.jobs import Job
from rbee.link.schemas import CatalogModel, HiveView
from rbee.queen.dashboard.feed import Feed, Sample

UP_STATES = ("up", "busy")


@dataclass(frozen=True)
class Gauge:
    """One memory pool: a bar of used against total."""

    name: str
    total: int
    free: int

    @property
    def used(self) -> int:
        return max(0, self.total - self.free)


@dataclass(frozen=True)
class HostRow:
    name: str
    state: str
    up: bool
    reason: str
    since: float | None  # wall clock of the last state change
    beat_age: float | None
    platform: str
    engine: str
    cores: int
    cpu_load: float | None  # percent, as the hive's last probe saw it
    memory: list[Gauge]
    workers: int
    ssh: str


@dataclass(frozen=True)
class WorkerRow:
    node: str
    worker_id: str
    model: str
    state: str
    backend: str
    device: str
    gpu_layers: int
    ctx: int
    slots: int
    slots_busy: int
    queue: int
    tokens_per_s: float
    memory: int
    chart: str  # SVG polyline points of tokens/s over the window
    peak: float  # the chart's highest rate


@dataclass(frozen=True)
class JobRow:
    id: str
    model: str
    node: str
    tokens: int
    tokens_per_s: float
    ttft_ms: float | None
    age_s: float


@dataclass(frozen=True)
class PullRow:
    id: str
    ref: str
    node: str
    completed: int
    total: int
    state: str  # running, done, failed
    message: str

    @property
    def percent(self) -> int:
        if self.state == "done":
            return 100
        return int(100 * self.completed / self.total) if self.total else 0


@dataclass(frozen=True)
class ModelsView:
    catalogs: dict[str, list[CatalogModel]]
    logical: dict[str, dict[str, str]]
    aliases: dict[str, str]
    loaded: list[WorkerRow]
    pulls: list[PullRow] = field(default_factory=list)


def hosts(views: Sequence[HiveView]) -> list[HostRow]:
    return [host(view) for view in views]


def host(view: HiveView) -> HostRow:
    devices = view.devices or {}
    cpu = devices.get("cpu") or {}
    memory = [Gauge("RAM", int(cpu.get("ram_total") or 0), int(cpu.get("ram_free") or 0))] if cpu else []
    for gpu in devices.get("gpus") or []:
        if not gpu.get("unified"):  # Apple's unified memory is the RAM bar already
            memory.append(Gauge(str(gpu.get("name") or gpu.get("kind") or "GPU"), int(gpu.get("memory_total") or 0),
                                int(gpu.get("memory_free") or 0)))
    platform = "/".join(part for part in (devices.get("os"), devices.get("arch")) if part)
    return HostRow(
        name=view.name, state=view.state, up=view.state in UP_STATES, reason=view.reason, since=view.since,
        beat_age=view.heartbeat_age_s, platform=platform, engine=view.engine, cores=int(cpu.get("cores") or 0),
        cpu_load=cpu.get("load"), memory=memory, workers=len(view.workers), ssh=view.ssh or "",
    )


def workers(views: Sequence[HiveView], feed: Feed, catalogs: Mapping[str, Sequence[CatalogModel]],
            now: float | None = None) -> list[WorkerRow]:
    now = time.monotonic() if now is None else now
    rows = []
    for view in views:
        if view.state not in UP_STATES:
            continue
        names = {entry.path: entry.name for entry in catalogs.get(view.name, ()) if entry.path}
        for worker in view.workers:
            samples = list(feed.rates.get((view.name, worker.worker_id), ()))
            rows.append(WorkerRow(
                node=view.name, worker_id=worker.worker_id,
                model=names.get(worker.model_path) or PurePath(worker.model_path).name or worker.model_path,
                state=worker.state, backend=worker.backend, device=worker.placement or "cpu",
                gpu_layers=worker.gpu_layers, ctx=worker.n_ctx, slots=worker.load.slots,
                slots_busy=worker.load.slots_busy, queue=worker.load.queue,
                tokens_per_s=feed.rate(view.name, worker.worker_id), memory=worker.memory,
                chart=sparkline(samples, now, feed.window_s),
                peak=max((sample.tokens_per_s for sample in samples), default=0.0),
            ))
    return rows


def sparkline(samples: Iterable[Sample], now: float, window_s: float, width: int = 160, height: int = 32) -> str:
    """SVG polyline points for rates over the last ``window_s`` (right edge: now; top: the
    window's highest rate, at least 1 token/s so an idle worker draws a flat line)."""
    points = [(sample.at, sample.tokens_per_s) for sample in samples if sample.at >= now - window_s]
    if not points:
        return ""
    top = max(1.0, max(rate for _, rate in points))
    return " ".join(f"{width * (1 - (now - at) / window_s):.1f},{height * (1 - rate / top):.1f}"
                    for at, rate in points)


def jobs(held: Iterable[Job], now: float | None = None) -> list[JobRow]:
    """Inference jobs in flight, oldest first."""
    now = time.monotonic() if now is None else now
    rows = []
    for job in held:
        if job.finished or job.info.get("kind") != "infer":
            continue
        started = job.first_token_at
        rate = job.tokens / (now - started) if started is not None and now > started else 0.0
        rows.append(JobRow(
            id=job.id, model=job.info.get("model", ""), node=job.info.get("node", ""), tokens=job.tokens,
            tokens_per_s=rate, ttft_ms=(started - job.created) * 1000 if started is not None else None,
            age_s=now - job.created,
        ))
    return rows


def pulls(held: Iterable[Job]) -> list[PullRow]:
    """Pulls the queen holds (running, or ended within the registry's linger), from their narration."""
    rows = []
    for job in held:
        if job.info.get("kind") != "pull":
            continue
        completed = total = 0
        message = ""
        for event in job.history:
            if event.type == events.NARRATION:
                message = str(event["message"])
                if event["action"] == "download" and "total" in event.fields:
                    completed, total = int(event.get("bytes") or 0), int(event["total"])
        last = job.history[-1] if job.history else None
        state = "running"
        if last is not None and last.type == events.END:
            state, completed = "done", total
        elif last is not None and last.type == events.ERROR:
            state, message = "failed", str(last["message"])
        rows.append(PullRow(job.id, job.info.get("ref", ""), job.info.get("node", ""), completed, total, state,
                            message))
    return rows


def models(inventory: Inventory, catalogs: Mapping[str, Sequence[CatalogModel]], loaded: list[WorkerRow],
           held: Iterable[Job]) -> ModelsView:
    return ModelsView(
        catalogs={node: sorted(entries, key=lambda e: e.name) for node, entries in sorted(catalogs.items())},
        logical={name: model.forms() for name, model in sorted(inventory.models.items())},
        aliases=dict(sorted(inventory.aliases.items())),
        loaded=loaded,
        pulls=pulls(held),
    )


def size(value: Any) -> str:
    """Bytes for people: 1.2 GB, 340 MB."""
    amount = float(value or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if amount < 1000 or unit == "TB":
            return f"{amount:.0f} {unit}" if unit in ("B", "KB") else f"{amount:.1f} {unit}"
        amount /= 1000
    return f"{amount:.1f} TB"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
