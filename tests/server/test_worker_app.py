"""The worker's app and model-owner thread, on a deterministic fake engine (the real
engine runs in tests/e2e)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.config import WorkerConfig
from rbee.link.client import LinkClient
from rbee.link.jobs import JobRegistry
from rbee.worker.app import create_app
from rbee.worker.runner import ModelRunner
from tests.fake_step import FakeBackend, FakeStep
from tests.helpers import eventually, served


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[str, FakeStep, ModelRunner]]:
    engine = FakeBackend()
    config = WorkerConfig("w-test", tmp_path / "m.gguf", "http://127.0.0.1:9")
    runner = ModelRunner(engine, config.model_path)
    await runner.load()
    registry = JobRegistry(config.actor, resume_grace=0.05)
    app = create_app(config, runner, registry, asyncio.Event())
    async with served(app, on_stop=registry.close) as url:
        yield url, engine.step, runner
    runner.close()


async def test_tokens_stream_from_the_model_thread(worker: Any) -> None:
    url, engine, runner = worker
    async with LinkClient(url, "worker:w-test") as client:
        received = [e async for e in client.run({"prompt": "x", "max_tokens": 5})]
    assert "".join(e["text"] for e in received if e.type == "token") == "w0 w1 w2 w3 w4 "
    assert received[-1].type == "end" and received[-1]["tokens"] == 5
    assert engine.threads == {"fake-engine"}  # the engine's own thread, never the event loop's
    assert runner.tokens_generated == 5 and runner.state == "ready"


async def test_ready_and_health(worker: Any) -> None:
    url, _, _ = worker
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/ready")).status_code == 200
        assert (await http.get("/health")).json()["state"] == "ready"


async def test_cancel_stops_the_engine_within_a_token(worker: Any) -> None:
    url, engine, runner = worker
    async with LinkClient(url, "worker:w-test") as client:
        handle = await client.create({"prompt": "x", "max_tokens": 5000})
        async for event in client.stream(handle):
            if event.type == "token" and event["index"] == 3:
                await client.cancel(handle)
    await eventually(lambda: runner.occupancy()["slots_busy"] == 0, timeout=5)  # the slot is free again
    stopped = engine.steps
    await asyncio.sleep(0.05)
    assert engine.steps == stopped < 50


async def test_engine_exception_becomes_an_error_event(worker: Any) -> None:
    url, engine, _ = worker
    engine.fail_at = 2
    async with LinkClient(url, "worker:w-test") as client:
        received = [e async for e in client.run({"prompt": "x", "max_tokens": 10})]
    assert received[-1].type == "error" and "engine exploded" in received[-1]["message"]
    assert received[-1]["actor"] == "worker:w-test"
    async with LinkClient(url, "worker:w-test") as client:
        again = [e async for e in client.run({"prompt": "x", "max_tokens": 3})]
    assert again[-1].type == "end" and again[-1]["tokens"] == 3  # the next job still runs


async def test_two_jobs_do_not_interleave(worker: Any) -> None:
    url, _, _ = worker
    async with LinkClient(url, "worker:w-test") as client:

        async def one() -> list[str]:
            received = [x async for x in client.run({"prompt": "x", "max_tokens": 20})]
            return [e["text"] for e in received if e.type == "token"]

        first, second = await asyncio.gather(one(), one())
    assert first == second == [f"w{i} " for i in range(20)]


async def test_invalid_request_is_400(worker: Any) -> None:
    url, _, _ = worker
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/jobs", json={"prompt": "x", "max_tokens": -1})
    assert response.status_code == 400 and "max_tokens" in response.json()["error"]["message"]
