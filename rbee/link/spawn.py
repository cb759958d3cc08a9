"""Start a peer role as a child process and wait until it answers.

The parent binds the listening socket itself and hands it down (``--fd``):
the port is known before the child starts, two children can never race for
one, and connections made before the child is up wait in the backlog.
The child's output goes to a log file whose tail becomes the error message
when the child dies before it is ready: fail fast, with the real cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rbee.engine import crash
from rbee.errors import StartupError
from rbee.link.auth import bearer
from rbee.link.transport import async_client


def bind_loopback(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket the child will inherit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def listening_url(serve_fd: int | None, host: str, port: int) -> str:
    """The URL a role serves at, also when it serves on a socket inherited as ``serve_fd``."""
    if serve_fd is not None:
        with socket.socket(fileno=os.dup(serve_fd)) as sock:
            host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class Child:
    """A role process this process started and must stop."""

    name: str
    process: asyncio.subprocess.Process
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def exit_reason(self) -> str:
        return crash.exit_reason(self.process.returncode)

    def exit_message(self) -> str:
        tail = log_tail(self.log_path)
        return f"{self.name} {self.exit_reason()}" + (f"; its last output ({self.log_path}):\n{tail}" if tail else "")

    async def wait_ready(self, path: str = "/health", timeout: float = 60.0, token: str | None = None) -> Any:
        """Poll ``path`` until 200 and return its JSON body (None if it has none); fail at once
        if the child exits, or at the deadline."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        async with async_client(base_url=self.url, timeout=2.0, headers=bearer(token)) as http:
            while True:
                if not self.alive:
                    raise StartupError(self.exit_message())
                with contextlib.suppress(httpx.HTTPError):
                    answer = await http.get(path)
                    if answer.status_code == 200:
                        with contextlib.suppress(ValueError):
                            return answer.json()
                        return None
                if time.monotonic() > deadline:
                    raise StartupError(
                        f"{self.name} did not become ready within {timeout:.0f} s; see {self.log_path}:\n"
                        + log_tail(self.log_path)
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.process.wait(), delay)
                delay = min(delay * 1.5, 0.25)

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if not self.alive:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


async def spawn(
    name: str,
    module: str,
    args: Sequence[str],
    *,
    sock: socket.socket,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    tied: bool = True,
) -> Child:
    """Start ``python -m module args --fd N``, serving on ``sock``.

    A ``tied`` child also gets ``--parent-pid`` and exits when this process is gone;
    an untied one (a persistent queen or hive) outlives us on purpose.
    """
    host, port = sock.getsockname()[:2]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = sock.fileno()
    argv = [sys.executable, "-m", module, *args, "--fd", str(fd)]
    if tied:
        argv += ["--parent-pid", str(os.getpid())]
    with open(log_path, "ab") as log_file:  # noqa: ASYNC230 - opening a log is instant
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(fd,),
            env={**(os.environ if env is None else env), "RBEE_LOG_FILE": str(log_path)},
            # Own session: a Ctrl+C in the terminal reaches the keeper only, which then
            # shuts the chain down in order instead of every process dying at once.
            start_new_session=True,
        )
    sock.close()
    return Child(name=name, process=process, url=f"http://{host}:{port}", log_path=log_path)
