"""The worker's app and model-owner thread, on a deterministic fake engine (the real
engine runs in tests/e2e)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from rbee.config import WorkerConfig
from rbee.errors import ModelLoadError
from rbee.link.client import LinkClient
from rbee.link.jobs import JobRegistry
from rbee.link.schemas import JobRequest
from rbee.worker.app import create_app
from rbee.worker.backends.base import Piece
from rbee.worker.runner import ModelRunner
from tests.helpers import eventually, served


class FakeEngine:
    """Yields "w0 w1 ..." one word per step on whatever thread calls it."""

    name = "fake"
    metadata: ClassVar[dict[str, str]] = {"general.architecture": "gemma3"}
    report: ClassVar[dict[str, Any]] = {}

    def __init__(self, step: float = 0.005, fail_at: int | None = None) -> None:
        self.step = step
        self.fail_at = fail_at
        self.steps = 0
        self.threads: set[str] = set()

    def load(self, path: Path) -> None:
        if path.name == "broken.gguf":
            raise ModelLoadError(f"cannot load {path}")

    def generate(self, request: JobRequest, should_stop: Callable[[], bool]) -> Iterator[Piece]:
        self.threads.add(threading.current_thread().name)
        for index in range(request.max_tokens):
            if should_stop():
                yield Piece("", "cancelled", index)
                return
            if index == self.fail_at:
                raise RuntimeError("engine exploded")
            time.sleep(self.step)
            self.steps += 1
            yield Piece(f"w{index} ")
        yield Piece("", "length", request.max_tokens)

    def close(self) -> None:
        pass


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[str, FakeEngine, ModelRunner]]:
    engine = FakeEngine()
    config = WorkerConfig("w-test", tmp_path / "m.gguf", "http://127.0.0.1:9")
    runner = ModelRunner(engine, config.model_path)
    await runner.load()
    registry = JobRegistry(config.actor, resume_grace=0.05)
    app = create_app(config, runner, registry, asyncio.Event())
    async with served(app, on_stop=registry.close) as url:
        yield url, engine, runner
    runner.close()


async def test_tokens_stream_from_the_model_thread(worker: Any) -> None:
    url, engine, runner = worker
    async with LinkClient(url, "worker:w-test") as client:
        received = [e async for e in client.run({"prompt": "x", "max_tokens": 5})]
    assert "".join(e["text"] for e in received if e.type == "token") == "w0 w1 w2 w3 w4 "
    assert received[-1].type == "end" and received[-1]["tokens"] == 5
    assert engine.threads == {"model-owner_0"}
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
    await eventually(lambda: runner.state == "ready", timeout=5)
    stopped = engine.steps
    await asyncio.sleep(0.05)
    assert engine.steps == stopped < 50


async def test_engine_exception_becomes_an_error_event(worker: Any) -> None:
    url, engine, runner = worker
    engine.fail_at = 2
    async with LinkClient(url, "worker:w-test") as client:
        received = [e async for e in client.run({"prompt": "x", "max_tokens": 10})]
    assert received[-1].type == "error" and "engine exploded" in received[-1]["message"]
    assert received[-1]["actor"] == "worker:w-test"
    assert runner.state == "ready"  # the next job still runs


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
