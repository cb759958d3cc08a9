"""httpx on plain asyncio streams: the link's HTTP client transport.

httpcore reaches sockets through a pluggable network backend; on asyncio it
picks anyio's, which wraps every read in an anyio cancel scope. On a token
stream that is one scope per token, and the profile showed it: a relay spent
half its CPU per token in the anyio read path (docs/benchmarks.md). This
backend implements httpcore's documented ``AsyncNetworkBackend`` interface on
asyncio's own streams and ``asyncio.timeout``; HTTP itself stays httpcore/h11.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import select
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from typing import Any

import h11
import httpcore
import httpx

from rbee.errors import UnprovenPeerError
from rbee.link.auth import CHALLENGE, PEER, PROOF, Callee, bearer, proves

#: Most one read hands back; SSE frames are far smaller, a model list may be larger.
READ_LIMIT = 1 << 20


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            if timeout is None:
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(f"nothing to read for {timeout:g} s") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(f"could not write for {timeout:g} s") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass  # the peer went first; closing is all we wanted

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            await self.aclose()
            raise httpcore.ConnectError(f"TLS handshake failed: {exc or type(exc).__name__}") from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks before reusing an idle keep-alive connection: readable means the
            # peer closed it (or sent something unasked), so it must not be reused.
            return self._reader.at_eof() or _socket_readable(self._writer.get_extra_info("socket"))
        key = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        return self._writer.get_extra_info(key)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """``callee``: every new connection first proves that the server holds the callee's key
    (rbee.link.auth), before httpcore sends a request with a secret on it."""

    def __init__(self, callee: Callee | None = None) -> None:
        self.callee = callee

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        stream = await _connect(
            asyncio.open_connection(host, port, local_addr=local, limit=READ_LIMIT), f"{host}:{port}", timeout
        )
        sock = stream.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        if self.callee is not None:
            try:
                await prove_callee(stream, host, port, self.callee, timeout)
            except BaseException:
                await stream.aclose()
                raise
        return stream


async def prove_callee(stream: httpcore.AsyncNetworkStream, host: str, port: int, callee: Callee,
                       timeout: float | None) -> None:
    """``GET /health`` with a fresh challenge on this connection; the answer must be the proof
    of ``callee.key`` bound to the callee's address, else UnprovenPeerError and nothing is sent.
    The connection stays open (HTTP/1.1 keep-alive) for the requests that follow."""
    challenge = secrets.token_hex(16)
    address = callee.address or dialled_address(host, port)
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", f"{host}:{port}"), (CHALLENGE, challenge)] + ([(PEER, callee.peer)] if callee.peer else [])
    await stream.write(conn.send(h11.Request(method="GET", target="/health", headers=headers))
                       + conn.send(h11.EndOfMessage()), timeout)
    answer: str | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.read(READ_LIMIT, timeout)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                break
        elif isinstance(event, h11.Response):
            answer = dict((k.decode().lower(), v.decode()) for k, v in event.headers).get(PROOF.lower())
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if not proves(callee.key, challenge, address, answer):
        raise UnprovenPeerError(
            f"the server at {host}:{port} did not prove it holds the secret for {address} (another user's "
            "process on a freed port, a relay, or a peer that was restarted with a new secret); nothing was sent to it"
        )
    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
        raise httpcore.ConnectError(f"{host}:{port} closed the connection after proving itself")


def dialled_address(host: str, port: int) -> str:
    """The address a proof is bound to when the callee is dialled directly."""
    return f"{'127.0.0.1' if host == 'localhost' else host}:{port}"

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connect(
    opening: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]], where: str, timeout: float | None
) -> AsyncioStream:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await opening
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(f"no connection to {where} within {timeout:g} s") from exc
    except OSError as exc:
        raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
    return AsyncioStream(reader, writer)


def _socket_readable(sock: Any) -> bool:
    if sock is None or sock.fileno() < 0:
        return True
    poller = select.poll()  # not select.select: that fails on descriptors past 1024
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


#: httpcore's errors and the httpx errors callers catch, most specific first
ERRORS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for theirs, ours in ERRORS:
            if isinstance(exc, theirs):
                raise ours(str(exc) or type(exc).__name__) from exc
        raise


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            with _as_httpx_errors():
                await self._stream.aclose()


class LinkTransport(httpx.AsyncBaseTransport):
    """An httpx transport on an httpcore connection pool that uses :class:`AsyncioBackend`,
    built from the public APIs of both (httpx's own transport offers no backend argument)."""

    def __init__(self, limits: httpx.Limits | None = None, callee: Callee | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=3.0)
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=limits.max_connections, max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=AsyncioBackend(callee),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                             target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = await self._pool.handle_async_request(core)
        return httpx.Response(status_code=response.status, headers=response.headers, stream=_Body(response.stream),
                              extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


def async_client(callee: Callee | None = None, **kwargs: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` (same arguments) whose connections use :class:`AsyncioBackend`,
    each proving ``callee`` first when given (every client that carries a secret gives one).

    Proxy variables are ignored: rbee only talks to its own tiers, on loopback or through
    the SSH forward, and an HTTP(S)_PROXY meant for downloads must not capture that."""
    return httpx.AsyncClient(transport=LinkTransport(callee=callee), trust_env=False, **kwargs)


def secret_client(token: str | None, callee: Callee | None = None, **kwargs: Any) -> httpx.AsyncClient:
    """A client that sends ``token`` only to a server that proves it holds it (``callee``:
    where the proof must come from when that is not simply the address dialled)."""
    if not token:
        return async_client(**kwargs)
    return async_client(callee=callee or Callee(token), headers=bearer(token), **kwargs)
