"""``python -m rbee.worker``: one process, one model. Started by a hive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from rbee.config import WorkerConfig, from_args
from rbee.errors import RbeeError
from rbee.link.auth import Callee, load_token
from rbee.link.client import LinkClient
from rbee.link.heartbeat import send_heartbeats
from rbee.link.jobs import JobRegistry
from rbee.link.serving import Listen, run_role, run_server, setup_logging
from rbee.worker.app import create_app, info
from rbee.worker.backends.base import create_backend
from rbee.worker.runner import ModelRunner

log = logging.getLogger("rbee.worker")


async def attach_shares(sockets: list[Path]) -> list[asyncio.AbstractServer]:
    """Each helper's RPC server, reached through its unix socket, added to llama.cpp's devices
    before the model loads. llama.cpp's client dials TCP, so each gets a loopback listener of
    this process that hangs up on every other user (rbee.link.private.tcp_to_unix)."""
    from rbee.engine import rpc
    from rbee.link.private import Dial, tcp_to_unix

    def dialer(path: Path) -> Dial:
        return lambda: asyncio.open_unix_connection(str(path))

    bridges = []
    try:
        for path in sockets:
            server, port = await tcp_to_unix(dialer(path))
            bridges.append(server)
            await asyncio.to_thread(rpc.attach, f"127.0.0.1:{port}")
    except BaseException:
        for server in bridges:
            server.close()
        raise
    return bridges


async def main(config: WorkerConfig) -> int:
    stop = asyncio.Event()
    split = [float(part) for part in config.tensor_split.split(",") if part]
    backend = create_backend(config.backend, n_ctx=config.n_ctx, threads=config.threads,
                             gpu_layers=config.gpu_layers, tensor_split=split, slots=config.slots,
                             queue_limit=config.queue_limit)
    runner = ModelRunner(backend, config.model_path)
    registry = JobRegistry(config.actor, ping=config.ping_interval, resume_grace=config.resume_grace)
    token = load_token()
    app = create_app(config, runner, registry, stop, token)
    hive = LinkClient(config.hive_url, "hive", stall_timeout=10.0, token=token,
                      callee=Callee(token, peer=config.worker_id))  # the hive proves it spawned us
    failure: list[str] = []

    shares: list[asyncio.AbstractServer] = []

    async def load() -> None:
        try:
            shares.extend(await attach_shares([Path(p) for p in config.rpc.split(",") if p]))
            await runner.load()
            log.info("%s loaded %s", config.actor, config.model_path)
        except RbeeError as exc:
            failure.append(exc.message)
            stop.set()

    def hive_lost(reason: str) -> None:
        log.error("%s: the hive is gone (%s); exiting", config.actor, reason)
        stop.set()

    loader = asyncio.create_task(load())
    beats = asyncio.create_task(
        send_heartbeats(
            hive,
            f"/v1/workers/{config.worker_id}/heartbeat",
            lambda: info(config, runner),
            config.heartbeat_interval,
            on_lost=hive_lost,
        )
    )

    async def on_stop() -> None:
        await registry.close()

    serve = config.serve
    try:
        await run_server(
            app, Listen(serve.host, serve.port, serve.fd), stop, parent_pid=serve.parent_pid, on_stop=on_stop
        )
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
        await hive.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        runner.close()
        for share in shares:
            share.close()
    if failure:
        print(f"{config.actor}: {failure[0]}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    try:
        worker_config = from_args(WorkerConfig, sys.argv[1:])
        setup_logging(worker_config.actor)
        sys.exit(run_role(main(worker_config)))
    except RbeeError as exc:
        print(f"rbee worker: {exc.message}", file=sys.stderr)
        sys.exit(2)
