"""``python -m bench.streams``: rbee with 1 and with 8 streams at once, greedy, through a real
queen, hive and worker on the default model: aggregate tokens/s, the slowest time to first
token, and each stream's own decode rate. Twice each, alternating, so a drift of the machine
shows. Run it from a checkout to compare two versions of rbee on the same machine (its own
``tests/helpers`` starts the queen of that checkout)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

from rbee.link.client import LinkClient
from tests.helpers import owner_token, queen

PROMPT = "Write a long story about a bee who"


async def streams(client: LinkClient, n: int, tokens: int) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0}

    async def one() -> tuple[int, float, float]:
        started, first, count, rate = time.monotonic(), 0.0, 0, 0.0
        async for event in client.run(body):
            if event.type == "token":
                count += 1
                first = first or time.monotonic()
            elif event.type == "end":
                rate = float(event["tokens_per_s"])
        return count, first - started, rate

    started = time.monotonic()
    done = await asyncio.gather(*(one() for _ in range(n)))
    wall = time.monotonic() - started
    made = sum(d[0] for d in done)
    return {"streams": n, "tokens": made, "aggregate_tok_s": round(made / wall, 1),
            "slowest_ttft_ms": round(max(d[1] for d in done) * 1000),
            "each_tok_s": round(sum(d[2] for d in done) / n, 1)}


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as home:
        env = {**os.environ, "RBEE_HOME": f"{home}/home", "RBEE_HEARTBEAT_INTERVAL": "0.5"}
        os.environ.update(env)
        async with queen(env) as url, LinkClient(url, "queen", token=owner_token()) as client:
            await streams(client, 1, 8)  # the hive and a warm worker
            rows = [await streams(client, n, args.tokens) for n in (1, args.streams, 1, args.streams)]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
