"""Another unix user of the machine attacks a running fleet: every route of queen, hive and
worker, a heartbeat hijack, an inventory swap, the secret file, and a fake queen on the
keeper's port. The intruder runs as its own user, with the system's Python, stdlib only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee.link.client import LinkClient
from tests.helpers import RBEE, owner_headers, owner_token, queen, warm_up
from tests.server.test_security import apps, routes
from tests.sshd_hosts import ensure_user

INTRUDER = "rbee-intruder"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
INTRUDER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # nothing of the owner's environment

CAN_SWITCH = os.geteuid() == 0 and Path(RUNUSER).exists() and Path("/usr/bin/python3").exists()
pytestmark = pytest.mark.skipif(not CAN_SWITCH, reason="needs root, runuser and /usr/bin/python3 (a second user)")

ATTACK = r"""
import json, sys, urllib.request
results = []
for method, url, body, headers in json.load(sys.stdin):
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     method=method, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            results.append([response.status, response.read().decode(errors="replace")[:300]])
    except urllib.error.HTTPError as exc:
        results.append([exc.code, exc.read().decode(errors="replace")[:300]])
    except Exception as exc:
        results.append([0, repr(exc)])
print(json.dumps(results))
"""


def as_intruder(program: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    ensure_user(INTRUDER)
    return subprocess.run([RUNUSER, "-u", INTRUDER, "--", "/usr/bin/python3", "-c", program], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd="/tmp", env=INTRUDER_ENV)


def attack(requests: list[tuple[str, str, Any, dict[str, str]]]) -> list[tuple[int, str]]:
    done = as_intruder(ATTACK, json.dumps(requests))
    assert done.returncode == 0, done.stderr
    return [(status, body) for status, body in json.loads(done.stdout)]


async def test_another_user_is_refused_by_every_route_of_queen_hive_and_worker(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    async with queen(rbee_env) as url:
        async with LinkClient(url, "queen", token=owner_token()) as client:
            await warm_up(client)
        async with httpx.AsyncClient(headers=owner_headers(), base_url=url) as http:
            hive = (await http.get("/v1/hives")).json()["hives"][0]
            worker = (await http.get("/v1/workers")).json()["workers"][0]
        targets = {"queen": url, "hive": hive["url"], "worker": worker["url"]}
        requests = []
        for role, app in apps(tmp_path / "apps").items():
            for method, path in routes(app):
                for headers in ({}, {"Authorization": "Bearer guessed"}):
                    requests.append((method, targets[role] + path, {}, headers))
        # a heartbeat hijack (point localhost's jobs at the intruder) and an inventory swap
        evil = "/tmp/rbee-intruder-inventory.toml"
        hijacks = [
            ("POST", f"{url}/v1/hives/localhost/heartbeat", {"name": "localhost", "url": "http://127.0.0.1:9"}, {}),
            ("POST", f"{url}/v1/fleet/jobs", {"action": "up", "inventory": evil}, {}),
            ("POST", f"{url}/v1/fleet/plan", {"inventory": evil}, {}),
            ("POST", f"{url}/v1/admin/shutdown", None, {}),
            ("POST", f"{url}/v1/dashboard/logins", {}, {}),  # a dashboard login needs the owner's key
        ]
        answers = attack(requests + hijacks)
        for (method, target, _, headers), (status, body) in zip(requests + hijacks, answers, strict=True):
            if method == "GET" and target.endswith("/health"):
                assert status == 200 and set(json.loads(body)) == {"role"}, (target, body)  # liveness only
            elif method == "GET" and target == f"{url}/":
                assert status == 200 and body == "Ollama is running", body  # Ollama's liveness text only
            elif method == "GET" and not headers and (target in (f"{url}/dashboard", f"{url}/dashboard/")
                                                      or target.startswith(f"{url}/dashboard/static/")):
                # the dashboard's login notice (its files: 404), naming no hive, worker or model
                assert status in (200, 404) and "localhost" not in body and "csrf" not in body, (target, body)
            else:
                assert status == 401, (method, target, headers, status, body)
        print(f"\n{len(answers)} requests of another user: {sum(s == 401 for s, _ in answers)} refused (401), "
              f"{sum(s == 200 for s, _ in answers)} bare liveness answers or login notices (/health, Ollama's /, "
              "/dashboard/)")
        # the owner notices nothing: the fleet still serves, and nothing of the hijack stuck
        async with LinkClient(url, "queen", token=owner_token()) as client:
            again = await warm_up(client)
        assert again[-1].type == "end"
        async with httpx.AsyncClient(headers=owner_headers(), base_url=url) as http:
            assert (await http.get("/v1/hives")).json()["hives"][0]["url"] == hive["url"]
    secret = Path(rbee_env["RBEE_HOME"]) / "secret"
    read = as_intruder(f"print(open({str(secret)!r}).read())")
    assert read.returncode != 0 and "Permission denied" in read.stderr


FAKE_QUEEN = r"""
import http.server, json, sys
class Fake(http.server.BaseHTTPRequestHandler):
    def answer(self):
        with open(sys.argv[1], "a") as log:
            log.write(json.dumps(dict(self.headers)) + "\n")
        body = json.dumps({"role": "queen"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Fake)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_a_fake_queen_on_the_port_gets_nothing_from_the_keeper(rbee_env: dict[str, str], tmp_path: Path) -> None:
    """Another user binds the queen's port first and pretends to be the queen."""
    ensure_user(INTRUDER)
    seen = Path("/tmp") / f"rbee-fake-queen-{os.getpid()}.log"
    seen.unlink(missing_ok=True)
    fake = subprocess.Popen([RUNUSER, "-u", INTRUDER, "--", "/usr/bin/python3", "-c", FAKE_QUEEN, str(seen)],
                            stdout=subprocess.PIPE, text=True, cwd="/tmp", env=INTRUDER_ENV, start_new_session=True)
    try:
        assert fake.stdout is not None
        port = int(fake.stdout.readline())
        env = {**rbee_env, "RBEE_QUEEN_URL": f"http://127.0.0.1:{port}"}
        started = time.monotonic()
        done = subprocess.run([*RBEE, "infer", "--max-tokens", "4", "a secret prompt"], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "cannot prove it holds your secret" in done.stderr and "Nothing was sent to it" in done.stderr
        assert time.monotonic() - started < 30
    finally:
        os.killpg(fake.pid, signal.SIGKILL)  # runuser and the intruder's python under it
        fake.wait()
    received = seen.read_text() if seen.exists() else ""
    seen.unlink(missing_ok=True)
    assert received, "the keeper never asked: the test proves nothing"
    assert "Authorization" not in received and owner_token() not in received and "secret prompt" not in received


def test_the_intruder_cannot_run_python_as_the_owner() -> None:
    """The premise of the suite: the intruder really is another user."""
    done = as_intruder("import os; print(os.geteuid())")
    assert done.returncode == 0 and int(done.stdout) != os.geteuid(), sys.executable


FLOOD = r"""
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    try:
        held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5))
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(float(sys.argv[3]))
"""


async def test_a_flood_of_idle_connections_does_not_lock_the_owner_out(rbee_env: dict[str, str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23.13: 400 idle connections from another user took every descriptor of a queen
    under `ulimit -n 256`, and the owner was locked out for ~75 s."""
    import resource

    monkeypatch.setenv("RBEE_MAX_CONNECTIONS", "32")
    ensure_user(INTRUDER)
    async with contextlib.AsyncExitStack() as stack:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the queen starts under `ulimit -n 256`
        try:
            url = await stack.enter_async_context(queen(rbee_env))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        flood = await asyncio.create_subprocess_exec(
            RUNUSER, "-u", INTRUDER, "--", "/usr/bin/python3", "-c", FLOOD, url.rsplit(":", 1)[1], "400", "20",
            stdout=asyncio.subprocess.PIPE, cwd="/tmp", env=INTRUDER_ENV, start_new_session=True)
        stack.push_async_callback(flood.wait)
        stack.callback(os.killpg, flood.pid, signal.SIGKILL)  # runuser and the intruder's python under it
        assert flood.stdout is not None
        opened = int(await flood.stdout.readline())
        assert opened >= 300, opened  # all accepted; the idle ones were evicted to make room
        started = time.monotonic()
        async with httpx.AsyncClient(headers=owner_headers(), base_url=url, timeout=5) as http:
            for _ in range(5):
                assert (await http.get("/v1/hives")).status_code == 200
        assert time.monotonic() - started < 5
        queen_process = next(p for p in psutil.process_iter(["cmdline"]) if "rbee.queen" in " ".join(
            p.info["cmdline"] or []) and any(rbee_env["RBEE_HOME"] in part for part in p.info["cmdline"]))
        held = [c for c in queen_process.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED]
        assert len(held) <= 32 + 8, len(held)  # the cap, plus the queen's own links
