"""Run a role's Quart app on Hypercorn until told to stop.

A role stops on SIGTERM/SIGINT, on ``POST /v1/admin/shutdown`` (which sets the
same event), or — when it was started as a helper of another process — when
that parent is gone, so a killed parent never leaves an orphan behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart

from rbee.link import connections
from rbee.link.connections import connection_limit, raise_fd_limit

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listen:
    """Where a server listens: an inherited, already-bound socket (``fd``) or host:port."""

    host: str = "127.0.0.1"
    port: int = 0
    fd: int | None = None

    def bind(self) -> str:
        return f"fd://{self.fd}" if self.fd is not None else f"{self.host}:{self.port}"


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, actor, job id (when there is one), message."""

    def __init__(self, actor: str) -> None:
        super().__init__()
        self.actor = actor

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "actor": self.actor,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("job", "code"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def run_role(main: Awaitable[T]) -> T:
    """Run a role process's main coroutine on uvloop where it is installed, else asyncio's loop.
    Measured with bench/link_chain.py: uvloop cuts a relay's CPU per token by ~10 % at the
    engine's rate and by about half when the engine is fast (GPU rates)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


class RotatingStderrLog(logging.handlers.RotatingFileHandler):
    """The role's log file (``RBEE_LOG_FILE``, where the spawner also sent its stdout and
    stderr), rotated by size. After a rollover fd 1 and 2 are pointed at the new file too, so
    what the engines print and a crash's traceback land in the current log, not a rotated one."""

    def doRollover(self) -> None:
        super().doRollover()
        if self.stream is not None:
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


def log_limit() -> int:
    """Bytes a role's log file may reach before it is rotated (two old files are kept)."""
    raw = os.environ.get("RBEE_LOG_MAX_BYTES", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 20 * 1024 * 1024


def setup_logging(actor: str) -> None:
    """Structured lines into the role's log file under RBEE_HOME/logs (``RBEE_LOG_FILE``, set
    by the spawner), rotated by size; on stderr when run by hand. httpx's per-request lines
    are dropped: heartbeats would flood the log."""
    path = os.environ.get("RBEE_LOG_FILE")
    handler: logging.Handler
    if path:
        handler = RotatingStderrLog(path, maxBytes=log_limit(), backupCount=2)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(JsonLines(actor))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def watch_parent(parent_pid: int, stop: asyncio.Event, interval: float = 0.25) -> None:
    """Set ``stop`` once our parent has died (we were re-parented)."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("parent process %d is gone: shutting down", parent_pid)
            stop.set()
            return
        await asyncio.sleep(interval)


async def run_server(
    app: Quart,
    listen: Listen,
    stop: asyncio.Event,
    *,
    parent_pid: int | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = 3.0,
    handle_signals: bool = True,
) -> None:
    """Serve ``app`` until ``stop`` is set, then run ``on_stop`` (stop children, free models)."""
    loop = asyncio.get_running_loop()
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    config = HypercornConfig()
    config.bind = [listen.bind()]
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    limit = int(os.environ.get("RBEE_MAX_CONNECTIONS", "0")) or connection_limit(raise_fd_limit())
    connections.install(config, limit)  # a cap, idle connections evicted first; 20 s idle timeout
    watcher = loop.create_task(watch_parent(parent_pid, stop)) if parent_pid else None

    async def shutdown_trigger() -> None:
        await stop.wait()
        # End open streams first so the graceful close does not wait on them.
        if on_stop is not None:
            await on_stop()

    try:
        await serve(app, config, shutdown_trigger=shutdown_trigger)
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
