"""Find the queen, or start one: ephemeral for one command, or persistent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from rbee.config import QueenConfig, ServeOptions, to_args
from rbee.errors import LinkError, StartupError, UnprovenPeerError
from rbee.link.auth import CHALLENGE, PROOF, proves
from rbee.link.spawn import Child, bind_loopback, spawn
from rbee.link.transport import async_client, dialled_address, secret_client


@dataclass
class QueenHandle:
    url: str
    child: Child | None  # set when this command started the queen and must stop it


async def queen_answers(url: str, timeout: float = 1.0, token: str | None = None) -> bool:
    """Does this user's queen answer at ``url``? The secret is not sent to find out: the
    server must prove it holds it (an HMAC of a fresh challenge). Something else on the
    port that claims to be a queen is refused before anything is sent to it."""
    challenge = secrets.token_hex(16)
    async with async_client(timeout=timeout) as http:
        try:
            response = await http.get(f"{url}/health", headers={CHALLENGE: challenge})
        except httpx.HTTPError:
            return False
    try:
        role = response.json().get("role") if response.status_code == 200 else None
    except ValueError:
        role = None
    if role != "queen":
        return False
    parts = urlsplit(url)
    address = dialled_address(parts.hostname or "", parts.port or 80)
    if token is None or proves(token, challenge, address, response.headers.get(PROOF)):
        return True
    raise UnprovenPeerError(
        f"something at {url} answers as an rbee queen but cannot prove it holds your secret (RBEE_HOME/secret) "
        "and listens there itself: another user's queen, or an impostor relaying to yours. Nothing was sent to it. "
        "Point RBEE_QUEEN_URL elsewhere, or stop it"
    )


async def start_queen(config: QueenConfig, *, ephemeral: bool, port: int = 0, token: str | None = None) -> Child:
    host = config.serve.host
    sock = bind_loopback(host, port)
    name = "queen (ephemeral)" if ephemeral else "queen"
    log_name = f"queen-ephemeral-{os.getpid()}.log" if ephemeral else "queen.log"
    child = await spawn(
        name, "rbee.queen", to_args(config), sock=sock, log_path=config.home / "logs" / log_name,
        env=dict(os.environ), tied=ephemeral,
    )
    try:
        await child.wait_ready("/health", timeout=30.0, token=token)
    except BaseException:
        await child.stop(grace=2.0)
        raise
    return child


@contextlib.asynccontextmanager
async def queen_session(
    url: str, home: Path, heartbeat_interval: float, inventory: Path | None = None, token: str | None = None
) -> AsyncIterator[QueenHandle]:
    """The queen at ``url`` if one answers; otherwise an ephemeral queen for this block,
    stopped (with everything it started) when the block ends."""
    if await queen_answers(url, token=token):
        yield QueenHandle(url, None)
        return
    config = QueenConfig(
        home=home, heartbeat_interval=heartbeat_interval, ephemeral=True, serve=ServeOptions(host="127.0.0.1"),
        inventory=str(inventory or ""),
    )
    child = await start_queen(config, ephemeral=True, token=token)
    try:
        yield QueenHandle(child.url, child)
    finally:
        await child.stop(grace=20.0)


async def start_persistent(
    url: str, home: Path, heartbeat_interval: float, inventory: Path | None = None, token: str | None = None
) -> Child | None:
    """`rbee queen start`: a queen that outlives this command. None if one already answers."""
    if await queen_answers(url, token=token):
        return None
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise StartupError(f"rbee starts queens on this machine only; {url} is not local")
    config = QueenConfig(
        home=home, heartbeat_interval=heartbeat_interval, serve=ServeOptions(host="127.0.0.1"),
        inventory=str(inventory or ""),
    )
    child = await start_queen(config, ephemeral=False, port=parts.port or 80, token=token)
    (home / "run").mkdir(parents=True, exist_ok=True)
    (home / "run" / "queen.pid").write_text(str(child.pid))
    return child


async def stop_persistent(url: str, timeout: float = 30.0, token: str | None = None) -> bool:
    """Ask the queen at ``url`` to stop; wait until it no longer answers. False if none ran."""
    if not await queen_answers(url, token=token):  # proved first: the secret goes only to our queen
        return False
    async with secret_client(token, timeout=5.0) as http:
        try:
            await http.post(f"{url}/v1/admin/shutdown")
        except httpx.HTTPError:
            return False
    deadline = time.monotonic() + timeout
    while await queen_answers(url, timeout=0.5, token=token):
        if time.monotonic() > deadline:
            raise LinkError(f"the queen at {url} is still answering {timeout:.0f} s after the shutdown request")
        await asyncio.sleep(0.1)
    return True

