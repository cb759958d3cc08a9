"""``python -m rbee.queen``: the orchestrator. Started by `rbee queen start`, or by a
keeper for one command (ephemeral)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from rbee import __version__
from rbee.config import QueenConfig, from_args
from rbee.errors import RbeeError
from rbee.link.auth import ENV, load_token, secret_file
from rbee.link.serving import Listen, run_role, run_server, setup_logging
from rbee.link.spawn import listening_url
from rbee.queen.app import create_app
from rbee.queen.service import Queen

log = logging.getLogger("rbee.queen")


async def main(config: QueenConfig) -> int:
    serve = config.serve
    url = listening_url(serve.fd, serve.host, serve.port)
    # the hives and workers this queen starts read the same secret file
    os.environ[ENV] = str(secret_file(home=config.home))
    queen = Queen(config, url, load_token())
    app = create_app(queen)
    watcher = asyncio.create_task(queen.watch_heartbeats())
    reattach = asyncio.create_task(queen.fleet.reattach())
    log.info("queen %s serving at %s (%s)", __version__, url, "ephemeral" if config.ephemeral else "persistent")
    try:
        await run_server(
            app, Listen(serve.host, serve.port, serve.fd), queen.stop, parent_pid=serve.parent_pid, on_stop=queen.close
        )
    finally:
        for task in (watcher, reattach):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await queen.close()
    return 0


if __name__ == "__main__":
    setup_logging("queen")
    try:
        sys.exit(run_role(main(from_args(QueenConfig, sys.argv[1:]))))
    except RbeeError as exc:
        print(f"rbee queen: {exc.message}", file=sys.stderr)
        sys.exit(2)
