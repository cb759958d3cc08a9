"""The queen's hive registry (live state from heartbeats) and the launcher for the
hive on this machine. Hives over SSH join in the fleet work; they register the
same way, by heartbeat."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from rbee.config import LOCAL_NODE, HiveConfig, QueenConfig, ServeOptions, memory_budget, to_args
from rbee.errors import StartupError, UnknownNodeError
from rbee.link.auth import ENV, OWNER_ENV, secret_file, write_secret
from rbee.link.peers import Peer, PeerRegistry, PeerState
from rbee.link.schemas import HiveReport, HiveView, parse_wire
from rbee.link.spawn import Child, bind_loopback, spawn

HivePeer = Peer[HiveReport]


class HiveRegistry(PeerRegistry[HivePeer]):
    """The queen's hives by name, as their heartbeats describe them."""

    def peer(self, name: str) -> HivePeer:
        peer = self.get(name)
        return peer if peer is not None else self.add(Peer("hive", name, reason="known from the inventory"))

    def launched(self, name: str, url: str, secret: str | None = None, address: str = "") -> HivePeer:
        """A hive was (re)launched or re-attached at ``url`` (maybe a tunnel to ``address`` on its
        host) with ``secret``: wait for its beat."""
        peer = self.peer(name)
        if (secret is not None and secret != peer.secret) or address != peer.address:
            peer.secret = secret if secret is not None else peer.secret
            peer.address = address
            self.drop_client(peer)  # a client with the old secret or address must not be reused
        self.set_url(peer, url)
        if not peer.serving:
            peer.set_state(PeerState.STARTING, f"launched at {url}")
        return peer

    def heartbeat(self, name: str, body: Any, now: float | None = None) -> HivePeer:
        """A hive's heartbeat, accepted only for a hive this queen launched (its address is the
        launcher's, never the report's); a malformed body raises RequestError (a 400)."""
        peer = self.get(name)
        if peer is None:
            raise UnknownNodeError(f"hive:{name} was not launched by this queen; `rbee fleet up` launches hives")
        peer.beat(parse_wire(HiveReport, body, f"heartbeat of hive:{name}"), now=now)
        return peer

    async def wait_beat(self, name: str, timeout: float) -> HivePeer:
        peer = self.peer(name)
        await asyncio.wait_for(peer.beaten.wait(), timeout)
        return peer

    def view(self, name: str, now: float | None = None) -> HiveView:
        peer = self.get(name)
        if peer is None:
            return HiveView(name=name, state="not running", reason="never started")
        report = peer.report
        return HiveView(
            name=name, url=peer.url, state=peer.state.value, reason=peer.reason, since=peer.changes[-1].at,
            heartbeat_age_s=peer.heartbeat_age(now),
            version=report.version if report else None, pid=report.pid if report else None,
            workers=report.workers if report and peer.state != PeerState.STOPPED else [],
            shares=report.shares if report and peer.state != PeerState.STOPPED else [],
            devices=report.devices if report else {},
            free_memory=report.free_memory if report else 0,
            engine=report.engine if report else "",
        )


class LocalHiveLauncher:
    """Starts the hive on this machine as a child of the queen, once, on first need."""

    def __init__(self, config: QueenConfig, queen_url: str, registry: HiveRegistry,
                 memory: Callable[[], int | None] = lambda: None) -> None:
        self.config = config
        self.queen_url = queen_url
        self.registry = registry
        self.child: Child | None = None
        #: the inventory's `memory` for this machine's entry, if it has one (read at each launch)
        self.memory = memory
        self._lock = asyncio.Lock()

    async def ensure(self, narrate: Any) -> HivePeer:
        async with self._lock:
            hive = self.registry.serving(LOCAL_NODE)
            if hive is not None and (self.child is None or self.child.alive):
                return hive
            if self.child is not None and self.child.alive:  # alive but silent (hung): replace it
                peer = self.registry.peer(LOCAL_NODE)
                narrate("launch", f"hive:{LOCAL_NODE} is {peer.state} ({peer.reason}): replacing it")
                await self.child.stop(grace=2.0)
            return await self._launch(narrate)

    async def _launch(self, narrate: Any) -> HivePeer:
        hive_config = HiveConfig(
            name=LOCAL_NODE,
            queen_url=self.queen_url,
            home=self.config.home,
            heartbeat_interval=self.config.heartbeat_interval,
            ping_interval=self.config.ping_interval,
            stall_timeout=self.config.stall_timeout,
            resume_grace=self.config.resume_grace,
            peer_retention=self.config.peer_retention,
            serve=ServeOptions(),
        )
        hive_config = dataclasses.replace(hive_config,
                                          memory_budget=memory_budget(hive_config.memory_budget, self.memory()))
        narrate("launch", f"starting hive:{LOCAL_NODE} on this machine")
        started = time.monotonic()
        secret_path = self.config.home / "run" / f"hive-{LOCAL_NODE}.secret"
        secret = write_secret(secret_path)
        self.child = await spawn(
            f"hive:{LOCAL_NODE}",
            "rbee.hive",
            to_args(hive_config),
            sock=bind_loopback(),
            log_path=self.config.home / "logs" / "hive-localhost.log",
            # its own secret, and the owner's: on this machine the owner's key opens the hive too
            env={**os.environ, ENV: str(secret_path), OWNER_ENV: str(secret_file(home=self.config.home))},
        )
        hive = self.registry.launched(LOCAL_NODE, self.child.url, secret)
        await self._wait_first_heartbeat(self.child, hive)
        narrate("launch", f"hive:{LOCAL_NODE} is up after {time.monotonic() - started:.1f} s")
        return hive

    async def _wait_first_heartbeat(self, child: Child, hive: HivePeer) -> None:
        beaten = hive.beaten
        exited = asyncio.ensure_future(child.process.wait())
        waiting = asyncio.ensure_future(beaten.wait())
        try:
            done, _ = await asyncio.wait(
                {exited, waiting}, timeout=self.config.hive_ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exited.cancel()
            waiting.cancel()
        if waiting in done:
            return
        await child.stop(grace=2.0)
        if exited in done:
            raise StartupError(child.exit_message())
        raise StartupError(
            f"hive:{LOCAL_NODE} sent no heartbeat within {self.config.hive_ready_timeout:.0f} s; "
            f"see {child.log_path}"
        )

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(grace=8.0)
            self.registry.peer(LOCAL_NODE).set_state(PeerState.STOPPED, "stopped by the queen")
