"""Who owns the other end of a loopback connection: the kernel's socket table, read right; and a
spliced connection says which end went first before the other end can see it."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from rbee.link.private import forward, socket_owner

TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:C350 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 1 1 0000000000000000
   1: 0100007F:9C41 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1002        0 2 1 0000000000000000
   2: 0100007F:C350 0100007F:9C41 01 00000000:00000000 00:00000000 00000000  1001        0 3 1 0000000000000000
"""


def test_the_dialing_socket_is_found_by_its_own_address_and_its_peer() -> None:
    # 127.0.0.1:40001 (0x9C41) dialed 127.0.0.1:50000 (0xC350): that socket is user 1002's
    assert socket_owner(("127.0.0.1", 40001), ("127.0.0.1", 50000), TABLE) == 1002
    assert socket_owner(("127.0.0.1", 50000), ("127.0.0.1", 40001), TABLE) == 1001
    assert socket_owner(("127.0.0.1", 40002), ("127.0.0.1", 50000), TABLE) is None


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/net/tcp is Linux's")
def test_a_live_connection_of_this_process_is_this_users() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, peer = server.accept()
            with accepted:
                table = Path("/proc/net/tcp").read_text()
                assert socket_owner(peer, accepted.getsockname(), table) == os.getuid()
                assert client.getsockname() == peer


async def spliced() -> tuple[socket.socket, socket.socket, list[str], asyncio.Task[int | None]]:
    """A near client (the main worker) forwarded to a far server (the share) through :func:`forward`;
    returns both plain ends, what the splice told, and the splice."""
    near, near_inner = socket.socketpair()
    far_inner, far = socket.socketpair()
    near.setblocking(False)
    far.setblocking(False)
    told: list[str] = []

    def far_ended() -> None:  # what the near end has seen by now: nothing, not even the end
        try:
            told.append(f"far ended, near read {near.recv(10)!r}")
        except BlockingIOError:
            told.append("far ended, near sees nothing yet")

    async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(sock=far_inner)

    reader, writer = await asyncio.open_connection(sock=near_inner)
    return near, far, told, asyncio.create_task(forward(reader, writer, dial, far_ended=far_ended))


async def test_the_far_end_going_first_is_told_before_the_near_end_sees_its_connection_end() -> None:
    near, far, told, splice = await spliced()
    with near, far:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(near, b"ask")
        assert await asyncio.wait_for(loop.sock_recv(far, 10), 5) == b"ask"
        far.close()  # the share dies mid-job
        assert await asyncio.wait_for(splice, 5) == 1
        assert told == ["far ended, near sees nothing yet"]
        assert await asyncio.wait_for(loop.sock_recv(near, 10), 5) == b""  # then it does


async def test_the_near_end_going_first_is_not_the_far_ends_fault() -> None:
    near, far, told, splice = await spliced()
    with near, far:
        near.close()  # the main worker is done with this connection
        assert await asyncio.wait_for(splice, 5) == 0
        assert told == []
        assert await asyncio.wait_for(asyncio.get_running_loop().sock_recv(far, 10), 5) == b""
