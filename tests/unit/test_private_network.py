"""Who owns the other end of a loopback connection: the kernel's socket table, read right."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from rbee.link.private import socket_owner

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
