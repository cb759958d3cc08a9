"""``python -m rbee.hive``: the per-host daemon. Started by the queen (or `rbee hive start`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from rbee import __version__
from rbee.config import HiveConfig, from_args
from rbee.errors import RbeeError
from rbee.hive.app import Hive, create_app
from rbee.hive.models import ModelCatalog
from rbee.hive.supervisor import Supervisor
from rbee.link.client import LinkClient
from rbee.link.heartbeat import send_heartbeats
from rbee.link.serving import Listen, run_server, setup_logging
from rbee.link.spawn import listening_url

log = logging.getLogger("rbee.hive")


async def main(config: HiveConfig) -> int:
    serve = config.serve
    url = listening_url(serve.fd, serve.host, serve.port)
    hive = Hive(config, Supervisor(config, url), ModelCatalog(config.models_dir))
    app = create_app(hive)
    tasks = [asyncio.create_task(hive.supervisor.watch_heartbeats())]
    queen: LinkClient | None = None
    if config.queen_url:
        queen = LinkClient(config.queen_url, "queen", stall_timeout=10.0)

        def payload() -> dict[str, object]:
            return {**hive.status(), "url": url, "pid": os.getpid()}

        tasks.append(
            asyncio.create_task(
                send_heartbeats(queen, f"/v1/hives/{config.name}/heartbeat", payload, config.heartbeat_interval)
            )
        )
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
        if queen is not None:
            await queen.aclose()
    return 0


if __name__ == "__main__":
    setup_logging()
    try:
        sys.exit(asyncio.run(main(from_args(HiveConfig, sys.argv[1:]))))
    except RbeeError as exc:
        print(f"rbee hive: {exc.message}", file=sys.stderr)
        sys.exit(2)
