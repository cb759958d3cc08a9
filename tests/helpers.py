"""Test helpers: serve a Quart app for real on loopback, and poll with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from quart import Quart

from rbee.link.client import LinkClient
from rbee.link.events import Event
from rbee.link.serving import Listen, run_server
from rbee.link.spawn import bind_loopback

T = TypeVar("T")

RBEE = [sys.executable, "-m", "rbee.keeper"]


def interruptible() -> None:
    """``preexec_fn`` for a child a test will SIGINT: a suite started in the background without
    job control (``cmd &`` in a script) hands every process SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler, so the interrupt would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def owner_token() -> str:
    """The secret of the rbee this test runs (RBEE_HOME/secret, made on first use), as the
    owner's own keeper or OpenAI client would use it."""
    from rbee.link.auth import load_token

    return load_token()


def owner_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {owner_token()}"}


@contextlib.asynccontextmanager
async def served(app: Quart, on_stop: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[str]:
    """Run ``app`` on Hypercorn on a free loopback port in this loop; yield its URL."""
    sock = bind_loopback()
    host, port = sock.getsockname()[:2]
    fd = os.dup(sock.fileno())  # Hypercorn owns and closes this copy
    sock.close()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_server(app, Listen(fd=fd), stop, on_stop=on_stop, handle_signals=False, graceful_timeout=1.0)
    )
    try:
        yield f"http://{host}:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def queen(rbee_env: dict[str, str], inventory: str = "", folder: Path | None = None) -> AsyncIterator[str]:
    """An ephemeral queen for one test (it starts the hive and workers on demand), with the
    inventory text written to ``folder``/inventory.toml when given; yields its URL."""
    from rbee.config import QueenConfig, ServeOptions
    from rbee.keeper.session import start_queen

    path = ""
    if inventory:
        assert folder is not None, "an inventory needs a folder to live in"
        path = str(folder / "inventory.toml")
        Path(path).write_text(inventory)
    config = QueenConfig(home=Path(rbee_env["RBEE_HOME"]), heartbeat_interval=0.5, ephemeral=True,
                         serve=ServeOptions(), inventory=path)
    child = await start_queen(config, ephemeral=True)
    try:
        yield child.url
    finally:
        await child.stop(grace=20.0)


async def eventually(check: Callable[[], Awaitable[T] | T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value: {value!r})")
        await asyncio.sleep(interval)


async def worker_stops(worker_url: str, most: int, settle: float = 0.3) -> float:
    """Wait until the worker is idle again, then check it produced nothing more (it really
    stopped generating, not just stopped sending). Returns when it was first seen idle."""
    import httpx

    async def idle() -> dict[str, Any] | None:
        async with httpx.AsyncClient(headers=owner_headers(), base_url=worker_url, timeout=2) as http:
            health = dict((await http.get("/health")).json())
        idle = health["state"] == "ready" and not health.get("load", {}).get("slots_busy")
        return health if idle else None

    settled = int((await eventually(idle, timeout=5, interval=0.02))["tokens_generated"])
    idle_at = time.monotonic()
    await asyncio.sleep(settle)
    after = await idle()
    assert after is not None and after["tokens_generated"] == settled, "the worker kept generating"
    assert settled < most, f"the worker generated {settled} tokens before it stopped"
    return idle_at


async def warm_up(client: LinkClient, extra: dict[str, Any] | None = None) -> list[Event]:
    """A two-token job: brings the hive and a worker up (or reuses them)."""
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0.0, "seed": 7, **(extra or {})}
    return [event async for event in client.run(body)]


async def run_rbee(
    args: list[str], env: dict[str, str], timeout: float = 90
) -> tuple[int, list[tuple[float, bytes]], str]:
    """Run the CLI; return its exit code, stdout chunks with arrival times, and stderr."""
    process = await asyncio.create_subprocess_exec(
        *RBEE, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    chunks: list[tuple[float, bytes]] = []

    async def read_stdout() -> None:
        while chunk := await process.stdout.read(64):  # type: ignore[union-attr]
            chunks.append((time.monotonic(), chunk))

    stderr_task = asyncio.ensure_future(process.stderr.read())
    await asyncio.wait_for(asyncio.gather(read_stdout(), process.wait()), timeout)
    return process.returncode or 0, chunks, (await stderr_task).decode()
