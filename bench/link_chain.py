"""What the link costs with no engine: a fake worker → a relay (as a hive runs it) → a client.

The fake worker emits tokens on a timer, at the engine's rate or as fast as it can; the
relay is rbee's own link code (JobRegistry, add_job_routes, LinkClient, relay). This
separates the relay's CPU per token from an engine's cache and core pressure, and puts
it next to the machine's floor: what one bare asyncio timer wake-up costs.

    python -m bench.link_chain worker PORT GAP      (internal: one role per process)
    python -m bench.link_chain relay PORT WORKER_PORT
    RBEE_BENCH_UVLOOP=1 python -m bench.link_chain 65   (the same on uvloop, every role)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import httpx

from bench.systems import free_port, wait_answering


async def _serve(app: Any, port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    await serve(app, config)


def _app(name: str, make: Any) -> Any:
    from quart import Quart

    from rbee.link.jobs import JobRegistry
    from rbee.link.server import add_job_routes

    app = Quart(name)

    @app.get("/cpu")
    async def cpu() -> dict[str, float]:
        return {"cpu": time.process_time()}

    add_job_routes(app, JobRegistry(f"{name}:bench"), make)
    return app


async def fake_worker(port: int, gap: float) -> None:
    from rbee.link import events
    from rbee.link.jobs import Job

    def make(body: dict[str, Any]) -> Any:
        async def produce(job: Job) -> None:
            started = time.monotonic()
            for index in range(body["max_tokens"]):
                await asyncio.sleep(gap)
                job.emit(events.token(index, " bee"))
            job.emit(events.end(body["max_tokens"], time.monotonic() - started, "length"))

        return produce

    await _serve(_app("worker", make), port)


async def relay_server(port: int, worker_port: int) -> None:
    from rbee.link.client import LinkClient
    from rbee.link.jobs import Job
    from rbee.link.relay import relay

    client = LinkClient(f"http://127.0.0.1:{worker_port}", "worker:bench", stall_timeout=300)

    def make(body: dict[str, Any]) -> Any:
        async def produce(job: Job) -> None:
            await relay(job, client, body)

        return produce

    await _serve(_app("relay", make), port)


async def _wakeup_cost(gap: float, count: int) -> float:
    before = time.process_time()
    for _ in range(count):
        await asyncio.sleep(gap)
    return (time.process_time() - before) / count


async def _relay_cost(gap: float, tokens: int, jobs: int) -> tuple[float, float]:
    """(relay, client) CPU seconds per token with the fake worker emitting every ``gap`` s."""
    from rbee.link.client import LinkClient

    worker_port, relay_port = free_port(), free_port()
    here = [sys.executable, "-m", "bench.link_chain"]
    children = [await asyncio.create_subprocess_exec(*here, *args, stderr=subprocess.DEVNULL)
                for args in (("worker", str(worker_port), str(gap)), ("relay", str(relay_port), str(worker_port)))]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay_port}") as http:
            await wait_answering(http, "/cpu", lambda: any(c.returncode is not None for c in children),
                                 "the link benchmark's relay or fake worker", 30)
            async with LinkClient(f"http://127.0.0.1:{relay_port}", "relay:bench", stall_timeout=None) as client:
                async def run(count: int) -> int:
                    return sum([event.type == "token" async for event in client.run({"max_tokens": count})])

                await run(5)  # warm: connections open, code paths taken
                relay_before, client_before = (await http.get("/cpu")).json()["cpu"], time.process_time()
                total = 0
                for _ in range(jobs):
                    total += await run(tokens // jobs)
                relay_after, client_after = (await http.get("/cpu")).json()["cpu"], time.process_time()
    finally:
        for child in children:
            child.terminate()
            await asyncio.wait_for(child.wait(), 10)
    return (relay_after - relay_before) / total, (client_after - client_before) / total


async def link_costs(tokens_per_s: float, tokens: int = 600) -> dict[str, float]:
    gap = 1 / tokens_per_s
    relay, client = await _relay_cost(gap, tokens, jobs=4)
    burst_relay, burst_client = await _relay_cost(0.0, tokens * 5, jobs=4)
    return {
        f"bare asyncio timer wake-up every {gap * 1000:.0f} ms, CPU each (µs)": await _wakeup_cost(gap, 300) * 1e6,
        f"relay CPU per token at {tokens_per_s:.0f} tok/s (µs)": relay * 1e6,
        f"client CPU per token at {tokens_per_s:.0f} tok/s (µs)": client * 1e6,
        "relay CPU per token, worker as fast as it can (µs)": burst_relay * 1e6,
        "client CPU per token, worker as fast as it can (µs)": burst_client * 1e6,
    }


def run(main: Any) -> Any:
    """asyncio.run, or uvloop's with RBEE_BENCH_UVLOOP=1 (to see whether uvloop helps the link)."""
    if os.environ.get("RBEE_BENCH_UVLOOP") == "1":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "worker":
        run(fake_worker(int(sys.argv[2]), float(sys.argv[3])))
    elif role == "relay":
        run(relay_server(int(sys.argv[2]), int(sys.argv[3])))
    else:
        print(run(link_costs(float(role))))
