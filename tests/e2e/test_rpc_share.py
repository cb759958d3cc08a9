"""A model split with llama.cpp's RPC backend, on one machine: a share (rbee.worker.rpc_share) in a
network namespace of its own behind a 0700 unix socket, and a process that loads the default model
with some of its layers there through rbee's bridge. The text must equal the unsplit run's, the
layers must really be on the RPC device, and another unix user must reach neither end."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.split import run_child
from rbee.engine.rpc import SPLIT_UBATCH
from rbee.hive.rpc_cache import prime
from rbee.link.private import tcp_to_unix
from tests.sshd_hosts import ensure_user

INTRUDER = "rbee-intruder"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
LINUX = sys.platform == "linux"
pytestmark = pytest.mark.skipif(not LINUX, reason="network namespaces are Linux's")

def default_model(models_dir: Path) -> Path:
    return next(models_dir.rglob("*.gguf"))


def run_model(model: Path, layers: int, shares: list[Path], env: dict[str, str]) -> dict[str, Any]:
    return run_child(model, layers, shares, env=env)[0]


@pytest.fixture
def share(tmp_path: Path, rbee_env: dict[str, str]) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A running share; it must be gone (and its socket with it) after SIGTERM."""
    socket_path = tmp_path / "share" / "rpc.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "rbee.worker.rpc_share", "--socket", str(socket_path), "--cache",
         str(tmp_path / "rpc-cache"), "--parent-pid", str(os.getpid())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=rbee_env)
    assert process.stdout is not None
    line = process.stdout.readline()  # "ready <socket>" once llama.cpp's server answers, or EOF on failure
    if line.strip() != f"ready {socket_path}":
        process.kill()
        pytest.fail(f"the share did not start ({line!r}): {process.communicate(timeout=10)[1][-3000:]}")
    yield socket_path, process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert not socket_path.exists()


def test_split_text_equals_the_unsplit_run_and_the_layers_are_on_the_share(
        share: tuple[Path, subprocess.Popen[str]], models_dir: Path, rbee_env: dict[str, str]) -> None:
    socket_path, process = share
    model = default_model(models_dir)
    alone = run_model(model, 0, [], rbee_env)
    split = run_model(model, 9, [socket_path], rbee_env)
    assert alone["text"] and split["text"] == alone["text"]
    report = split["report"]
    assert isinstance(report, dict) and report["layers_offloaded"] == 9, report
    assert report["device"].startswith("RPC0") and report["weights_on_device"] > 100 * 2**20, report
    assert split["ubatch"] == SPLIT_UBATCH and alone["ubatch"] > SPLIT_UBATCH  # the helper's logits buffer stays small
    cached = run_model(model, 9, [socket_path], rbee_env)  # the share's layers now come from its cache
    assert cached["text"] == alone["text"]
    assert process.poll() is None, "the share serves one client after another"


def test_a_cache_filled_from_the_helpers_copy_is_what_the_share_reads(
        share: tuple[Path, subprocess.Popen[str]], models_dir: Path, rbee_env: dict[str, str], tmp_path: Path) -> None:
    """The files rbee.hive.rpc_cache writes carry the names ggml's RPC client asks for: on a miss
    the server would save the tensor it was sent under the right name, and the cache would grow."""
    socket_path, _ = share
    model = default_model(models_dir)
    cache = tmp_path / "rpc-cache"  # the share's own (the fixture's --cache)
    primed = prime(model, cache, 10, 8, output=True)  # 9 offloaded: layers 10-17 and the output
    assert primed.tensors == 1 and primed.written == 1 and primed.bytes > 100 * 2**20  # the tied embeddings
    before = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    split = run_model(model, 9, [socket_path], rbee_env)
    assert split["text"] and split["report"]["layers_offloaded"] == 9
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == before
    assert prime(model, cache, 10, 8, output=True).written == 0  # a second share hashes and writes nothing


def test_the_share_sits_in_a_network_namespace_of_its_own(share: tuple[Path, subprocess.Popen[str]]) -> None:
    socket_path, process = share
    assert os.readlink(f"/proc/{process.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert oct(socket_path.parent.stat().st_mode & 0o777) == "0o700"
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert 50052 not in listening, "the RPC server's port must not be on the host's loopback"


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(), reason="needs root (a second user)")
def test_another_user_reaches_neither_the_share_nor_the_main_side_bridge(
        share: tuple[Path, subprocess.Popen[str]], tmp_path: Path) -> None:
    socket_path, _ = share
    ensure_user(INTRUDER)
    os.chmod(tmp_path, 0o755)  # the intruder may walk up to the share's own 0700 folder

    async def scene() -> dict[str, str]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()

        far = tmp_path / "far.sock"
        echo_server = await asyncio.start_unix_server(echo, path=str(far))
        bridge, port = await tcp_to_unix(lambda: asyncio.open_unix_connection(str(far)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"mine")
        mine = await asyncio.wait_for(reader.read(100), 10)
        writer.close()
        attack = ("import json, socket\nout = {}\n"
                  "def tryit(name, family, address):\n"
                  "    try:\n"
                  "        s = socket.socket(family); s.settimeout(5); s.connect(address); s.sendall(b'hello')\n"
                  "        out[name] = 'read ' + repr(s.recv(100))\n"
                  "    except OSError as exc:\n"
                  "        out[name] = type(exc).__name__\n"
                  f"tryit('share', socket.AF_UNIX, {str(socket_path)!r})\n"
                  "tryit('rpc_port', socket.AF_INET, ('127.0.0.1', 50052))\n"
                  f"tryit('bridge', socket.AF_INET, ('127.0.0.1', {port}))\n"
                  "print(json.dumps(out))\n")
        done = await asyncio.to_thread(
            subprocess.run, [RUNUSER, "-u", INTRUDER, "--", "/usr/bin/python3", "-c", attack],
            capture_output=True, text=True, timeout=60, cwd="/tmp", env={"PATH": "/usr/bin:/bin"})
        bridge.close()
        echo_server.close()
        assert done.returncode == 0, done.stderr
        return {**json.loads(done.stdout), "owner": mine.decode()}

    seen = asyncio.run(scene())
    assert seen["owner"] == "mine"  # the bridge serves its own user
    assert seen["share"] == "PermissionError"
    assert seen["rpc_port"] == "ConnectionRefusedError"
    assert seen["bridge"] in ("read b''", "ConnectionResetError"), seen  # hung up on, unread


def test_a_share_ends_with_its_parent(tmp_path: Path, rbee_env: dict[str, str]) -> None:
    socket_path = tmp_path / "orphan" / "rpc.sock"
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-m', "
         f"'rbee.worker.rpc_share', '--socket', {str(socket_path)!r}, '--parent-pid', str(__import__('os').getpid())]);"
         " time.sleep(60)"], env=rbee_env)
    deadline = time.monotonic() + 60
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert socket_path.exists()
    parent.kill()
    parent.wait()
    while socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not socket_path.exists(), "the share must end once the process that started it is gone"
