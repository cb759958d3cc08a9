"""The link's HTTP client transport (httpx on asyncio streams) against real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from quart import Quart, request

from rbee.link import events
from rbee.link.client import LinkClient
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.link.server import add_job_routes
from rbee.link.transport import AsyncioStream, async_client
from tests.helpers import served


@pytest.fixture
async def counting_app() -> AsyncIterator[tuple[str, set[Any]]]:
    """A link server that records the client address of every request (one per TCP connection)."""
    app = Quart(__name__)
    registry = JobRegistry("worker:test", linger=5)
    peers: set[Any] = set()

    @app.before_request
    async def _record() -> None:
        peers.add(tuple(request.scope["client"]))

    def make(body: dict[str, Any]) -> Producer:
        async def produce(job: Job) -> None:
            for index in range(3):
                job.emit(events.token(index, "x"))
                await asyncio.sleep(0)
            job.emit(events.end(3, 0.01, "length"))

        return produce

    add_job_routes(app, registry, make)
    async with served(app, on_stop=registry.close) as url:
        yield url, peers


async def test_requests_run_on_asyncio_streams(counting_app: Any) -> None:
    url, _ = counting_app
    async with async_client(base_url=url) as http, http.stream("GET", "/nowhere") as response:
        assert isinstance(response.extensions["network_stream"], AsyncioStream)
        assert response.status_code == 404


async def test_jobs_reuse_one_connection(counting_app: Any) -> None:
    url, peers = counting_app
    async with LinkClient(url, "worker:test") as client:
        for _ in range(4):
            received = [event async for event in client.run({"prompt": "x"})]
            assert [e.type for e in received] == ["token"] * 3 + ["end"]
    # 4 jobs = 8 requests; holding the end event until [DONE] and the body's end lets
    # every request after the first reuse the first connection.
    assert len(peers) == 1, peers


async def _one_shot_server(reply: bytes) -> tuple[asyncio.Server, int, list[int]]:
    """Answers each connection's first request with ``reply``, then closes it."""
    served_connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served_connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], served_connections


async def test_a_connection_the_peer_closed_is_not_reused() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    server, port, connections = await _one_shot_server(reply)
    async with server, async_client(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(3):
            first = await http.get("/")
            assert first.text == "ok"
            await asyncio.sleep(0.05)  # let the close arrive before the next request
    assert len(connections) == 3


async def test_timeouts_and_refusals_are_httpx_errors() -> None:
    server, port, _ = await _one_shot_server(b"")  # reads the request, then says nothing
    never_answers = await asyncio.start_server(lambda r, w: asyncio.sleep(10), "127.0.0.1", 0)
    silent_port = never_answers.sockets[0].getsockname()[1]
    async with server, never_answers, async_client(timeout=httpx.Timeout(5.0, read=0.2)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"http://127.0.0.1:{silent_port}/")
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(f"http://127.0.0.1:{port}/")  # closed without a response
    with pytest.raises(httpx.ConnectError):
        async with async_client() as http:
            await http.get(f"http://127.0.0.1:{port}/")  # nothing listens any more
