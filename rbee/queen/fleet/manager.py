"""The fleet as the queen runs it: converge the hosts to the inventory (`up`),
show what that would do (`plan`), stop what the fleet launched (`down`), and
bring one named hive up on demand (`infer --node NAME`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rbee import __version__
from rbee.config import HiveConfig
from rbee.errors import RbeeError, StartupError
from rbee.inventory import HiveEntry, Inventory, SshSection
from rbee.link.peers import PeerState
from rbee.link.schemas import HostProbe
from rbee.queen.catalog import HiveCatalog
from rbee.queen.fleet import plan as plans
from rbee.queen.fleet.remote import RemoteHost
from rbee.queen.fleet.wheelhouse import Platform, Wheelhouse, WheelSet, host_platform_of, planned_digest
from rbee.queen.hives import HivePeer, HiveRegistry

Narrate = Callable[[str, str], None]

#: how long a hive whose SSH connection dropped is not judged by its heartbeats
RECONNECT_GRACE_S = 10.0


class Fleet:
    def __init__(
        self,
        inventory: Inventory,
        registry: HiveRegistry,
        catalog: HiveCatalog,
        wheelhouse: Wheelhouse,
        queen_port: int,
        hive_settings: HiveConfig,
        hive_ready_timeout: float,
        secrets_dir: Path | None = None,
    ) -> None:
        self.secrets_dir = secrets_dir  # the queen's copy of each remote hive's secret
        self.inventory = inventory
        self.registry = registry
        self.catalog = catalog
        self.wheelhouse = wheelhouse
        self.queen_port = queen_port
        self.hive_settings = hive_settings
        self.hive_ready_timeout = hive_ready_timeout
        self.hosts: dict[str, RemoteHost] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def host(self, entry: HiveEntry) -> RemoteHost:
        host = self.hosts.get(entry.name)
        if host is None or host.entry != entry or host.ssh != self.inventory.ssh:
            if host is not None:
                asyncio.get_running_loop().create_task(host.close())
            host = self.hosts[entry.name] = RemoteHost(
                entry, self.inventory.ssh, self.queen_port, self.hive_settings, on_reconnect=self._reconnected,
                secrets_dir=self.secrets_dir,
            )
        return host

    def _reconnected(self, host: RemoteHost) -> None:
        hive = self.registry.launched(host.name, host.hive_url, host.secret, host.hive_address)
        if hive.serving:
            hive.last_beat = time.monotonic()  # its beats resume through the new forward: a fresh count

    def excused(self, name: str) -> bool:
        """Is this hive's SSH link being re-opened (for less than RECONNECT_GRACE s)? Its missed
        heartbeats are the link's, not the hive's, and its streams resume once the link is back."""
        host = self.hosts.get(name)
        lost = host.link_lost_at if host is not None else None
        return lost is not None and time.monotonic() - lost < RECONNECT_GRACE_S

    # plan / up / down ---------------------------------------------------------------------

    async def plan(self, inventory: Inventory, narrate: Narrate) -> list[plans.Step]:
        """What `up` would do for ``inventory``; touches nothing: no wheel is built or hashed, and
        its SSH connections are its own, closed after."""
        remote = [entry for entry in inventory.hive if entry.remote]
        hosts = [RemoteHost(entry, inventory.ssh, self.queen_port, self.hive_settings) for entry in remote]
        try:
            steps = await asyncio.gather(*(self._plan_one(host, narrate) for host in hosts))
        finally:
            await asyncio.gather(*(host.close() for host in hosts))
        launched = {record.name for record in self.catalog.all() if record.launched}
        return [*steps, *plans.plan_removed(set(inventory.names), launched)]

    async def _plan_one(self, host: RemoteHost, narrate: Narrate) -> plans.Step:
        try:
            probe = await host.probe()
        except RbeeError as exc:
            return plans.plan_host(host.name, None, "", exc.message)
        path = install_path_of(host.entry, probe)
        digest = await asyncio.to_thread(planned_digest, host_platform_of(probe), host.entry.backend == "mlx",
                                         path.build is not None)
        return plans.plan_host(host.name, probe, digest, path=path)

    async def wheels_for(self, entry: HiveEntry, probe: HostProbe, path: plans.InstallPath,
                         narrate: Narrate) -> WheelSet:
        return await self.wheelhouse.build(host_platform_of(probe), narrate, mlx=entry.backend == "mlx",
                                           llama_source=path.build is not None)

    async def up(self, narrate: Narrate) -> list[dict[str, Any]]:
        """Converge every host to the inventory, concurrently; report per host what was done."""
        started = time.monotonic()
        remote = [entry for entry in self.inventory.hive if entry.remote]
        results = await asyncio.gather(*(self._up_one(entry, narrate) for entry in remote), return_exceptions=True)
        report = []
        for entry, result in zip(remote, results, strict=True):
            if isinstance(result, BaseException):
                message = result.message if isinstance(result, RbeeError) else f"{type(result).__name__}: {result}"
                narrate("failed", f"hive:{entry.name}: {message}")
                report.append({"name": entry.name, "action": "failed", "reason": message})
            else:
                report.append(result.as_dict())
        launched = {record.name for record in self.catalog.all() if record.launched}
        for step in plans.plan_removed(set(self.inventory.names), launched):
            await self._remove(step.name, narrate)
            report.append(step.as_dict())
        changed = [r for r in report if r["action"] not in (plans.NOTHING,)]
        if not changed:
            narrate("up", f"nothing to do: {len(report)} hive(s) already up to date and running")
        narrate("up", f"fleet up took {time.monotonic() - started:.1f} s")
        return report

    async def _up_one(self, entry: HiveEntry, narrate: Narrate) -> plans.Step:
        async with self._locks.setdefault(entry.name, asyncio.Lock()):
            host = self.host(entry)
            probe = await host.probe()
            path = install_path_of(entry, probe)
            wheels = await self.wheels_for(entry, probe, path, narrate)
            step = plans.plan_host(entry.name, probe, wheels.digest, path=path)
            say = lambda action, message: narrate(action, f"hive:{entry.name}: {message}")  # noqa: E731
            say("plan", f"{step.action} ({step.reason}); install path: {step.path}")
            self.catalog.upsert(entry.name, {"hive": entry.model_dump(), "ssh": self.inventory.ssh.model_dump()},
                                launched=1)
            hive = probe.hive or {}
            if hive.get("alive") and host.secret is None:  # launched by another queen: not ours to call
                say("launch", "the running hive was started with a secret this queen does not hold: restarting it")
                await host.stop_hive()
                hive = {}
            if step.action in (plans.INSTALL, plans.UPGRADE):
                if hive.get("alive"):
                    await host.stop_hive()
                self.catalog.update(entry.name, install_state="installing")
                await host.install(wheels, probe, path, say)
                self.catalog.update(entry.name, install_state="installed", version=__version__,
                                    digest=wheels.digest)
                hive = {}
            if hive.get("alive"):
                if host.hive_port is None or not self.registry.serving(entry.name):
                    await host.attach(int(str(hive["url"]).rsplit(":", 1)[1]))
                    self.registry.launched(entry.name, host.hive_url, host.secret, host.hive_address)
            else:
                await host.launch(say)
                self.registry.launched(entry.name, host.hive_url, host.secret, host.hive_address)
            await self._preload(entry, await self.wait_heartbeat(entry.name), say)
            return step

    async def _preload(self, entry: HiveEntry, hive: HivePeer, say: Narrate) -> None:
        """The hive's ``models`` list, put in its catalog now (downloaded with progress, or found
        there), so a first job does not wait for a download. A model that fails is reported;
        the hive stays up."""
        for ref in entry.models:
            try:
                await self._pull(hive, ref, say)
            except RbeeError as exc:
                say("preload", f"{ref} could not be preloaded: {exc.message}")

    async def _pull(self, hive: HivePeer, ref: str, say: Narrate) -> None:
        async with contextlib.aclosing(self.registry.client(hive).run({"ref": ref}, "/v1/catalog/jobs")) as events:
            async for event in events:
                if event.type == "narration" and event["action"] in ("download", "provision", "verify", "report"):
                    say("preload", f"{ref}: {event['message']}")
                elif event.type == "error":
                    say("preload", f"{ref} could not be preloaded: {event['message']}")

    async def wait_heartbeat(self, name: str) -> HivePeer:
        try:
            return await self.registry.wait_beat(name, self.hive_ready_timeout)
        except TimeoutError:
            raise StartupError(
                f"hive:{name} sent no heartbeat within {self.hive_ready_timeout:.0f} s; "
                f"see `rbee fleet logs {name}`"
            ) from None

    def _recorded_host(self, name: str) -> RemoteHost | None:
        """A host as it was when the fleet launched it (it may have left the inventory since)."""
        record = self.catalog.get(name)
        if record is None:
            return None
        entry = HiveEntry.model_validate(record.entry["hive"])
        current = self.hosts.get(name)
        if current is not None and current.entry == entry:
            return current
        ssh = SshSection.model_validate(record.entry["ssh"])
        return RemoteHost(entry, ssh, self.queen_port, self.hive_settings, secrets_dir=self.secrets_dir)

    async def _remove(self, name: str, narrate: Narrate) -> None:
        host = self._recorded_host(name)
        if host is None:
            return
        try:
            was = await host.stop_hive()
            narrate("stop", f"hive:{name}: removed from the inventory; " + ("stopped" if was else "was not running"))
        except RbeeError as exc:
            narrate("stop", f"hive:{name}: could not stop it: {exc.message}")
        await host.close()
        if host.secret_path is not None:
            host.secret_path.unlink(missing_ok=True)
        self.hosts.pop(name, None)
        self.catalog.remove(name)
        await self.registry.remove(name)

    async def down(self, narrate: Narrate) -> list[dict[str, Any]]:
        """Stop every hive the fleet launched (and their workers)."""
        names = {record.name for record in self.catalog.all() if record.launched}
        names |= {entry.name for entry in self.inventory.hive if entry.remote}
        report = await asyncio.gather(*(self._down_one(name, narrate) for name in sorted(names)))
        return list(report)

    async def _down_one(self, name: str, narrate: Narrate) -> dict[str, Any]:
        entry = self.inventory.get(name)
        host = self.host(entry) if entry is not None and entry.remote else self._recorded_host(name)
        if host is None:
            return {"name": name, "action": "skipped", "reason": "not a remote hive"}
        try:
            was = await host.stop_hive()
        except RbeeError as exc:
            narrate("down", f"hive:{name}: {exc.message}")
            return {"name": name, "action": "failed", "reason": exc.message}
        self.catalog.update(name, launched=0)
        self.registry.peer(name).set_state(PeerState.STOPPED, "stopped by `fleet down`")
        narrate("down", f"hive:{name}: " + ("stopped" if was else "was not running"))
        return {"name": name, "action": "stopped" if was else "nothing", "reason": ""}

    async def reattach(self) -> None:
        """After a queen (re)start: tunnel to every hive the fleet launched that still runs, so
        it re-registers with its next heartbeat; nothing is reinstalled, warm workers stay."""
        launched = [record.name for record in self.catalog.all() if record.launched]
        await asyncio.gather(*(self._reattach_one(name) for name in launched), return_exceptions=True)

    async def _reattach_one(self, name: str) -> None:
        host = self._recorded_host(name)
        if host is None:
            return
        self.hosts[name] = host
        host.on_reconnect = self._reconnected
        probe = await host.probe()
        hive = probe.hive or {}
        if hive.get("alive") and host.secret is not None:
            await host.attach(int(str(hive["url"]).rsplit(":", 1)[1]))
            self.registry.launched(name, host.hive_url, host.secret, host.hive_address)

    # on demand ----------------------------------------------------------------------------

    async def ensure(self, entry: HiveEntry, narrate: Narrate) -> HivePeer:
        """A live hive for ``entry``: installed and launched if needed (SPEC: happy flow, step 3)."""
        hive = self.registry.serving(entry.name)
        host = self.hosts.get(entry.name)
        if hive is not None and host is not None and host.hive_url:
            return hive
        await self._up_one(entry, narrate)
        return await self.wait_heartbeat(entry.name)

    async def logs(self, name: str, lines: int) -> list[str]:
        entry = self.inventory.get(name)
        if entry is None or not entry.remote:
            raise StartupError(f"no remote hive {name!r} in {self.inventory.path or 'the inventory'}")
        return await self.host(entry).tail(lines)

    async def close(self, stop_launched: bool) -> None:
        """Close every connection; an ephemeral queen first stops the hives it launched."""
        if stop_launched:
            await asyncio.gather(
                *(host.stop_hive() for host in self.hosts.values() if host.launched_here), return_exceptions=True
            )
        await asyncio.gather(*(host.close() for host in self.hosts.values()), return_exceptions=True)


def install_path_of(entry: HiveEntry, probe: HostProbe) -> plans.InstallPath:
    return plans.install_path(Platform.local(), host_platform_of(probe), nvidia=probe.nvidia, nvcc=probe.nvcc,
                              build=entry.build)


def default_wheelhouse() -> Wheelhouse:
    return Wheelhouse(Path.home() / ".cache" / "rbee" / "wheelhouse")
