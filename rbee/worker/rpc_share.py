"""A helper host's share of a split model: llama.cpp's RPC server, fenced off.

    python -m rbee.worker.rpc_share --socket DIR/rpc.sock --cache DIR [--threads N] [--parent-pid P]

The process first moves into a network namespace of its own (``rbee.link.private``), so the
server's TCP port is on a loopback nobody else has; the only way in is the unix socket, in a
0700 folder of the hive's user. The main worker's layers arrive as the RPC protocol's tensors;
those over 10 MB are kept in ``--cache`` by hash, so the next load of the same model sends only
the hashes. Prints ``ready <socket>`` once the server answers; ends when its parent (the hive)
is gone, on SIGTERM, or if the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: the server's port, on the namespace's own loopback (nothing else listens there)
RPC_PORT = 50052
READY_TIMEOUT_S = 60.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rbee.worker.rpc_share", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", type=Path, required=True, help="the unix socket to serve (its folder: 0700)")
    parser.add_argument("--cache", type=Path, default=None, help="where large tensors are kept by hash")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    parser.add_argument("--parent-pid", type=int, default=None)
    return parser.parse_args(argv)


def _server_answers(port: int, deadline: float) -> bool:
    import socket

    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


async def _watch(server_down: threading.Event, interval: float = 0.25) -> None:
    """Returns once llama.cpp's server thread has ended (polled: a thread blocked on the event
    would keep the loop's executor, and so this process, from ending)."""
    while not server_down.is_set():  # noqa: ASYNC110 - the event is a thread's, not the loop's
        await asyncio.sleep(interval)


async def serve(args: argparse.Namespace, server_down: threading.Event) -> int:
    from rbee.link.private import private_folder, unix_to_tcp
    from rbee.link.serving import watch_parent

    if args.cache is not None:
        private_folder(args.cache)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchers: list[asyncio.Task[Any]] = [asyncio.create_task(_watch(server_down))]
    if args.parent_pid is not None:
        watchers.append(asyncio.create_task(watch_parent(args.parent_pid, stop)))
    watchers.append(asyncio.create_task(stop.wait()))
    bridge = await unix_to_tcp(args.socket, RPC_PORT)
    os.write(args.ready_fd, f"ready {args.socket}\n".encode())
    try:
        await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        bridge.close()
        with contextlib.suppress(FileNotFoundError):
            args.socket.unlink()
        for task in watchers:
            task.cancel()
    return 1 if server_down.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # llama.cpp's server prints its banner and every connection on stdout: that goes to stderr
    # (the log), so stdout carries the one "ready" line the hive waits for
    args.ready_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from rbee.errors import RbeeError
    from rbee.link.private import enter_private_network

    try:
        enter_private_network()  # first, while this process has one thread
        from rbee.engine import rpc

        rpc.rpc_registry()
    except RbeeError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        return 2
    server_down = threading.Event()

    def run() -> None:
        try:
            rpc.serve(f"127.0.0.1:{RPC_PORT}", args.cache, args.threads or os.cpu_count() or 1)
        finally:
            server_down.set()

    threading.Thread(target=run, name="rpc-server", daemon=True).start()
    if not _server_answers(RPC_PORT, time.monotonic() + READY_TIMEOUT_S) or server_down.is_set():
        print("error: llama.cpp's RPC server did not start (its output is above)", file=sys.stderr, flush=True)
        return 2
    return asyncio.run(serve(args, server_down))


if __name__ == "__main__":
    sys.exit(main())
