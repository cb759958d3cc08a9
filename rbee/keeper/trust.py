"""`rbee fleet trust NAME`: the explicit step that records an SSH host key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncssh

from rbee.errors import TrustError
from rbee.inventory import Inventory

# The keeper may use the queen's SSH helpers only through the shared inventory types;
# the host-key logic itself is small enough to live here.


async def trust(inventory: Inventory, name: str, confirm: Callable[[str, str], bool]) -> tuple[str, Path]:
    """Read the host's key, show its fingerprint through ``confirm(host, fingerprint)``, and
    record it only if that says yes."""
    entry = inventory.get(name)
    if entry is None or not entry.remote:
        raise TrustError(f"no hive {name!r} with an ssh target in {inventory.path}")
    target = entry.target
    port = target.port or 22
    path = Path(inventory.ssh.known_hosts or "~/.ssh/known_hosts").expanduser()
    try:
        key = await asyncssh.get_server_host_key(target.host, port)
    except (OSError, asyncssh.Error) as exc:
        raise TrustError(f"cannot reach {target.host}:{port} to read its host key: {exc}") from exc
    if key is None:
        raise TrustError(f"{target.host}:{port} offered no host key")
    if path.is_file():
        trusted, _, revoked, *_ = asyncssh.read_known_hosts(str(path)).match(target.host, "", port)
        if any(k.public_data == key.public_data for k in trusted):
            return key.get_fingerprint(), path
        if trusted or revoked:
            raise TrustError(
                f"{path} already holds a DIFFERENT key for {target.host}:{port}; rbee will not replace it. "
                f"If the host was reinstalled, remove the old key first: ssh-keygen -R '[{target.host}]:{port}' "
                f"-f {path}"
            )
    host = target.host if port == 22 else f"[{target.host}]:{port}"
    if not confirm(host, key.get_fingerprint()):
        raise TrustError(f"{host} was not trusted; nothing was written to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(f"{host} {key.export_public_key().decode().strip()}\n")
    return key.get_fingerprint(), path
