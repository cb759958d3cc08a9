"""The queen's hive registry (live state from heartbeats) and the launcher for the
hive on this machine. Hives over SSH join in the fleet work; they register the
same way, by heartbeat."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rbee.config import LOCAL_NODE, HiveConfig, QueenConfig, ServeOptions, to_args
from rbee.errors import StartupError
from rbee.link.heartbeat import is_overdue
from rbee.link.spawn import Child, bind_loopback, spawn


@dataclass
class HiveState:
    name: str
    url: str = ""
    state: str = "unknown"
    reason: str = ""
    last_heartbeat: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "state": self.state,
            "reason": self.reason,
            "heartbeat_age_s": round(now - self.last_heartbeat, 2) if self.last_heartbeat else None,
            "version": self.report.get("version"),
            "pid": self.report.get("pid"),
            "workers": self.report.get("workers", []),
            "devices": self.report.get("devices", {}),
        }


class HiveRegistry:
    """Hives by name, as their heartbeats describe them."""

    def __init__(self, heartbeat_interval: float) -> None:
        self.interval = heartbeat_interval
        self.hives: dict[str, HiveState] = {}
        self._first_beat: dict[str, asyncio.Event] = {}

    def heartbeat(self, name: str, report: dict[str, Any], now: float | None = None) -> HiveState:
        hive = self.hives.setdefault(name, HiveState(name))
        was = hive.state
        hive.last_heartbeat = time.monotonic() if now is None else now
        hive.report = report
        if not hive.url:  # a hive started by hand; launched hives get their URL (maybe a tunnel) from the launcher
            hive.url = str(report.get("url") or "")
        hive.state = "up"
        hive.reason = "heartbeating" if was != "down" else "heartbeats resumed"
        self.beaten(name).set()
        return hive

    def set_url(self, name: str, url: str) -> None:
        self.hives.setdefault(name, HiveState(name)).url = url

    def forget(self, name: str) -> None:
        self.hives.pop(name, None)
        self._first_beat.pop(name, None)

    def beaten(self, name: str) -> asyncio.Event:
        return self._first_beat.setdefault(name, asyncio.Event())

    def mark(self, name: str, state: str, reason: str) -> None:
        hive = self.hives.setdefault(name, HiveState(name))
        hive.state, hive.reason = state, reason
        if state != "up":
            self._first_beat.pop(name, None)
        if state == "stopped":
            hive.report = {**hive.report, "workers": []}

    def check_overdue(self, now: float | None = None) -> list[HiveState]:
        now = time.monotonic() if now is None else now
        newly = []
        for hive in self.hives.values():
            if hive.state == "up" and is_overdue(hive.last_heartbeat, now, self.interval):
                self.mark(hive.name, "down", f"missed heartbeats for {now - hive.last_heartbeat:.1f} s")
                newly.append(hive)
        return newly

    def get_up(self, name: str) -> HiveState | None:
        hive = self.hives.get(name)
        return hive if hive is not None and hive.state == "up" else None

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [hive.describe(now) for hive in self.hives.values()]


class LocalHiveLauncher:
    """Starts the hive on this machine as a child of the queen, once, on first need."""

    def __init__(self, config: QueenConfig, queen_url: str, registry: HiveRegistry) -> None:
        self.config = config
        self.queen_url = queen_url
        self.registry = registry
        self.child: Child | None = None
        self._lock = asyncio.Lock()

    async def ensure(self, narrate: Any) -> HiveState:
        async with self._lock:
            hive = self.registry.get_up(LOCAL_NODE)
            if hive is not None and (self.child is None or self.child.alive):
                return hive
            return await self._launch(narrate)

    async def _launch(self, narrate: Any) -> HiveState:
        hive_config = HiveConfig(
            name=LOCAL_NODE,
            queen_url=self.queen_url,
            home=self.config.home,
            heartbeat_interval=self.config.heartbeat_interval,
            ping_interval=self.config.ping_interval,
            stall_timeout=self.config.stall_timeout,
            serve=ServeOptions(),
        )
        narrate("launch", f"starting hive:{LOCAL_NODE} on this machine")
        started = time.monotonic()
        self.child = await spawn(
            f"hive:{LOCAL_NODE}",
            "rbee.hive",
            to_args(hive_config),
            sock=bind_loopback(),
            log_path=self.config.home / "logs" / "hive-localhost.log",
            env=dict(os.environ),
        )
        self.registry.set_url(LOCAL_NODE, self.child.url)
        await self._wait_first_heartbeat(self.child)
        narrate("launch", f"hive:{LOCAL_NODE} is up after {time.monotonic() - started:.1f} s")
        hive = self.registry.get_up(LOCAL_NODE)
        assert hive is not None
        return hive

    async def _wait_first_heartbeat(self, child: Child) -> None:
        beaten = self.registry.beaten(LOCAL_NODE)
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
            self.registry.mark(LOCAL_NODE, "stopped", "stopped by the queen")
