"""The queen as one object: config, hive registry, local hive launcher, fleet, job
registry and metrics, wired together; and how a job is routed (scheduler, the
inventory's settings for the hive). Routes live in ``app.py``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from rbee import inventory
from rbee.config import DEFAULT_MODEL, LOCAL_NODE, HiveConfig, QueenConfig
from rbee.errors import (
    NoCapacityError,
    NodeDownError,
    RbeeError,
    RequestError,
    UnknownNodeError,
    UnprovenPeerError,
)
from rbee.link import events
from rbee.link.auth import Callee
from rbee.link.client import LinkClient
from rbee.link.jobs import Job, JobRegistry
from rbee.link.metrics import Metrics
from rbee.link.peers import PeerState
from rbee.link.relay import relay
from rbee.link.schemas import CatalogModel, HiveReport, JobRequest
from rbee.link.schemas import HiveView as HiveStatus
from rbee.queen import split
from rbee.queen.catalog import HiveCatalog
from rbee.queen.dashboard.feed import Feed
from rbee.queen.dashboard.sessions import Sessions
from rbee.queen.fleet.manager import Fleet, default_wheelhouse
from rbee.queen.hives import HivePeer, HiveRegistry, LocalHiveLauncher
from rbee.queen.keys import KeyStore
from rbee.queen.scheduler import HiveView, choose_hive, hive_body, hive_view
from rbee.queen.split import Split
from rbee.queen.split_job import ShareLedger, SplitJob

log = logging.getLogger("rbee.queen")


class Queen:
    def __init__(self, config: QueenConfig, url: str, token: str | None = None) -> None:
        self.config = config
        self.token = token
        self.url = url
        self.hives = HiveRegistry(config.heartbeat_interval, self._connect, retention=config.peer_retention,
                                  excused=lambda name: self.fleet.excused(name))
        self.local = LocalHiveLauncher(config, url, self.hives, memory=lambda: self.fleet.inventory.memory(LOCAL_NODE))
        self.metrics = Metrics(config.actor)
        self.keys = KeyStore(config.home)
        #: what the dashboard's pages stream, and their browser sessions
        self.feed = Feed()
        self.sessions = Sessions()
        self.registry = JobRegistry(config.actor, ping=config.ping_interval, resume_grace=config.resume_grace,
                                    on_finish=self.metrics.job_finished, watch=self.feed.observe)
        #: jobs this queen is relaying, per (hive, model): the scheduler's view between heartbeats
        self.in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        #: the shares split jobs hold; any other a hive lists is stopped (reap_strays)
        self.shares = ShareLedger()
        self._reaping: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        self.catalog = HiveCatalog(config.home / "queen.db")
        self.fleet = Fleet(
            self.load_inventory(config.inventory),
            self.hives,
            self.catalog,
            default_wheelhouse(),
            queen_port=int(url.rsplit(":", 1)[1]),
            hive_settings=HiveConfig(
                heartbeat_interval=config.heartbeat_interval, ping_interval=config.ping_interval,
                stall_timeout=config.stall_timeout, resume_grace=config.resume_grace,
                peer_retention=config.peer_retention,
            ),
            hive_ready_timeout=config.hive_ready_timeout,
            secrets_dir=config.home / "run",
        )

    @staticmethod
    def load_inventory(path: str) -> inventory.Inventory:
        return inventory.load(Path(path)) if path else inventory.Inventory.local_only()

    def use_inventory(self, path: str | None) -> None:
        if path:
            self.fleet.inventory = self.load_inventory(path)

    def _connect(self, hive: HivePeer) -> LinkClient:
        """A hive is called with its own secret, once it proved it holds it; never with the
        owner's key, which no remote host may see."""
        if hive.secret is None and self.token:
            raise UnprovenPeerError(f"this queen holds no secret for {hive.actor} (its launch record is gone); "
                                    f"relaunch it: rbee fleet down --node {hive.name} && rbee fleet up")
        return LinkClient(hive.url, hive.actor, stall_timeout=self.config.stall_timeout, token=hive.secret,
                          callee=Callee(hive.secret, hive.address) if hive.secret else None)

    def client_for(self, hive: HivePeer) -> LinkClient:
        return self.hives.client(hive)

    def hive_link(self, hive: HivePeer) -> Callable[[], LinkClient]:
        """The client for a job's hive, asked again when its stream is resumed: after an SSH
        reconnect the hive is reached through a new forward."""
        return lambda: self.hives.client(hive)

    def known_nodes(self) -> list[str]:
        return sorted({LOCAL_NODE, *self.fleet.inventory.names})

    def model_names(self) -> dict[str, list[str]]:
        """Every name each node answers to: the default model, the hive's own `models`, the
        inventory's logical models and aliases, and what its catalog holds (from its last report)."""
        inventory = self.fleet.inventory
        catalogs = self.catalogs()
        names: dict[str, list[str]] = {}
        for node in self.known_nodes():
            entry = inventory.get(node)
            catalog = [model.name for model in catalogs.get(node, [])]
            listed = [DEFAULT_MODEL, *(entry.models if entry else ()), *inventory.models, *inventory.aliases, *catalog]
            names[node] = list(dict.fromkeys(listed))
        return names

    def catalogs(self) -> dict[str, list[CatalogModel]]:
        """Each serving hive's catalog, from its last heartbeat."""
        found = {}
        for name in self.known_nodes():
            peer = self.hives.serving(name)
            if peer is not None and peer.report is not None:
                found[name] = list(peer.report.models)
        return found

    def views(self) -> list[HiveView]:
        """What the scheduler needs of every hive: a pure function of the last typed reports."""
        result = []
        for name in self.known_nodes():
            peer = self.hives.serving(name)
            local = self.is_local(name)
            jobs = {model: n for (hive, model), n in self.in_flight.items() if hive == name}
            report = peer.report if peer is not None else None
            fallback = 0
            if local and report is None:  # what this machine's hive would have, within its `memory`
                fallback = psutil.virtual_memory().available
                cap = self.fleet.inventory.memory(name)
                fallback = min(fallback, cap) if cap is not None else fallback
            result.append(hive_view(name, report, peer is not None or local, jobs, fallback))
        return result

    async def hive_for(self, request: JobRequest, job: Job) -> HivePeer:
        node = request.node
        if node is None:
            node = choose_hive(self.views(), request.model or DEFAULT_MODEL)
            job.narrate("schedule", f"scheduler picked hive:{node} for {request.model or DEFAULT_MODEL}")
        return await self.hive_named(node, job.narrate)

    def is_local(self, node: str) -> bool:
        """The hive on this machine (a child of the queen), not an SSH host."""
        entry = self.fleet.inventory.get(node)
        return node == LOCAL_NODE and (entry is None or not entry.remote)

    def split_plan(self, request: JobRequest) -> Split | None:
        """A split for this job: the hives named (``--node a,b`` or the logical model's ``split``),
        or, with none named, when no hive has the model warm and the plan says none holds it alone.
        None: the job goes to one hive as usual (whose own admission explains a refusal)."""
        if request.split is not None:
            raise RequestError("`split` is the queen's to set; name the hives with --node a,b or `split = [...]` "
                               "on the model in inventory.toml")
        inventory = self.fleet.inventory
        model = request.model or DEFAULT_MODEL
        logical = inventory.models.get(model)
        if request.node is not None and "," in request.node:
            forced: tuple[str, ...] = tuple(name.strip() for name in request.node.split(","))
        elif request.node is None and logical is not None and logical.split:
            forced = logical.split
        else:
            forced = ()
        views = self.views()
        if not forced and (request.node is not None or any(model in view.warm for view in views)):
            return None
        ref = logical.gguf if logical is not None and logical.gguf else model
        shape = split.shape_of(model, ref, self.catalogs())
        if shape is None:
            if forced:
                raise NoCapacityError(f"cannot split {model} across {', '.join(forced)}: no hive has it on disk "
                                      f"yet, so its size is unknown. Pull it first: rbee models pull {ref} "
                                      f"--node {forced[0]}")
            return None
        try:
            plan = split.plan_split(split.fleet_rooms(views, inventory), shape, forced=forced,
                                    requested_ctx=request.ctx or (logical.ctx if logical is not None else None))
        except NoCapacityError:
            if forced:
                raise
            return None
        return plan if plan.split else None

    def reap_strays(self, node: str, report: HiveReport) -> None:
        """Stop, in the background, the shares ``node`` lists that no split job holds any more."""
        for share_id in self.shares.strays(node, report):
            if share_id in self.shares.held:
                continue
            self.shares.hold(share_id)  # held by its reaping: one DELETE, not one per heartbeat

            async def stop(share_id: str = share_id) -> None:
                try:
                    await self.on_hive(node, "DELETE", f"/v1/shares/{share_id}")
                    log.info("stopped share %s on %s: no split job holds it", share_id, node)
                except RbeeError as exc:
                    log.warning("could not stop the stray share %s on %s: %s", share_id, node, exc.message)
                finally:
                    self.shares.release(share_id)

            task = asyncio.create_task(stop())
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)

    async def hive_named(self, node: str, narrate: Any) -> HivePeer:
        """A live hive by name: the local one or an inventory host, started when needed."""
        entry = self.fleet.inventory.get(node)
        if self.is_local(node):
            return await self.local.ensure(narrate)
        if entry is None:
            raise UnknownNodeError(
                f"unknown node {node!r}; known nodes: {', '.join(self.known_nodes())} "
                f"(from {self.fleet.inventory.path or 'no inventory'})"
            )
        if not entry.remote:
            raise UnknownNodeError(f"node {node!r} has no ssh target in the inventory; only localhost runs here")
        state = self.hives.get(node)
        if state is not None and state.state == PeerState.DOWN:
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
        target = self.fleet.inventory.resolve_alias(request.model)
        if target != request.model:
            job.narrate("alias", f"{request.model} is {target} (the inventory's [aliases])")
            request = request.model_copy(update={"model": target})
        job.info.update(kind="infer", model=request.model or DEFAULT_MODEL)
        self.feed.notify()
        plan = self.split_plan(request)
        if plan is not None:
            try:
                await SplitJob(self, job, request, plan).run()
            finally:
                self.feed.notify()
            return
        hive = await self.hive_for(request, job)
        job.narrate("route", f"job goes to hive:{hive.name}")
        job.info["node"] = hive.name
        key = (hive.name, request.model or DEFAULT_MODEL)
        self.in_flight[key] += 1
        try:
            with self.hives.relaying(hive, job):
                await relay(job, self.hive_link(hive), hive_body(request, self.fleet.inventory, hive.name))
        finally:
            self.in_flight[key] -= 1
            if self.in_flight[key] <= 0:
                del self.in_flight[key]
            self.feed.notify()

    async def run_fleet_job(self, job: Job, action: str) -> None:
        started = time.monotonic()
        if action == "up":
            report = await self.fleet.up(job.narrate)
        else:
            report = await self.fleet.down(job.narrate)
        job.narrate("report", f"fleet {action} done", report=report)
        job.emit(events.end(0, time.monotonic() - started, "done"))

    def status(self) -> list[HiveStatus]:
        """Every hive of the inventory (plus any live one), with live state; no ghosts."""
        now = time.monotonic()
        listed = set(self.fleet.inventory.names)
        rows = []
        for name in sorted(listed | {h.name for h in self.hives if h.serving}):
            row = self.hives.view(name, now)
            record = self.catalog.get(name)
            entry = self.fleet.inventory.get(name)
            rows.append(row.model_copy(update={"installed": record.install_state if record else None,
                                               "ssh": entry.ssh if entry else None}))
        return rows

    async def watch_heartbeats(self) -> None:
        """Hives that miss their heartbeats go down and their jobs end; long-gone ones are dropped."""
        while True:
            if self.hives.check():
                self.feed.notify()
            await self.hives.prune()
            await asyncio.sleep(self.config.heartbeat_interval / 2)

    async def close(self) -> None:
        for task in list(self._reaping):
            task.cancel()
        await self.registry.close()
        await self.local.stop()
        await self.fleet.close(stop_launched=self.config.ephemeral)
        await self.hives.close()
        with contextlib.suppress(Exception):
            self.catalog.close()
