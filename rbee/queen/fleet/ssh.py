"""SSH to fleet hosts with asyncssh: connect (host keys checked), run typed commands.

Commands are built from argv lists and quoted with ``shlex`` — never by string
concatenation — so a host, path or model name with shell metacharacters is
only ever data on the remote side.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from rbee.errors import HostKeyError, RemoteCommandError, SshError
from rbee.inventory import HiveEntry, SshSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """A remote command: argv plus environment, rendered for a POSIX shell."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, *argv: str | Path, env: Mapping[str, str] | None = None) -> Command:
        return cls(tuple(str(part) for part in argv), tuple(sorted((env or {}).items())))

    def render(self) -> str:
        assignments = [f"{name}={shlex.quote(value)}" for name, value in self.env]
        return " ".join([*(["env", *assignments] if assignments else []), shlex.join(self.argv)])

    def __str__(self) -> str:
        return self.render()


def known_hosts_path(section: SshSection) -> Path:
    return Path(section.known_hosts or "~/.ssh/known_hosts").expanduser()


def describe_key_problem(entry: HiveEntry, section: SshSection, exc: Exception) -> str:
    """Tell apart an unknown host key and a changed one, and say how to fix each."""
    target = entry.target
    path = known_hosts_path(section)
    port = target.port or 22
    scan = f"ssh-keyscan -p {port} {target.host} >> {path}"
    known = False
    if path.is_file():
        try:
            trusted, _, revoked, *_ = asyncssh.read_known_hosts(str(path)).match(target.host, "", port)
            known = bool(trusted or revoked)
        except (asyncssh.Error, ValueError, OSError):
            known = False
    if known:
        return (
            f"hive {entry.name!r}: the SSH host key of {target.host}:{port} CHANGED since it was recorded in {path}. "
            "This can be a reinstalled host or a man-in-the-middle; rbee refuses it. If the change is expected, "
            f"remove the old line (ssh-keygen -R '[{target.host}]:{port}' -f {path}) and run `rbee fleet trust "
            f"{entry.name}`."
        )
    return (
        f"hive {entry.name!r}: the SSH host key of {target.host}:{port} is not in {path}, so rbee cannot verify "
        f"the host. Check its fingerprint, then run `rbee fleet trust {entry.name}` (or `{scan}`). ({exc})"
    )


async def connect(entry: HiveEntry, section: SshSection) -> asyncssh.SSHClientConnection:
    """An SSH connection to ``entry``'s host. ~/.ssh/config aliases, agent and identity files work."""
    target = entry.target
    options: dict[str, object] = {"known_hosts": str(known_hosts_path(section))}
    if target.user:
        options["username"] = target.user
    if target.port:
        options["port"] = target.port
    if entry.identity_file:
        options["client_keys"] = [str(Path(entry.identity_file).expanduser())]
    try:
        return await asyncio.wait_for(
            # no agent forwarding, whatever ~/.ssh/config says: a host must not use the operator's keys
            asyncssh.connect(target.host, keepalive_interval=10, keepalive_count_max=3, agent_forwarding=False,
                             **options),
            section.connect_timeout,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostKeyError(describe_key_problem(entry, section, exc)) from exc
    except asyncssh.PermissionDenied as exc:
        raise SshError(
            f"hive {entry.name!r}: {target} refused our SSH keys ({exc.reason}). Add your public key to the "
            "host's ~/.ssh/authorized_keys or set identity_file in the inventory"
        ) from exc
    except TimeoutError as exc:
        raise SshError(
            f"hive {entry.name!r}: no SSH answer from {target} within {section.connect_timeout:.0f} s; "
            "is the host up and sshd running?"
        ) from exc
    except (OSError, asyncssh.Error) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise SshError(f"hive {entry.name!r}: cannot SSH to {target}: {reason}") from exc


async def run(
    conn: asyncssh.SSHClientConnection, command: Command, *, what: str, stdin: str | None = None, timeout: float = 600
) -> str:
    """Run ``command``; return stdout, or raise RemoteCommandError with the remote stderr."""
    log.debug("ssh %s: %s", what, command.render())
    try:
        result = await asyncio.wait_for(conn.run(command.render(), input=stdin, check=False), timeout)
    except TimeoutError as exc:
        raise RemoteCommandError(f"{what}: no result within {timeout:.0f} s") from exc
    except (OSError, asyncssh.Error) as exc:
        raise SshError(f"{what}: the SSH connection failed: {exc}") from exc
    if result.exit_status != 0:
        stderr = str(result.stderr or "").strip()[-2000:]
        raise RemoteCommandError(f"{what} failed (exit {result.exit_status}): {stderr or str(result.stdout)}")
    return str(result.stdout or "")

