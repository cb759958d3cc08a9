"""Real OpenSSH servers on loopback aliases, each "host" its own unix user, for fleet tests.

Needs root (useradd, sshd). Each host: a user ``rbee-hN`` with a fresh home, an sshd on
127.0.0.N+1:2222 with its own host key, and our client key in its authorized_keys.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"


@dataclass
class Host:
    name: str
    user: str
    address: str
    port: int
    home: Path
    host_key: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def ssh(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    def known_hosts_line(self) -> str:
        public = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[{self.address}]:{self.port} {' '.join(public)}\n"

    def processes(self) -> list[psutil.Process]:
        uid = pwd.getpwnam(self.user).pw_uid
        found = []
        for process in psutil.process_iter(["uids", "name"]):
            try:
                if process.info["uids"] and process.info["uids"].real == uid and process.status() != "zombie":
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def rbee_processes(self) -> list[psutil.Process]:
        found = []
        for process in self.processes():
            try:
                if any(part.startswith("rbee.") or "/.rbee/" in part for part in process.cmdline()):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found


def available() -> str | None:
    """Why real-sshd tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (useradd, sshd)"
    if not Path(SSHD).exists():
        return "openssh-server is not installed (scripts/test installs it)"
    return None


def ensure_user(user: str) -> Path:
    try:
        return Path(pwd.getpwnam(user).pw_dir)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", user], check=True)
        subprocess.run(["usermod", "-p", "*", user], check=True)  # unlocked, no password: keys only
        return Path(pwd.getpwnam(user).pw_dir)


def reset_home(host: Host) -> None:
    """A clean host: nothing of rbee left from an earlier run."""
    for process in host.processes():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(host.home / ".rbee", ignore_errors=True)


def authorize(host: Host, public_key: str) -> None:
    """Our client key in the host user's own ~/.ssh/authorized_keys, owned by that user."""
    entry = pwd.getpwnam(host.user)
    ssh_dir = host.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(public_key)
    for path in (ssh_dir, keys):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    keys.chmod(0o600)


def write_sshd_config(workdir: Path, host: Host) -> Path:
    config = workdir / f"sshd_config_{host.name}"
    config.write_text(
        "\n".join(
            [
                f"Port {host.port}",
                f"ListenAddress {host.address}",
                f"HostKey {host.host_key}",
                f"PidFile {workdir / f'sshd_{host.name}.pid'}",
                "UsePAM no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "AuthorizedKeysFile .ssh/authorized_keys",
                f"AllowUsers {host.user}",
                "AllowTcpForwarding yes",
                "PermitRootLogin no",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                # The "remote" side reaches no package index: any pip that tried would fail.
                "SetEnv PIP_INDEX_URL=http://127.0.0.1:9/simple HTTPS_PROXY=http://127.0.0.1:9 "
                "HTTP_PROXY=http://127.0.0.1:9",
                "",
            ]
        )
    )
    return config


def start_hosts(workdir: Path, count: int, first_octet: int = 2) -> tuple[list[Host], Path]:
    """Start ``count`` sshd hosts; returns them and the client's private key."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)
    client_key = workdir / "client_key"
    if not client_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(client_key)], check=True)
    public_key = Path(f"{client_key}.pub").read_text()
    hosts = []
    for index in range(count):
        name = f"h{index + 1}"
        user = f"rbee-{name}"
        home = ensure_user(user)
        host_key = workdir / f"host_key_{name}"
        if not host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        host = Host(name, user, f"127.0.0.{first_octet + index}", 2222, home, host_key)
        reset_home(host)
        authorize(host, public_key)
        config = write_sshd_config(workdir, host)
        log = open(workdir / f"sshd_{name}.log", "ab")
        host.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
        hosts.append(host)
    for host in hosts:
        wait_listening(host)
    return hosts, client_key


def wait_listening(host: Host, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert host.process is not None
        if host.process.poll() is not None:
            log = host.host_key.parent / f"sshd_{host.name}.log"
            raise RuntimeError(f"sshd for {host.name} exited with {host.process.returncode}: {log.read_text()[-800:]}")
        try:
            with socket.create_connection((host.address, host.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd for {host.name} did not listen on {host.address}:{host.port}")


def stop_hosts(hosts: list[Host]) -> None:
    for host in hosts:
        if host.process is not None and host.process.poll() is None:
            host.process.terminate()
            try:
                host.process.wait(5)
            except subprocess.TimeoutExpired:
                host.process.kill()
        for process in host.processes():  # session children of that sshd, anything left
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def write_inventory(path: Path, hosts: list[Host], client_key: Path, known_hosts: Path, extra: str = "",
                    per_host: dict[str, str] | None = None) -> Path:
    """``per_host``: more keys for a host's ``[[hive]]`` entry, by host name."""
    known_hosts.write_text("".join(host.known_hosts_line() for host in hosts))
    lines = [f'[ssh]\nknown_hosts = "{known_hosts}"\n', extra]
    for host in hosts:
        lines.append(
            f'[[hive]]\nname = "{host.name}"\nssh = "{host.ssh}"\nidentity_file = "{client_key}"\n'
            f'python = "/usr/bin/python3"\n{(per_host or {}).get(host.name, "")}'
        )
    path.write_text("\n".join(lines))
    return path
