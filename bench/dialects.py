"""What the Ollama dialect adds to time-to-first-token, against the OpenAI dialect, on the same
warm worker of one queen: the two routes take turns, so load on the machine falls on both.

    python -m bench.dialects [ROUNDS]      (prints the medians; docs/benchmarks.md quotes a run)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

MESSAGES = [{"role": "user", "content": "Name three colours."}]


async def first_token_openai(http: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    body = {"model": "gemma3-270m", "messages": MESSAGES, "max_tokens": 2, "temperature": 0, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.aiter_lines()
        async for line in lines:
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                spent = time.perf_counter() - started
                break
        async for _ in lines:  # the rest of the answer, so the next round finds the worker idle
            pass
    return spent


async def first_token_ollama(http: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    body = {"model": "gemma3-270m", "messages": MESSAGES, "options": {"num_predict": 2, "temperature": 0}}
    async with http.stream("POST", "/api/chat", json=body) as response:
        lines = response.aiter_lines()
        async for line in lines:
            if '"done":false' in line:
                spent = time.perf_counter() - started
                break
        async for _ in lines:  # the rest of the answer, so the next round finds the worker idle
            pass
    return spent


async def measure(rounds: int, home: Path) -> dict[str, float]:
    """Medians of ``rounds`` turns each, after 3 warm-up turns, on a queen of its own in ``home``."""
    from rbee.config import QueenConfig, ServeOptions
    from rbee.keeper.session import start_queen
    from rbee.link.auth import load_token

    config = QueenConfig(home=home, ephemeral=True, serve=ServeOptions())
    child = await start_queen(config, ephemeral=True)
    try:
        headers = {"Authorization": f"Bearer {load_token(home=home)}"}
        async with httpx.AsyncClient(base_url=child.url, headers=headers, timeout=300) as http:
            for _ in range(3):  # the worker loads, both routes warm up
                await first_token_openai(http)
                await first_token_ollama(http)
            openai, ollama = [], []
            for _ in range(rounds):
                openai.append(await first_token_openai(http))
                ollama.append(await first_token_ollama(http))
    finally:
        await child.stop(grace=20.0)
    o, a = statistics.median(openai), statistics.median(ollama)
    return {"rounds": rounds, "openai_ttft_ms": o * 1000, "ollama_ttft_ms": a * 1000, "added_ms": (a - o) * 1000,
            "paired_median_added_ms": statistics.median(y - x for x, y in zip(openai, ollama, strict=True)) * 1000}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as home:
        result = asyncio.run(measure(rounds, Path(home)))
    for key, value in result.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
