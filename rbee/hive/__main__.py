"""``python -m rbee.hive``: the per-host daemon. Started by the queen (or `rbee hive start`).

``--detach`` starts the daemon in the background, detached from this process and
its SSH session, writes ``RBEE_HOME/run/hive.json`` (pid, url) and prints it: the
queen launches remote hives this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time

from rbee import __version__
from rbee.config import HiveConfig, from_args, to_args
from rbee.errors import RbeeError
from rbee.hive.app import create_app
from rbee.hive.models import ModelCatalog
from rbee.hive.provision import HubDownloader
from rbee.hive.service import Hive
from rbee.hive.supervisor import Supervisor
from rbee.link.auth import load_token
from rbee.link.heartbeat import send_heartbeats
from rbee.link.serving import Listen, run_role, run_server, setup_logging
from rbee.link.spawn import bind_loopback, listening_url, spawn

log = logging.getLogger("rbee.hive")


async def main(config: HiveConfig) -> int:
    serve = config.serve
    if serve.fd is None:
        sock = bind_loopback(serve.host, serve.port)  # port 0: any free port
        fd = os.dup(sock.fileno())
        sock.close()
        serve = type(serve)(serve.host, serve.port, fd, serve.parent_pid)
    url = listening_url(serve.fd, serve.host, serve.port)
    token = load_token(home=config.home)  # the secret its queen gave it (RBEE_TOKEN_FILE)
    hive = Hive(config, Supervisor(config, url, token), ModelCatalog(config.models_dir, HubDownloader()), token)
    app = create_app(hive)

    def payload() -> dict[str, object]:
        return hive.status().model_dump(mode="json")

    tasks = [
        asyncio.create_task(hive.supervisor.watch_heartbeats()),
        asyncio.create_task(
            send_heartbeats(
                lambda: hive.queen, f"/v1/hives/{config.name}/heartbeat", payload, config.heartbeat_interval,
                on_lost=hive.queen_lost,
            )
        ),
    ]
    log.info("%s %s serving at %s", config.actor, __version__, url)
    try:
        await run_server(
            app, Listen(serve.host, serve.port, serve.fd), hive.stop, parent_pid=serve.parent_pid, on_stop=hive.close
        )
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await hive.close()
    return 0


async def detach(config: HiveConfig) -> int:
    """Start the hive in the background and report where it serves."""
    run_dir = config.home / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    child = await spawn(
        config.actor, "rbee.hive", to_args(config), sock=bind_loopback(config.serve.host, config.serve.port),
        log_path=config.home / "logs" / "hive.log", env=dict(os.environ), tied=False,
    )
    try:
        await child.wait_ready("/health", timeout=60.0, token=load_token())
    except RbeeError as exc:
        await child.stop(grace=2.0)
        print(exc.message, file=sys.stderr)
        return 1
    state = {"pid": child.pid, "url": child.url, "version": __version__, "started": time.time(), "name": config.name}
    tmp = run_dir / "hive.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / "hive.json")
    print(json.dumps(state))
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    detached = "--detach" in argv
    if detached:
        argv.remove("--detach")
    try:
        config = from_args(HiveConfig, argv)
        if not detached:
            setup_logging(config.actor)
        sys.exit(run_role(detach(config) if detached else main(config)))
    except RbeeError as exc:
        print(f"rbee hive: {exc.message}", file=sys.stderr)
        sys.exit(2)
