"""The fleet over real OpenSSH servers: each "host" its own unix user, no SSH mocks.

One module-scoped fleet (two hosts), driven through the `rbee` CLI like an operator
would, in the order an operator would: up, status, infer on each, idempotent up,
kill a hive, remove a host, down.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rbee.engine.build import BUILD_ID
from rbee.engine.proof import recorded
from tests import sshd_hosts
from tests.conftest import assert_no_orphans

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sshd_hosts.available() is not None, reason=str(sshd_hosts.available())),
]

RBEE = [sys.executable, "-m", "rbee.keeper"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Fleet:
    hosts: list[sshd_hosts.Host]
    client_key: Path
    inventory: Path
    known_hosts: Path
    env: dict[str, str]
    workdir: Path

    def rbee(self, *args: str, timeout: float = 300, inventory: Path | None = None) -> subprocess.CompletedProcess[str]:
        command = [*RBEE, *args]
        if args[0] in ("fleet", "infer") and not any(a in ("-i", "--inventory") for a in args):
            command += ["-i", str(inventory or self.inventory)]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def status(self) -> str:
        wide = {**self.env, "COLUMNS": "400"}
        return subprocess.run([*RBEE, "fleet", "status", "-i", str(self.inventory)], env=wide, capture_output=True,
                              text=True, timeout=300).stdout


@contextlib.contextmanager
def two_hosts(workdir: Path, extra: str = "", per_host: dict[str, str] | None = None) -> Iterator[Fleet]:
    """Two loopback sshd hosts and a queen of their own; at the end, nothing of rbee left on either."""
    hosts, client_key = sshd_hosts.start_hosts(workdir / "sshd", 2)
    inventory = sshd_hosts.write_inventory(workdir / "inventory.toml", hosts, client_key, workdir / "known_hosts",
                                           extra=extra, per_host=per_host)
    home = workdir / "queen-home"
    env = dict(os.environ)
    env.update(
        RBEE_HOME=str(home),
        RBEE_QUEEN_URL=f"http://127.0.0.1:{free_port()}",
        RBEE_HEARTBEAT_INTERVAL="0.5",
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    env.pop("RBEE_INVENTORY", None)
    state = Fleet(hosts, client_key, inventory, workdir / "known_hosts", env, workdir)
    try:
        yield state
    finally:
        state.rbee("fleet", "down", timeout=120)
        state.rbee("queen", "stop", timeout=60)
        sshd_hosts.stop_hosts(hosts)
        assert_no_orphans(home)
        for host in hosts:
            assert not host.rbee_processes(), f"rbee processes left on {host.name}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Fleet]:
    with two_hosts(tmp_path_factory.mktemp("fleet"), per_host={"h2": 'memory = "8GB"\n'}) as state:
        yield state


def test_fleet_up_installs_both_hosts_offline_and_starts_them(fleet: Fleet) -> None:
    started = time.monotonic()
    result = fleet.rbee("fleet", "up")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.count("install") >= 2, result.stdout
    for host in fleet.hosts:
        assert (host.home / ".rbee" / "venv" / "bin" / "python").exists()
        assert (host.home / ".rbee" / "install.json").exists()
        assert (host.home / ".rbee").stat().st_mode & 0o777 == 0o700  # logs, hive.json: the host user's only
        assert any("rbee.hive" in " ".join(p.cmdline()) for p in host.rbee_processes())
    print(f"\nfleet up, 2 hosts from clean: {elapsed:.1f} s")
    kept = recorded()
    assert kept is not None, "scripts/setup proves the engine here"
    for host in fleet.hosts:
        # the same-platform host got the queen's portable wheel, and proved it there by decoding
        assert f"hive:{host.name}: engine proven: llama-cpp-python" in result.stderr, result.stderr
        verdict = json.loads((host.home / ".rbee" / "venv" / "rbee-engine.json").read_text())
        assert verdict["build"] == "portable" and verdict["variant"] == kept.variant and verdict["tokens"]
    status = fleet.status()
    for host in fleet.hosts:
        line = next(line for line in status.splitlines() if f" {host.name} " in line)
        assert " up " in line and "cores" in line, status
        assert f"CPU variant {kept.variant}, proven" in line, status
    # h2's `memory = "8GB"` is its hive's budget (issue 25.1); h1 has none
    budgets = {host.name: {cmd[cmd.index("--memory-budget") + 1] for p in host.rbee_processes()
                           if "--memory-budget" in (cmd := p.cmdline())} for host in fleet.hosts}
    assert budgets == {"h1": {"0"}, "h2": {"8000000000"}}, budgets


@pytest.mark.parametrize("node", ["h1", "h2"])
def test_infer_on_each_node_streams_through_the_tunnels(fleet: Fleet, node: str) -> None:
    result = fleet.rbee("infer", "--node", node, "--max-tokens", "16", "--temperature", "0", "The capital of France is")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert f"hive:{node}" in result.stderr and "done: 16 tokens" in result.stderr
    host = next(h for h in fleet.hosts if h.name == node)
    workers = [p for p in host.rbee_processes() if "rbee.worker" in " ".join(p.cmdline())]
    assert workers, "the worker runs as the host's user"


def test_second_fleet_up_installs_nothing(fleet: Fleet) -> None:
    started = time.monotonic()
    result = fleet.rbee("fleet", "up")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert "install" not in result.stdout.replace("installed", "")
    print(f"\nidempotent fleet up: {elapsed:.2f} s")  # a figure for the log, not a test: machines differ


def test_unknown_node_lists_known_ones(fleet: Fleet) -> None:
    result = fleet.rbee("infer", "--node", "nope", "hi")
    assert result.returncode != 0
    assert "unknown node 'nope'" in result.stderr and "h1" in result.stderr and "h2" in result.stderr


def test_killed_hive_is_marked_down_and_infer_fails_fast(fleet: Fleet) -> None:
    host = fleet.hosts[1]
    hive = next(p for p in host.rbee_processes() if "rbee.hive" in " ".join(p.cmdline()))
    os.kill(hive.pid, signal.SIGKILL)
    deadline = time.monotonic() + 3 * 0.5 + 1.5
    while True:
        line = next(line for line in fleet.status().splitlines() if f" {host.name} " in line)
        if " down " in line:
            break
        assert time.monotonic() < deadline, line
    assert "missed 3 heartbeats" in line
    started = time.monotonic()
    result = fleet.rbee("infer", "--node", host.name, "hi")
    assert result.returncode != 0
    assert f"node '{host.name}' is down" in result.stderr and "rbee fleet up" in result.stderr
    assert time.monotonic() - started < 10
    # its orphaned worker notices the hive is gone and exits
    deadline = time.monotonic() + 15
    while any("rbee.worker" in " ".join(p.cmdline()) for p in host.rbee_processes()):
        assert time.monotonic() < deadline, "the worker of a killed hive did not exit"
        time.sleep(0.1)
    # `fleet up` brings it back
    assert fleet.rbee("fleet", "up").returncode == 0
    assert " up " in next(line for line in fleet.status().splitlines() if f" {host.name} " in line)


def test_removing_a_host_from_the_inventory_stops_it(fleet: Fleet) -> None:
    smaller = fleet.workdir / "inventory-h1-only.toml"
    sshd_hosts.write_inventory(smaller, fleet.hosts[:1], fleet.client_key, fleet.workdir / "known_hosts-h1")
    result = fleet.rbee("fleet", "up", inventory=smaller)
    assert result.returncode == 0, result.stderr
    assert "stop" in result.stdout
    gone = fleet.hosts[1]
    deadline = time.monotonic() + 20
    while gone.rbee_processes():
        assert time.monotonic() < deadline, [p.cmdline() for p in gone.rbee_processes()]
        time.sleep(0.1)
    status = fleet.rbee("fleet", "status", inventory=smaller).stdout
    assert f" {gone.name} " not in status, "a removed host must not linger in status"
    assert fleet.rbee("fleet", "up").returncode == 0  # the full inventory again


def worker_pids(host: sshd_hosts.Host, module: str = "rbee.worker") -> set[int]:
    return {p.pid for p in host.rbee_processes() if module in " ".join(p.cmdline())}


def line_of(fleet: Fleet, name: str) -> str:
    return next(line for line in fleet.status().splitlines() if f" {name} " in line)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_dropped_ssh_connection_is_reopened_and_the_hive_keeps_its_workers(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    assert fleet.rbee("infer", "--node", host.name, "--max-tokens", "4", "Hi").returncode == 0
    hives, workers = worker_pids(host, "rbee.hive"), worker_pids(host)
    assert hives and workers
    sessions = [p for p in host.processes() if p.name() == "sshd"]
    assert sessions, "the queen's SSH session runs as the host user"
    for session in sessions:
        session.kill()
    wait_for(lambda: " up " in line_of(fleet, host.name), 15, "the hive did not come back up")
    result = fleet.rbee("infer", "--node", host.name, "--max-tokens", "4", "Hi")
    assert result.returncode == 0, result.stderr
    assert "reusing warm" in result.stderr
    assert worker_pids(host, "rbee.hive") == hives and worker_pids(host) == workers


def test_a_stream_cut_by_a_dropped_ssh_connection_resumes_with_every_token(fleet: Fleet) -> None:
    """Kill the SSH connection that carries a hive's tunnel mid-stream: the queen re-opens it,
    resumes the hive's stream after the last event it had (Last-Event-ID), and the answer
    is the same, token for token, as an undisturbed run at temperature 0."""
    host = fleet.hosts[0]
    args = ["infer", "--node", host.name, "--max-tokens", "96", "--temperature", "0", "--seed", "5",
            "Count from one to fifty in words: one, two, three,"]
    assert fleet.rbee(*args).returncode == 0  # once first: the runs compared both reuse the cached prompt
    undisturbed = fleet.rbee(*args)
    assert undisturbed.returncode == 0, undisturbed.stderr
    sessions = {p.pid for p in host.processes() if p.name() == "sshd"}
    assert sessions, "the queen's SSH session runs as the host user"
    process = subprocess.Popen([*RBEE, *args, "-i", str(fleet.inventory)], env=fleet.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        head = b""
        while len(head) < 16:  # tokens are flowing through the tunnel (os.read: nothing left in a buffer)
            chunk = os.read(process.stdout.fileno(), 16 - len(head))
            assert chunk, "the command ended before its answer streamed"
            head += chunk
        for session in [p for p in host.processes() if p.pid in sessions]:
            session.kill()
        tail, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err.decode()
    assert (head + tail).decode() == undisturbed.stdout
    assert {p.pid for p in host.processes() if p.name() == "sshd"} - sessions, "a new SSH session was opened"


def test_another_fleet_hosts_user_is_refused_by_a_hive(fleet: Fleet) -> None:
    """h2's user shares h1's loopback (one machine here, as two users of one host would): it can
    reach h1's hive and the queen's forward there, and gets 401 for everything but liveness."""
    from tests.e2e.test_intruder import ATTACK, RUNUSER

    record = json.loads((fleet.hosts[0].home / ".rbee" / "run" / "hive.json").read_text())
    hive = record["url"]
    requests = [["GET", f"{hive}/v1/workers", None, {}], ["GET", f"{hive}/v1/status", None, {}],
                ["POST", f"{hive}/v1/jobs", {"prompt": "hi"}, {}], ["POST", f"{hive}/v1/admin/shutdown", None, {}],
                ["POST", f"{hive}/v1/admin/queen", {"url": "http://127.0.0.1:9"}, {}],
                ["GET", f"{hive}/health", None, {}]]
    done = subprocess.run([RUNUSER, "-u", fleet.hosts[1].user, "--", "/usr/bin/python3", "-c", ATTACK],
                          input=json.dumps(requests), capture_output=True, text=True, timeout=60, cwd="/tmp",
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    statuses = [status for status, _ in json.loads(done.stdout)]
    assert statuses == [401, 401, 401, 401, 401, 200], statuses
    assert " up " in line_of(fleet, fleet.hosts[0].name)


def test_queen_restart_reattaches_without_reinstalling(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    workers = worker_pids(host)
    installed = (host.home / ".rbee" / "install.json").stat().st_mtime
    assert fleet.rbee("queen", "stop").returncode == 0
    started = fleet.rbee("queen", "start", "-i", str(fleet.inventory))
    assert started.returncode == 0, started.stderr
    wait_for(lambda: all(" up " in line_of(fleet, h.name) for h in fleet.hosts), 20, "hives did not re-register")
    result = fleet.rbee("infer", "--node", host.name, "--max-tokens", "4", "Hi")
    assert result.returncode == 0, result.stderr
    assert "reusing warm" in result.stderr and worker_pids(host) == workers
    assert (host.home / ".rbee" / "install.json").stat().st_mtime == installed


@pytest.fixture
def shared_models(models_dir: Path) -> Iterator[tuple[Path, Path]]:
    """Copies of the GGUF and of a tiny MLX model that the host users can read."""
    pytest.importorskip("mlx_lm")
    from tests.mlx_model import write_tiny_mlx_model

    folder = Path(tempfile.mkdtemp(prefix="rbee-shared-models-"))
    folder.chmod(0o755)
    gguf = folder / "gemma.gguf"
    shutil.copyfile(next(models_dir.glob("gemma3-270m/*.gguf")), gguf)
    mlx_dir = write_tiny_mlx_model(folder / "tiny-mlx")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        yield gguf, mlx_dir
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_one_logical_model_on_mlx_and_llama_cpp_hosts(fleet: Fleet, shared_models: tuple[Path, Path]) -> None:
    gguf, mlx_dir = shared_models
    mixed = fleet.workdir / "inventory-mixed.toml"
    text = fleet.inventory.read_text()
    text = text.replace('name = "h1"', 'name = "h1"\nbackend = "mlx"', 1)
    text = text.replace('name = "h2"', 'name = "h2"\nbackend = "llama-cpp"', 1)
    text += f'\n[models.tiny]\ngguf = "file:{gguf}"\nmlx = "file:{mlx_dir}"\n'
    mixed.write_text(text)
    up = fleet.rbee("fleet", "up", inventory=mixed, timeout=900)
    assert up.returncode == 0, up.stderr + up.stdout
    for node, engine in (("h1", "mlx"), ("h2", "llama-cpp")):
        result = fleet.rbee("infer", "-m", "tiny", "--node", node, "--max-tokens", "12", "--temperature", "0",
                            "hello", inventory=mixed)
        assert result.returncode == 0, result.stderr
        assert f" {engine}: " in result.stderr, result.stderr
    status = fleet.rbee("fleet", "status", inventory=mixed).stdout
    assert "on mlx" in status and "on llama-cpp" in status
    back = fleet.rbee("fleet", "up", timeout=900)  # the plain inventory again
    assert back.returncode == 0, back.stderr


@pytest.mark.timeout(1800)
def test_a_host_told_to_build_from_source_builds_llama_cpp_there(fleet: Fleet) -> None:
    """The path a host of another platform takes (PyPI has no llama-cpp-python wheels), forced here
    with `build = "source"`: its source and build tools are pushed, the host's compiler builds it."""
    host = fleet.hosts[1]
    source = fleet.workdir / "inventory-source.toml"
    source.write_text(fleet.inventory.read_text().replace(f'name = "{host.name}"',
                                                          f'name = "{host.name}"\nbuild = "source"', 1))
    wide = {**fleet.env, "COLUMNS": "400"}
    plan = subprocess.run([*RBEE, "fleet", "plan", "-i", str(source)], env=wide, capture_output=True, text=True,
                          timeout=900)
    assert plan.returncode == 0, plan.stderr
    line = next(line for line in plan.stdout.splitlines() if f" {host.name} " in line)
    assert "llama-cpp-python built on the host for the CPU only" in line, plan.stdout
    up = fleet.rbee("fleet", "up", inventory=source, timeout=1700)
    assert up.returncode == 0, up.stderr + up.stdout
    assert f"hive:{host.name}: building llama-cpp-python on the host from the pushed source (cpu" in up.stderr
    assert "llama-cpp-python built on the host in" in up.stderr
    record = json.loads((host.home / ".rbee" / "install.json").read_text())
    assert record["llama_cpp"] == f"source+cpu:{BUILD_ID}"
    result = fleet.rbee("infer", "--node", host.name, "--max-tokens", "8", "--temperature", "0", "Hello",
                        inventory=source)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    back = fleet.rbee("fleet", "up", timeout=900)  # the plain inventory: no second build
    assert back.returncode == 0, back.stderr
    assert "building llama-cpp-python" not in back.stderr


