"""Reaching a TCP-only service that must not be reachable by anyone else (llama.cpp's RPC server,
which has no authentication): a private network namespace, unix sockets, and a TCP listener
that serves its own user only.

A loopback TCP port is open to every unix user of the host; a unix socket in a 0700 folder is
open to its owner only, and a network namespace of the process's own has a loopback nobody else
shares. So the server listens on the loopback of a namespace of its own, behind a unix socket
(:func:`unix_to_tcp`), and the one process that dials it over TCP (llama.cpp's RPC client, in
the main worker) dials a listener that hangs up on any connection another uid opened
(:func:`tcp_to_unix`), which the kernel's socket table tells (``/proc/net/tcp``).

Linux only (namespaces, ``/proc``); unprivileged user namespaces, as Debian, Ubuntu and Fedora
allow by default, let a non-root hive make one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rbee.errors import PrivateNetworkError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
CHUNK = 1 << 16


def enter_private_network() -> None:
    """Move this process (still single-threaded) into a network namespace of its own, with only
    a loopback that is up. A non-root process first takes a user namespace mapping its own uid
    and gid, as ``unshare --user --map-current-user --net`` does."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise PrivateNetworkError(
            f"cannot make a private network namespace ({os.strerror(code)}): this host does not let user {uid} "
            "create one, so it cannot serve a share of a split model. Allow unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1, or user.max_user_namespaces > 0)")
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sH14x", b"lo", 0)
        flags_now = struct.unpack("16sH14x", fcntl.ioctl(probe, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags_now | IFF_UP))


def private_folder(path: Path) -> Path:
    """``path`` made (or kept) a 0700 folder of this user's: where a unix socket is only its own."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if info.st_uid != os.getuid() or not path.is_dir() or path.is_symlink():
        raise PrivateNetworkError(f"{path} is not a folder of user {os.getuid()}'s; remove it")
    os.chmod(path, 0o700)
    return path


def socket_owner(local: tuple[str, int], remote: tuple[str, int], table: str) -> int | None:
    """The uid that owns the IPv4 socket bound to ``local`` and connected to ``remote``, in the
    text of ``/proc/net/tcp``."""
    def hexed(address: tuple[str, int]) -> str:
        packed = socket.inet_aton(address[0])
        return f"{struct.unpack('<I', packed)[0]:08X}:{address[1]:04X}"

    want = (hexed(local), hexed(remote))
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and (fields[1], fields[2]) == want:
            return int(fields[7])
    return None


async def _pump(reader: Any, writer: Any, source: int, ended: Callable[[int], None]) -> None:
    """Copy ``reader`` (side ``source``) into ``writer`` (the other side) until either ends;
    ``ended`` is told which one did (a read that ends blames the reader, a failed write the
    writer) before ``writer`` is closed, that is before the reader's peer can see the end."""
    side: int | None = source
    try:
        while data := await reader.read(CHUNK):
            side = 1 - source
            writer.write(data)
            await writer.drain()
            side = source
    except asyncio.CancelledError:
        side = None  # the splice was stopped: neither side ended
        raise
    except Exception:  # OSError, and an SSH channel's own (asyncssh.ConnectionLost): it ended
        pass
    finally:
        if side is not None:
            ended(side)
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


async def splice(a: tuple[Any, Any], b: tuple[Any, Any],
                 first_ended: Callable[[int], None] | None = None) -> int | None:
    """Copy both ways until either side ends; then both are closed. Returns which side ended
    first (0: ``a``, 1: ``b``), and tells ``first_ended`` at once, before the other side is
    closed: whoever watches ``b`` hears that it went before ``a``'s peer can react to the close.
    Run as a connection's handler, it ends quietly (None) when its server's loop shuts down (a
    cancelled handler would be logged by asyncio as an error)."""
    for sock in (a[1].get_extra_info("socket"), b[1].get_extra_info("socket")):
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # RPC is request/answer: no Nagle
    first: list[int] = []

    def ended(side: int) -> None:
        if not first:
            first.append(side)
            if first_ended is not None:
                first_ended(side)

    pumps = (asyncio.ensure_future(_pump(a[0], b[1], 0, ended)),
             asyncio.ensure_future(_pump(b[0], a[1], 1, ended)))
    try:
        await asyncio.gather(*pumps)
        return first[0]
    except asyncio.CancelledError:
        for task in pumps:
            task.cancel()
        for _, writer in (a, b):
            writer.close()
        return None


Dial = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def forward(reader: Any, writer: Any, dial: Dial, unreachable: Callable[[Exception], None] | None = None,
                  far_ended: Callable[[], None] | None = None) -> int | None:
    """One accepted connection carried on to ``dial()``, as :func:`splice` says; ``far_ended`` is
    told the moment the far end ends first. When the far end cannot be dialed, ``unreachable`` is
    told, then the connection is closed (its client sees that)."""
    try:
        far = await dial()
    except Exception as exc:  # OSError, and an SSH channel's own errors
        if unreachable is not None:
            unreachable(exc)
        writer.close()
        return None

    def ended(side: int) -> None:
        if side == 1 and far_ended is not None:
            far_ended()

    return await splice((reader, writer), far, ended)


async def serve_unix(path: Path, handle: Callable[[Any, Any], Awaitable[None]]) -> asyncio.AbstractServer:
    """A unix socket at ``path``, 0600 in a 0700 folder of this user's, served by ``handle``."""
    private_folder(path.parent)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = await asyncio.start_unix_server(handle, path=str(path))
    os.chmod(path, 0o600)
    return server


async def unix_to_tcp(path: Path, port: int) -> asyncio.AbstractServer:
    """A unix socket at ``path`` (its folder 0700) whose connections go on to 127.0.0.1:``port``."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await forward(reader, writer, lambda: asyncio.open_connection("127.0.0.1", port))

    return await serve_unix(path, handle)


async def tcp_to_unix(dial: Dial, *, table: Path = Path("/proc/net/tcp")) -> tuple[asyncio.AbstractServer, int]:
    """A listener on 127.0.0.1 (a free port, returned) that serves only this process's uid: a
    connection from another user's socket is closed unread. Each accepted one goes on to
    ``dial()`` (a unix socket, or a channel of an SSH connection)."""
    me = os.getuid()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local, remote = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
        owner = socket_owner(remote, local, table.read_text())  # the dialing end: bound to its peername
        if owner != me:
            writer.close()
            return
        await forward(reader, writer, dial)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])
