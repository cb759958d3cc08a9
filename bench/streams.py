"""``python -m bench.streams``: rbee with 1 and with 8 streams at once, greedy, through a real
queen, hive and worker on the default model: aggregate tokens/s, the slowest time to first
token, and each stream's own decode rate. Twice each, alternating, so a drift of the machine
shows. Run it from a checkout to compare two versions of rbee on the same machine (its own
``tests/helpers`` starts the queen of that checkout).

``--llama-server``: the same rows from llama.cpp's own server (``-np 8``, built from the same
vendored source by ``bench.llama_tools``), driven the same way, as the baseline."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench import llama_tools
from rbee.link.client import LinkClient
from rbee.link.spawn import bind_loopback
from tests.helpers import eventually, owner_token, queen

PROMPT = "Write a long story about a bee who"


#: one stream: its tokens, its time to first token, its own decode rate (tokens/s)
Stream = Callable[[int], Awaitable[tuple[int, float, float]]]


async def streams(one: Stream, n: int, tokens: int) -> dict[str, Any]:
    started = time.monotonic()
    done = await asyncio.gather(*(one(tokens) for _ in range(n)))
    wall = time.monotonic() - started
    made = sum(d[0] for d in done)
    return {"streams": n, "tokens": made, "aggregate_tok_s": round(made / wall, 1),
            "slowest_ttft_ms": round(max(d[1] for d in done) * 1000),
            "each_tok_s": round(sum(d[2] for d in done) / n, 1)}


def rbee_stream(client: LinkClient) -> Stream:
    async def one(tokens: int) -> tuple[int, float, float]:
        started, first, count, rate = time.monotonic(), 0.0, 0, 0.0
        async for event in client.run({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0}):
            if event.type == "token":
                count += 1
                first = first or time.monotonic()
            elif event.type == "end":
                rate = float(event["tokens_per_s"])
        return count, first - started, rate

    return one


def server_stream(http: httpx.AsyncClient) -> Stream:
    async def one(tokens: int) -> tuple[int, float, float]:
        started, first, count, rate = time.monotonic(), 0.0, 0, 0.0
        body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "stream": True, "cache_prompt": False}
        async with http.stream("POST", "/completion", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("content"):
                    count += 1
                    first = first or time.monotonic()
                if event.get("stop"):
                    rate = float((event.get("timings") or {}).get("predicted_per_second") or 0.0)
        return count, first - started, rate

    return one


@contextlib.asynccontextmanager
async def llama_server(model: Path, parallel: int) -> AsyncIterator[httpx.AsyncClient]:
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()
    binary = llama_tools.ensure(os.environ.get("RBEE_CPU_VARIANT", "haswell")) / "llama-server"
    process = await asyncio.create_subprocess_exec(
        str(binary), "-m", str(model), "--port", str(port), "-np", str(parallel), "-c", str(4096 * parallel),
        "-t", str(os.cpu_count() or 1), "-ngl", "0", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            async def healthy() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get("/health")).status_code == 200
                return False

            await eventually(healthy, timeout=60, interval=0.2)
            yield http
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def rows(one: Stream, n: int, tokens: int) -> list[dict[str, Any]]:
    await streams(one, 1, 8)  # warm
    return [await streams(one, k, tokens) for k in (1, n, 1, n)]


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--llama-server", action="store_true", help="measure llama.cpp's server instead")
    args = parser.parse_args(argv)
    if args.llama_server:
        from rbee.hive.models import ModelCatalog

        model = ModelCatalog(Path(os.environ.get("RBEE_MODELS_DIR") or Path.home() / ".rbee" / "models")).resolve(
            None, lambda *a, **k: None).path
        async with llama_server(model, args.streams) as http:
            found = await rows(server_stream(http), args.streams, args.tokens)
    else:
        with tempfile.TemporaryDirectory(prefix="rbee-bench-") as home:
            env = {**os.environ, "RBEE_HOME": f"{home}/home", "RBEE_HEARTBEAT_INTERVAL": "0.5"}
            os.environ.update(env)
            async with queen(env) as url, LinkClient(url, "queen", token=owner_token()) as client:
                found = await rows(rbee_stream(client), args.streams, args.tokens)
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
