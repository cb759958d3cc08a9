"""One SSH host of the fleet: probe, install, launch, tunnel, stop — over one
asyncssh connection that is re-opened with backoff when it drops.

The hive binds 127.0.0.1 on its host. The queen reaches it through a local
port forward, and the hive's heartbeats reach the queen through a remote
forward on the same connection: the fleet opens no network port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import posixpath
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import httpx

from rbee import __version__
from rbee.config import WORKER_MODULE, HiveConfig, ServeOptions, memory_budget, to_args
from rbee.engine import build as engine_build
from rbee.engine.proof import Verdict
from rbee.errors import RemoteCommandError, RequestError, SshError, UnprovenPeerError, WheelhouseError
from rbee.inventory import HiveEntry, SshSection
from rbee.link.auth import ENV, Callee, write_secret
from rbee.link.schemas import HostProbe, parse_wire
from rbee.link.transport import secret_client
from rbee.queen.fleet.plan import InstallPath
from rbee.queen.fleet.remote_script import SCRIPT
from rbee.queen.fleet.ssh import Command, connect, run
from rbee.queen.fleet.wheelhouse import WheelSet

log = logging.getLogger(__name__)

Narrate = Callable[[str, str], None]


class RemoteHost:
    def __init__(
        self,
        entry: HiveEntry,
        ssh: SshSection,
        queen_port: int,
        hive_settings: HiveConfig,
        on_reconnect: Callable[[RemoteHost], None] | None = None,
        secrets_dir: Path | None = None,
    ) -> None:
        self.entry = entry
        #: the queen's copy of this hive's secret (pushed to the host at launch, kept for re-attaching)
        self.secret_path = secrets_dir / f"hive-{entry.name}.secret" if secrets_dir is not None else None
        self.secret = self._read_secret()
        self.ssh = ssh
        self.queen_port = queen_port
        self.hive_settings = hive_settings  # timings etc. for the hive; name, home and port are set here
        self.on_reconnect = on_reconnect
        self.conn: asyncssh.SSHClientConnection | None = None
        self.home = ""
        self.hive_port: int | None = None
        self.hive_url = ""  # through the local forward
        self.queen_url_there = ""  # through the remote forward, as the hive sees it
        self.launched_here = False
        self.reconnects = 0
        #: when the SSH connection dropped, until it and the forwards are back (the hive is excused
        #: its missed heartbeats meanwhile: its link is down, not the hive)
        self.link_lost_at: float | None = None
        self._forwards: list[asyncssh.SSHListener] = []
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def actor(self) -> str:
        return f"hive:{self.name}"

    # connection ---------------------------------------------------------------------------

    async def connected(self) -> asyncssh.SSHClientConnection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await connect(self.entry, self.ssh)
            if self._watch is None or self._watch.done():
                self._watch = asyncio.get_running_loop().create_task(self._keep_connected())
        return self.conn

    async def _keep_connected(self) -> None:
        """Re-open the connection and the forwards after a drop, backing off up to 30 s."""
        while not self._closing:
            conn = self.conn
            if conn is None:
                return
            await conn.wait_closed()
            if self._closing:
                return
            log.warning("%s: SSH connection lost; reconnecting", self.actor)
            self.link_lost_at = time.monotonic()
            delay = 0.25
            while not self._closing:
                try:
                    self.conn = await connect(self.entry, self.ssh)
                    if self.hive_port is not None:
                        await self._open_forwards(self.hive_port)
                        await self._tell_hive_queen_url(rotate=True)
                    self.reconnects += 1
                    log.info("%s: reconnected (%d)", self.actor, self.reconnects)
                    if self.on_reconnect is not None:
                        self.on_reconnect(self)
                    self.link_lost_at = None
                    break
                except (SshError, OSError, asyncssh.Error, httpx.HTTPError, UnprovenPeerError) as exc:
                    log.info("%s: reconnect failed (%s); next try in %.1f s", self.actor, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

    async def script(self, *args: str, what: str, timeout: float = 60) -> Any:
        """Run the stdlib-only helper with the host's own Python; return its JSON."""
        conn = await self.connected()
        output = await run(conn, Command.of(self.entry.python, "-", *args), what=f"{self.actor}: {what}",
                           stdin=SCRIPT, timeout=timeout)
        try:
            return json.loads(output.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise RemoteCommandError(f"{self.actor}: {what} printed no JSON: {output[-300:]!r}") from exc

    async def probe(self) -> HostProbe:
        facts = await self.script("probe", self.entry.home, what="probing the host")
        try:
            probe = parse_wire(HostProbe, facts, f"probe of {self.actor}")
        except RequestError as exc:
            raise RemoteCommandError(f"{exc.message}; is {self.entry.python} on the host a CPython 3?") from exc
        self.home = probe.home
        return probe

    # install ------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.home, *parts)

    async def install(self, wheels: WheelSet, probe: HostProbe, path: InstallPath, narrate: Narrate) -> None:
        """Push missing wheels over SFTP, make the venv, build llama-cpp-python there when the
        install path says so, then pip install rbee with no index at all."""
        conn = await self.connected()
        wheel_dir = self._path("wheelhouse")
        manifest = json.dumps(sorted(wheels.hashes))
        there: dict[str, str] = await self.script("verify", wheel_dir, manifest, what="checking the wheelhouse",
                                                  timeout=300)
        to_send = [p for p in wheels.wheels if there.get(p.name) != wheels.hashes[p.name]]
        if to_send:
            size = sum(p.stat().st_size for p in to_send)
            narrate("install", f"sending {len(to_send)} wheels ({size / 1e6:.0f} MB) over SFTP")
            async with conn.start_sftp_client() as sftp:
                await sftp.makedirs(wheel_dir, exist_ok=True)
                for local in to_send:
                    partial = posixpath.join(wheel_dir, f".{local.name}.partial")
                    await sftp.put(str(local), partial)
                    await sftp.posix_rename(partial, posixpath.join(wheel_dir, local.name))
        there = await self.script("verify", wheel_dir, manifest, what="checking the pushed wheels' sha256",
                                  timeout=300)
        wrong = sorted(name for name, sha in wheels.hashes.items() if there.get(name) != sha)
        if wrong:
            raise WheelhouseError(f"{self.actor}: after the push, {', '.join(wrong[:5])} on the host do not match "
                                  "their sha256 here; nothing was installed. Run `rbee fleet up` again")
        python = self._path("venv", "bin", "python")
        if not probe.venv:
            narrate("install", f"creating the venv {self._path('venv')}")
            await run(conn, Command.of(self.entry.python, "-m", "venv", "--without-pip", self._path("venv")),
                      what=f"{self.actor}: creating the venv", timeout=300)
        apple = probe.system == "darwin" and probe.machine in ("arm64", "aarch64")
        engines = "[mlx]" if apple or self.entry.backend == "mlx" else ""
        offline = {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        # pip runs from its own wheel (pip runs from a zip), so the venv needs no copy of it; no
        # byte-compiling of every file pip installs, only of what the hive and a worker import (below).
        pip = [python, posixpath.join(wheel_dir, wheels.named("pip-").name, "pip")]
        base = [*pip, "install", "--no-index", "--find-links", wheel_dir, "--quiet", "--no-compile"]
        installed = probe.installed or {}
        engine_there = probe.venv and installed.get("llama_cpp") == path.marker
        if path.build and not engine_there:
            await self._build_llama(conn, wheels, path, base, offline, narrate)
        narrate("install", f"pip install rbee {__version__} from the pushed wheelhouse (no index)")
        rbee_wheel = posixpath.join(wheel_dir, wheels.named("rbee-").name)
        await run(conn, Command.of(*base, rbee_wheel + engines, env=offline),
                  what=f"{self.actor}: installing rbee", timeout=900)
        if probe.venv:
            # Same version, new code (the digest moved): replace rbee itself, and an engine installed
            # with other build flags (a wheel pip would otherwise keep, being the same version).
            stale = [] if path.build or engine_there else [
                posixpath.join(wheel_dir, wheels.named("llama_cpp_python-").name)]
            await run(conn, Command.of(*base, "--force-reinstall", "--no-deps", rbee_wheel, *stale, env=offline),
                      what=f"{self.actor}: installing rbee", timeout=300)
        engine = "mlx_lm" if engines else "llama_cpp"
        await run(conn, Command.of(python, "-c", f"import rbee.hive.__main__, {WORKER_MODULE}.__main__, {engine}",
                                   env={"PYTHONDONTWRITEBYTECODE": ""}),
                  what=f"{self.actor}: importing rbee and {engine} once (checks them, writes their bytecode)",
                  timeout=300)
        await self.prove_engine(conn, python, narrate)
        if path.note:
            narrate("install", path.note)
        record = json.dumps({"version": __version__, "digest": wheels.digest, "llama_cpp": path.marker})
        async with conn.start_sftp_client() as sftp:
            async with sftp.open(self._path("install.json"), "w") as handle:
                await handle.write(record)

    async def prove_engine(self, conn: asyncssh.SSHClientConnection, python: str, narrate: Narrate) -> None:
        """Run the installed engine on the host (rbee.engine.proof): the CPU variant that decodes
        there is kept on the host, so its hive never starts a worker on one that cannot run."""
        narrate("install", "proving llama.cpp on the host: decoding a few tokens with the best CPU variant")
        output = await run(conn, Command.of(python, "-m", "rbee.engine.proof", "--json", "--models-dir",
                                            self._path("models"), env={"RBEE_HOME": self.home}),
                           what=f"{self.actor}: proving the engine", timeout=900)
        try:
            verdict = Verdict.from_dict(json.loads(output.strip().splitlines()[-1]))
        except (ValueError, IndexError, TypeError) as exc:
            raise RemoteCommandError(f"{self.actor}: the engine proof printed no verdict: {output[-300:]!r}") from exc
        narrate("install", f"engine proven: {verdict.engine}; CPU {verdict.cpu} ({verdict.features}); "
                           f"{verdict.line()}")

    async def _build_llama(self, conn: asyncssh.SSHClientConnection, wheels: WheelSet, path: InstallPath,
                           base: list[str], offline: dict[str, str], narrate: Narrate) -> None:
        """Build llama-cpp-python on the host from the pushed source with the host's compiler (and
        CUDA or Metal), offline: its build tools came as wheels. Done before rbee's install, which
        then finds it satisfied; an upgrade with the same build skips it."""
        sources = [p for p in wheels.wheels if p.name.startswith("llama_cpp_python-") and p.name.endswith(".tar.gz")]
        if not sources:
            raise WheelhouseError(f"{self.actor}: the install path builds llama-cpp-python on the host, but the "
                                  "wheelhouse has no llama-cpp-python source")
        narrate("install", f"building llama-cpp-python on the host from the pushed source ({path.build}, every CPU "
                           f"variant; takes minutes) with CMAKE_ARGS='{path.cmake_args}'")
        env = {**offline, **engine_build.build_env(path.build or "cpu")}
        started = time.monotonic()
        await run(conn, Command.of(*base, "--force-reinstall", "--no-deps", "--no-cache-dir",
                                   posixpath.join(self._path("wheelhouse"), sources[0].name), env=env),
                  what=f"{self.actor}: building llama-cpp-python ({path.build})", timeout=3600)
        narrate("install", f"llama-cpp-python built on the host in {time.monotonic() - started:.0f} s")

    # launch, tunnel, stop -----------------------------------------------------------------

    async def launch(self, narrate: Narrate) -> None:
        """Start the hive detached, then attach: the forwards open and the hive learns where its
        heartbeats go (it sends none before that)."""
        conn = await self.connected()
        env = {}
        if self.secret_path is not None:
            self.secret = write_secret(self.secret_path)
            env[ENV] = await self._push_token(conn)
        config = dataclasses.replace(
            self.hive_settings, name=self.name, queen_url="", home=Path(self.home),
            models_dir=Path(self._path("models")), serve=ServeOptions("127.0.0.1", 0),
            memory_budget=memory_budget(self.hive_settings.memory_budget,
                                        int(self.entry.memory) if self.entry.memory is not None else None),
        )
        command = Command.of(self._path("venv", "bin", "python"), "-m", "rbee.hive", "--detach", *to_args(config),
                             env=env)
        narrate("launch", f"starting {self.actor} (detached)")
        output = await run(conn, command, what=f"{self.actor}: starting the hive", timeout=90)
        state = json.loads(output.strip().splitlines()[-1])
        self.launched_here = True
        await self.attach(int(state["url"].rsplit(":", 1)[1]), rotate=False)

    def _read_secret(self) -> str | None:
        if self.secret_path is None:
            return None
        try:
            return self.secret_path.read_text().strip() or None
        except OSError:
            return None

    async def _push_token(self, conn: asyncssh.SSHClientConnection, secret: str | None = None) -> str:
        """The hive's secret reaches the host in a 0600 file over SFTP; only its path is on a command line."""
        path = self._path("token")
        async with conn.start_sftp_client() as sftp:
            await sftp.makedirs(self.home, exist_ok=True)
            async with sftp.open(path, "w", asyncssh.SFTPAttrs(permissions=0o600)) as handle:
                await handle.write(str(secret or self.secret))
            await sftp.chmod(path, 0o600)
        return path

    @property
    def hive_address(self) -> str:
        """The hive's own address on its host, behind the local forward: its proofs are bound to it."""
        return f"127.0.0.1:{self.hive_port}" if self.hive_port is not None else ""

    async def attach(self, hive_port: int, rotate: bool = True) -> None:
        """Tunnel to a hive already running on the host (after a queen restart or a re-run);
        a re-attach rotates its secret (the old one may have gone to a port someone else took)."""
        self.hive_port = hive_port
        await self._open_forwards(hive_port)
        await self._tell_hive_queen_url(rotate=rotate)

    async def _open_forwards(self, hive_port: int) -> None:
        conn = await self.connected()
        for listener in self._forwards:
            listener.close()
        self._forwards = []
        local = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", hive_port)
        remote = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", self.queen_port)
        self._forwards = [local, remote]
        self.hive_url = f"http://127.0.0.1:{local.get_port()}"
        self.queen_url_there = f"http://127.0.0.1:{remote.get_port()}"

    async def _tell_hive_queen_url(self, rotate: bool) -> None:
        """Tell the hive where its queen is now (the new remote forward, and the queen's own
        address behind it), once the hive proved it holds its secret. With ``rotate``, a new
        secret goes to the host over SFTP first and the hive switches to it in this call."""
        fresh = secrets.token_urlsafe(32) if rotate and self.secret and self.secret_path is not None else None
        if fresh is not None:
            await self._push_token(await self.connected(), fresh)
        callee = Callee(self.secret, self.hive_address) if self.secret else None
        async with secret_client(self.secret, callee, base_url=self.hive_url, timeout=10) as http:
            response = await http.post("/v1/admin/queen", json={
                "url": self.queen_url_there, "address": f"127.0.0.1:{self.queen_port}", "rotate": fresh is not None})
            response.raise_for_status()
        if fresh is not None and self.secret_path is not None:
            self.secret = write_secret(self.secret_path, fresh)

    async def stop_hive(self, grace: float = 20.0) -> bool:
        """Stop the hive (it stops its workers first). True if one was running."""
        if not self.home:
            await self.probe()
        result = await self.script("stop", self.home, str(grace), what="stopping the hive", timeout=grace + 30)
        self.hive_port = None
        self.hive_url = ""
        self.launched_here = False
        return bool(result.get("was_running"))

    async def tail(self, lines: int) -> list[str]:
        if not self.home:
            await self.probe()
        result = await self.script("tail", self.home, str(lines), what="reading the hive log")
        return list(result.get("lines", []))

    async def close(self) -> None:
        self._closing = True
        for listener in self._forwards:
            listener.close()
        self._forwards = []
        if self.conn is not None:
            self.conn.close()
            with contextlib.suppress(Exception):
                await self.conn.wait_closed()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