def test_changed_host_key_is_refused(fleet: Fleet) -> None:
    other = fleet.workdir / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    host = fleet.hosts[0]
    forged = fleet.workdir / "known_hosts-forged"
    forged.write_text(f"[{host.address}]:{host.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    inventory = fleet.workdir / "inventory-forged.toml"
    text = fleet.inventory.read_text().replace(str(fleet.known_hosts), str(forged))
    inventory.write_text(text)
    result = fleet.rbee("fleet", "plan", inventory=inventory)
    assert "CHANGED" in result.stdout + result.stderr, result.stdout + result.stderr
    unknown = fleet.workdir / "known_hosts-empty"
    unknown.write_text("")
    inventory.write_text(fleet.inventory.read_text().replace(str(fleet.known_hosts), str(unknown)))
    result = fleet.rbee("fleet", "plan", inventory=inventory)
    assert "rbee fleet trust" in result.stdout + result.stderr


def test_fleet_trust_shows_the_fingerprint_and_asks_before_recording(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    known = fleet.workdir / "known_hosts-trust"
    known.write_text("")
    inventory = fleet.workdir / "inventory-trust.toml"
    inventory.write_text(fleet.inventory.read_text().replace(str(fleet.known_hosts), str(known)))
    command = [*RBEE, "fleet", "trust", host.name, "-i", str(inventory)]
    said_no = subprocess.run(command, input="n\n", env=fleet.env, capture_output=True, text=True, timeout=60)
    assert said_no.returncode != 0 and "SHA256:" in said_no.stderr and "was not trusted" in said_no.stderr
    assert known.read_text() == "", "nothing may be written before the operator says yes"
    said_yes = subprocess.run([*command, "--yes"], env=fleet.env, capture_output=True, text=True, timeout=60)
    assert said_yes.returncode == 0, said_yes.stderr
    assert f"[{host.address}]:{host.port} " in known.read_text()


def test_bad_inventory_starts_nothing(fleet: Fleet, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[hive]]\nname = "x"\nssh = "not a target"\n')
    env = {**fleet.env, "RBEE_HOME": str(tmp_path / "home"), "RBEE_QUEEN_URL": f"http://127.0.0.1:{free_port()}"}
    result = subprocess.run([*RBEE, "fleet", "up", "-i", str(bad)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}:3: hive.0.ssh" in result.stderr
    assert not (tmp_path / "home").exists(), "nothing may start for a broken inventory"


def test_fleet_down_leaves_no_rbee_process_on_either_host(fleet: Fleet) -> None:
    result = fleet.rbee("fleet", "down")
    assert result.returncode == 0, result.stderr
    for host in fleet.hosts:
        deadline = time.monotonic() + 20
        while host.rbee_processes():
            assert time.monotonic() < deadline, [p.cmdline() for p in host.rbee_processes()]
            time.sleep(0.1)


