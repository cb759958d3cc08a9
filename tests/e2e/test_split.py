"""A model split across two loopback sshd hosts with llama.cpp's RPC backend, driven through the
`rbee` CLI: neither host's `memory` holds the default model's worker alone, so `rbee infer` splits
it with no flags, the main worker on one host and a share on the other, reached over the queen's
SSH connections; the text equals the unsplit engine's. A share or its hive stopped (SIGSTOP) or
killed, or the SSH connection that carries it cut, mid-stream ends the job with `peer_down`
naming its host, and nothing is left on either host.

Why 360 MB each and not the issue's "60 %": llama.cpp puts the output projection, and the logits'
compute buffer, with the last offloaded layer; the default model ties that projection to its
262k-entry embeddings (178 MB, 70 % of the file), so the helper holds a copy of it besides its
layers (rbee.queen.split; docs/operations.md, "Models bigger than one host").
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from bench.split import run_child
from rbee.queen.split_job import STRAY_GRACE_S
from tests import sshd_hosts
from tests.e2e.test_fleet import RBEE, Fleet, two_hosts
from tests.e2e.test_intruder import INTRUDER, RUNUSER
from tests.helpers import interruptible
from tests.sshd_hosts import ensure_user

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sshd_hosts.available() is not None, reason=str(sshd_hosts.available())),
]

PROMPT = "The three primary colours are"
CAP = 'memory = "360MB"\n'  # the worker alone needs 0.39 GB at 4096 tokens; split, 0.30 + 0.35 GB


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Fleet]:
    # this machine's own hive may not take part: the split is the two hosts'
    # `long`: the default model at its full trained context, which the two hosts do not hold even together
    extra = '[[hive]]\nname = "localhost"\nmemory = "1MB"\n\n[models.long]\ngguf = "gemma3-270m"\nctx = 32768\n'
    with two_hosts(tmp_path_factory.mktemp("split"), extra=extra, per_host={"h1": CAP, "h2": CAP}) as state:
        yield state


def shares_on(host: sshd_hosts.Host) -> list[psutil.Process]:
    return [p for p in host.rbee_processes() if "rbee.worker.rpc_share" in " ".join(p.cmdline())]


def workers_on(host: sshd_hosts.Host) -> list[psutil.Process]:
    return [p for p in host.rbee_processes() if "rbee.worker" in p.cmdline()[2:3]]


def nothing_left(fleet: Fleet, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(shares_on(h) or workers_on(h) for h in fleet.hosts):
        assert time.monotonic() < deadline, {h.name: [p.cmdline() for p in shares_on(h) + workers_on(h)]
                                             for h in fleet.hosts}
        time.sleep(0.1)


@pytest.mark.timeout(900)
def test_fleet_up_and_the_model_on_the_main_host(fleet: Fleet) -> None:
    result = fleet.rbee("fleet", "up", timeout=800)
    assert result.returncode == 0, result.stderr + result.stdout
    pulled = fleet.rbee("models", "pull", "gemma3-270m", "--node", "h1", timeout=300)
    assert pulled.returncode == 0, pulled.stderr


@pytest.mark.timeout(300)
def test_fleet_plan_shows_the_split(fleet: Fleet) -> None:
    plan = subprocess.run([*RBEE, "fleet", "plan", "-i", str(fleet.inventory)], env={**fleet.env, "COLUMNS": "400"},
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    line = next((line for line in plan.stdout.splitlines() if "│ gemma3-270m" in line), "")
    assert "split across h1: " in line and "; h2: " in line and "and the output layer" in line, plan.stdout
    refused = next((line for line in plan.stdout.splitlines() if "│ long" in line), "")
    assert "cannot load long: with 32768 tokens of context it needs" in refused, plan.stdout
    assert "the fleet together has 0.72 GB (h1 0.36 GB free; h2 0.36 GB free" in refused, plan.stdout


@pytest.mark.timeout(300)
def test_infer_splits_with_no_flags_and_says_so(fleet: Fleet, models_dir: Path) -> None:
    expected = run_child(next(models_dir.rglob("*.gguf")), 0, [], 24)[0]["text"]
    result = fleet.rbee("infer", "-m", "gemma3-270m", "--ctx", "4096", "--temperature", "0", "--max-tokens", "24",
                        PROMPT)
    assert result.returncode == 0, result.stderr
    assert "split across h1: " in result.stderr and "; h2: " in result.stderr and "over RPC" in result.stderr
    assert "h2 serves" in result.stderr, result.stderr
    # h2 got its own copy (pulled as for any job) and its share read the tied embeddings from it
    assert "1 tensor (178 MB) read from its own copy of the model" in result.stderr, result.stderr
    # written there by h2's pull, with its progress, before the share started
    assert re.search(r"h2: filling the RPC cache for layers \d+–\d+ and the output from gemma3-270m: "
                     r"178\.\d/178\.\d MB \(100%", result.stderr), result.stderr
    assert result.stdout.strip() == expected.strip()
    nothing_left(fleet)  # keep_alive 0: the main worker and the share end with the job


def workers_listed(fleet: Fleet, ready: Callable[[list[str]], bool], timeout: float = 30) -> list[str]:
    """The rows of `rbee workers list` once ``ready`` holds for them (the hives' heartbeats carry it)."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([*RBEE, "workers", "list", "-i", str(fleet.inventory)],
                              env={**fleet.env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
        if ready(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def start_long_infer(fleet: Fleet) -> subprocess.Popen[str]:
    """A split job that runs until stopped; returns once its first text has arrived."""
    process = subprocess.Popen([*RBEE, "infer", "-m", "gemma3-270m", "--ctx", "4096", "--temperature", "0",
                                "--max-tokens", "2000", "-i", str(fleet.inventory), PROMPT],
                               env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    assert process.stdout is not None
    first = process.stdout.read(1)  # the stream has begun: the share is serving
    assert first, process.stderr.read() if process.stderr else ""
    return process


@pytest.mark.timeout(300)
def test_another_user_of_the_helper_host_reaches_no_share(fleet: Fleet) -> None:
    process = start_long_infer(fleet)
    try:
        share = shares_on(fleet.hosts[1])[0]
        socket_path = share.cmdline()[share.cmdline().index("--socket") + 1]
        attack = ("import json, socket\nout = {}\n"
                  f"for name, family, address in (('share', socket.AF_UNIX, {socket_path!r}), "
                  "('port', socket.AF_INET, ('127.0.0.1', 50052))):\n"
                  "    try:\n"
                  "        s = socket.socket(family); s.settimeout(5); s.connect(address); out[name] = 'connected'\n"
                  "    except OSError as exc:\n"
                  "        out[name] = type(exc).__name__\n"
                  "print(json.dumps(out))\n")
        ensure_user(INTRUDER)
        done = subprocess.run([RUNUSER, "-u", INTRUDER, "--", "/usr/bin/python3", "-c", attack], capture_output=True,
                              text=True, timeout=60, cwd="/tmp", env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"share": "PermissionError", "port": "ConnectionRefusedError"}
        listed = workers_listed(fleet, lambda rows: any("split helper" in r for r in rows))
        assert any("│ h1 " in r and "split main, 1 helper" in r and "gemma" in r for r in listed), listed
        assert any("│ h2 " in r and "split helper" in r and " up " in r and "llama.cpp RPC" in r
                   for r in listed), listed
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl+C: the keeper cancels the job, the queen tears the split down
        process.communicate(timeout=60)
    nothing_left(fleet)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("target", "sig"), [("share", signal.SIGSTOP), ("share", signal.SIGKILL),
                                             ("tunnel", signal.SIGKILL), ("hive", signal.SIGSTOP),
                                             ("hive", signal.SIGKILL)])  # last: h2 has no hive after it
def test_a_helper_stopped_killed_or_cut_off_mid_stream_ends_the_job_naming_its_host(fleet: Fleet, target: str,
                                                                            sig: int) -> None:
    h2 = fleet.hosts[1]
    process = start_long_infer(fleet)
    share = shares_on(h2)
    assert share, "the share runs as h2's user"
    hive = next(p for p in h2.rbee_processes() if "rbee.hive" in p.cmdline())
    # the tunnel: the queen's SSH connection to h2, which carries the share's traffic (its sshd
    # session, as h2's user); the hive and the share live on, the queen reconnects
    sessions = [p.pid for p in h2.processes() if p.name() == "sshd"]
    assert sessions, "the queen's SSH session runs as the host user"
    victims = {"share": [share[0].pid], "hive": [hive.pid], "tunnel": sessions}[target]
    for victim in victims:
        os.kill(victim, sig)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    ended = time.monotonic() - started
    assert process.returncode != 0
    assert "h2, which holds" in stderr and ("peer_down" in stderr or "is down" in stderr or "lost its share" in
                                            stderr or "stopped answering" in stderr), stderr
    assert ended < 3 * 0.5 + 5, f"the job took {ended:.1f} s to end"
    if target == "hive" and sig == signal.SIGSTOP:
        os.kill(hive.pid, signal.SIGCONT)  # back: the queen stops the share no job holds any more
    nothing_left(fleet, timeout=STRAY_GRACE_S + 20)  # a killed hive's share ends with its parent
