"""The dual-call link on a real Hypercorn server, with producers made in the test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from quart import Quart

from rbee.errors import JobNotFoundError, RequestError
from rbee.link import events
from rbee.link.client import JobHandle, LinkClient
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.link.server import add_job_routes, install_error_handlers
from tests.helpers import eventually, served


class Counter:
    """A producer that emits one token per tick until told to stop; records how far it got."""

    def __init__(self, tokens: int, tick: float = 0.01) -> None:
        self.tokens = tokens
        self.tick = tick
        self.produced = 0
        self.cancelled = False

    def __call__(self, body: dict[str, Any]) -> Producer:
        if "prompt" not in body:
            raise RequestError("prompt is required")

        async def produce(job: Job) -> None:
            job.narrate("start", "counting")
            try:
                for index in range(self.tokens):
                    await asyncio.sleep(self.tick)
                    job.emit(events.token(index, f"t{index} "))
                    self.produced += 1
            except asyncio.CancelledError:
                self.cancelled = True
                raise
            job.emit(events.end(self.tokens, 0.1, "length"))

        return produce


@pytest.fixture
async def link() -> AsyncIterator[tuple[str, JobRegistry, Counter]]:
    app = Quart(__name__)
    install_error_handlers(app, "worker:test")
    registry = JobRegistry("worker:test", claim_timeout=0.5, resume_grace=0.1, linger=5)
    counter = Counter(tokens=5)
    add_job_routes(app, registry, counter)
    async with served(app, on_stop=registry.close) as url:
        yield url, registry, counter


async def test_create_returns_201_with_server_made_id(link: Any) -> None:
    url, _, _ = link
    async with httpx.AsyncClient(base_url=url) as http:
        first = await http.post("/v1/jobs", json={"prompt": "x"})
        second = await http.post("/v1/jobs", json={"prompt": "x"})
    assert first.status_code == 201
    body = first.json()
    assert set(body) == {"job_id", "sse_url"}
    assert body["sse_url"] == f"/v1/jobs/{body['job_id']}/stream"
    assert body["job_id"] != second.json()["job_id"]
    assert len(body["job_id"]) >= 4 + 27  # "job-" + 160 bits in base64url


async def test_stream_carries_ids_and_ends_with_done(link: Any) -> None:
    url, _, _ = link
    async with httpx.AsyncClient(base_url=url) as http:
        job = (await http.post("/v1/jobs", json={"prompt": "x"})).json()
        response = await http.get(job["sse_url"])
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.strip().split("\n\n")
    assert frames[-1] == "data: [DONE]"
    ids = [int(frame.split("\n")[0].removeprefix("id: ")) for frame in frames[:-1]]
    assert ids == list(range(1, len(ids) + 1))
    kinds = [json.loads(frame.split("\n")[1].removeprefix("data: "))["type"] for frame in frames[:-1]]
    assert kinds == ["narration"] + ["token"] * 5 + ["end"]


async def test_client_streams_events_in_order(link: Any) -> None:
    url, _, _ = link
    async with LinkClient(url, "worker:test") as client:
        received = [event async for event in client.run({"prompt": "x"})]
    assert [e.type for e in received] == ["narration"] + ["token"] * 5 + ["end"]
    assert "".join(e["text"] for e in received if e.type == "token") == "t0 t1 t2 t3 t4 "


async def test_unknown_job_is_404_json(link: Any) -> None:
    url, _, _ = link
    async with httpx.AsyncClient(base_url=url) as http:
        stream = await http.get("/v1/jobs/job-nope/stream")
        cancel = await http.delete("/v1/jobs/job-nope")
    for response in (stream, cancel):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
    async with LinkClient(url, "worker:test") as client:
        with pytest.raises(JobNotFoundError):
            async for _ in client.stream(JobHandle("job-nope", "/v1/jobs/job-nope/stream")):
                pass


async def test_bad_bodies_are_400_json(link: Any) -> None:
    url, _, _ = link
    async with httpx.AsyncClient(base_url=url) as http:
        for content in (b"", b"{not json", b"[1, 2]", b'{"no": "prompt"}'):
            response = await http.post("/v1/jobs", content=content)
            assert response.status_code == 400, content
            assert response.json()["error"]["code"] == "bad_request"
        huge = await http.post("/v1/jobs", content=b'{"prompt": "' + b"x" * 2_000_000 + b'"}')
        assert huge.status_code == 413


async def test_delete_cancels_the_producer(link: Any) -> None:
    url, _, counter = link
    counter.tokens, counter.tick = 1000, 0.01
    async with LinkClient(url, "worker:test") as client:
        handle = await client.create({"prompt": "x"})
        seen = []
        async for event in client.stream(handle):
            seen.append(event)
            if event.type == "token" and event["index"] == 2:
                await client.cancel(handle)
    assert counter.cancelled
    assert seen[-1].type == "error" and seen[-1]["code"] == "cancelled"
    stopped_at = counter.produced
    await asyncio.sleep(0.1)
    assert counter.produced == stopped_at < 1000


async def test_closing_the_stream_cancels_the_producer(link: Any) -> None:
    url, _, counter = link
    counter.tokens, counter.tick = 1000, 0.01
    async with LinkClient(url, "worker:test") as client:
        handle = await client.create({"prompt": "x"})
        async for event in client.stream(handle):
            if event.type == "token":
                break  # leaves the stream: the connection closes
    await eventually(lambda: counter.cancelled, timeout=5)
    assert counter.produced < 1000


async def test_unclaimed_job_expires(link: Any) -> None:
    url, _, counter = link
    counter.tokens, counter.tick = 1000, 0.01
    async with LinkClient(url, "worker:test") as client:
        handle = await client.create({"prompt": "x"})
        await eventually(lambda: counter.cancelled, timeout=5)
        with pytest.raises(JobNotFoundError):
            async for _ in client.stream(handle):
                pass


async def test_resume_after_last_event_id(link: Any) -> None:
    url, _, _ = link
    async with LinkClient(url, "worker:test") as client:
        handle = await client.create({"prompt": "x"})
        full = [event async for event in client.stream(handle)]
        tail = [event async for event in client.stream(handle, last_event_id=3)]
    assert tail == full[3:]


class CuttingProxy:
    """A TCP proxy in front of a server that can cut every connection it carries, the way a
    dropped SSH connection cuts a forward: mid-frame, with a clean close."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.cuts = 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, split: bool) -> None:
            try:
                while data := await src.read(65536):
                    if split and self.cuts == 0 and b"t3 " in data:  # deliver half of a frame, then cut
                        dst.write(data[: data.index(b"t3 ")])
                        await dst.drain()
                        self.cut()
                        return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def cut(self) -> None:
        self.cuts += 1
        for writer in self.writers:
            writer.close()
        self.writers.clear()


async def test_a_cut_stream_resumes_with_every_event_once(link: Any) -> None:
    url, registry, counter = link
    registry.resume_grace = 5.0
    counter.tokens, counter.tick = 12, 0.02
    proxy = CuttingProxy(int(url.rsplit(":", 1)[1]))
    async with proxy as via, LinkClient(via, "worker:test") as client:
        received = [event async for event in client.run({"prompt": "x"})]
    assert proxy.cuts >= 1, "the stream was never cut"
    tokens = [e["text"] for e in received if e.type == "token"]
    assert tokens == [f"t{i} " for i in range(12)], tokens
    assert received[-1].type == "end"
