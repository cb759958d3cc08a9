"""The shares of split models this hive serves: one RPC server process each
(``python -m rbee.worker.rpc_share``), fenced in a network namespace of its own behind a unix
socket in the hive's run folder (decision 86).

A share is admitted like a worker, under the same lock (``Supervisor.start_share``): its bytes
count against the host's free memory and its `memory` cap, and are held until it stops. It lives
as long as the split job's main worker: the queen stops it (``DELETE /v1/shares/<id>``), the hive
stops every share when it stops, and a share ends by itself when the hive is gone
(``--parent-pid``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from rbee.config import HiveConfig
from rbee.errors import NoCapacityError, StartupError, UnknownWorkerError
from rbee.link.schemas import ShareView
from rbee.link.spawn import log_tail

SHARE_MODULE = "rbee.worker.rpc_share"
READY_TIMEOUT_S = 60.0


@dataclass(eq=False)
class Share:
    share_id: str
    model: str
    bytes: int
    socket: Path
    process: asyncio.subprocess.Process
    log_path: Path
    started: float = field(default_factory=time.time)
    reason: str = ""
    #: what its RPC cache holds from this host's own copy of the model, in words
    cache: str = ""

    @property
    def state(self) -> str:
        """up; stopped (SIGSTOP: its main worker's calls hang); or how it ended."""
        if self.process.returncode is not None:
            return self.reason or f"exited with {self.process.returncode}"
        with contextlib.suppress(psutil.Error):
            if psutil.Process(self.process.pid).status() == psutil.STATUS_STOPPED:
                return "stopped"
        return "up"

    def view(self) -> ShareView:
        return ShareView(share_id=self.share_id, model=self.model, bytes=self.bytes, socket=str(self.socket),
                         pid=self.process.pid, state=self.state, since=self.started, cache=self.cache)


class Shares:
    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.records: dict[str, Share] = {}

    @property
    def reserved(self) -> int:
        return sum(share.bytes for share in self.records.values() if share.process.returncode is None)

    @property
    def cache(self) -> Path:
        """llama.cpp's RPC cache on this host, one for every share (its files are named by content)."""
        return self.config.home / "rpc-cache"

    def folder(self, share_id: str) -> Path:
        return self.config.home / "run" / "shares" / share_id

    def check(self, model: str, need: int, room: int) -> None:
        """NoCapacityError unless ``room`` (what a new worker could take now) holds the share."""
        if need > room:
            raise NoCapacityError(
                f"{self.config.actor} cannot serve a {need / 1e9:.2f} GB share of {model}: {room / 1e9:.2f} GB is "
                "free within its `memory`. Stop a worker there (`rbee workers stop`) or raise its `memory`")

    async def start(self, model: str, need: int, counted: Callable[[], None] = lambda: None) -> Share:
        """A running share of ``need`` bytes of ``model`` (admitted already); ``counted()`` is
        called once its record counts the bytes."""
        share_id = secrets.token_hex(4)
        folder = self.folder(share_id)
        socket = folder / "rpc.sock"
        log_path = self.config.home / "logs" / f"share-{share_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", SHARE_MODULE, "--socket", str(socket), "--cache", str(self.cache),
                "--parent-pid", str(os.getpid())]
        with open(log_path, "ab") as log_file:  # noqa: ASYNC230 - opening a log is instant
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                start_new_session=True)
        share = Share(share_id, model, need, socket, process, log_path)
        self.records[share_id] = share
        counted()
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.decode().strip() != f"ready {socket}":
            await self.stop(share_id, "did not start")
            raise StartupError(f"{self.config.actor} could not start a share of {model}: "
                               f"{log_tail(log_path) or 'the RPC server printed nothing'}")
        return share

    async def stop(self, share_id: str, reason: str = "stopped") -> Share:
        share = self.records.get(share_id)
        if share is None:
            raise UnknownWorkerError(f"no share {share_id!r} on {self.config.actor} "
                                     f"(shares: {', '.join(self.records) or 'none'})")
        share.reason = share.reason or reason
        process = share.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a stopped one cannot act on SIGTERM
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        del self.records[share_id]
        if reason != "did not start":  # kept for the error message and a post-mortem
            share.log_path.unlink(missing_ok=True)
        share.socket.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            share.socket.parent.rmdir()
        return share

    async def stop_all(self, reason: str = "hive shutting down") -> None:
        await asyncio.gather(*(self.stop(share_id, reason) for share_id in list(self.records)))

    def views(self) -> list[ShareView]:
        return [share.view() for share in self.records.values()]
