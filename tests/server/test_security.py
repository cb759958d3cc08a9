"""Network mode, per endpoint: every route of queen, hive and worker refuses a request
without the bearer token (401), and accepts it with the token."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from quart import Quart, Response, request

from rbee.config import HiveConfig, QueenConfig, WorkerConfig
from rbee.errors import ConfigError, UnprovenPeerError
from rbee.hive.app import create_app as hive_app
from rbee.hive.models import ModelCatalog
from rbee.hive.service import Hive
from rbee.hive.supervisor import Supervisor
from rbee.keeper.session import queen_answers, stop_persistent
from rbee.link.auth import CHALLENGE, PROOF, Callee, load_token, proves
from rbee.link.client import LinkClient
from rbee.link.jobs import JobRegistry, new_job_id
from rbee.queen.app import create_app as queen_app
from rbee.queen.fleet.ssh import Command
from rbee.queen.service import Queen
from rbee.worker.app import create_app as worker_app
from rbee.worker.runner import ModelRunner
from tests.fake_step import FakeBackend
from tests.helpers import served

TOKEN = "s3cret-token-0123456789abcdef"


def apps(tmp_path: Path) -> dict[str, Quart]:
    queen = Queen(QueenConfig(home=tmp_path / "q"), "http://127.0.0.1:7833", TOKEN)
    hive_config = HiveConfig(home=tmp_path / "h", models_dir=tmp_path / "m")
    hive = Hive(hive_config, Supervisor(hive_config, "http://127.0.0.1:7835", TOKEN), ModelCatalog(tmp_path), TOKEN)
    worker_config = WorkerConfig("w-1", tmp_path / "m.gguf", "http://127.0.0.1:9")
    runner = ModelRunner(FakeBackend(), worker_config.model_path)
    worker = worker_app(worker_config, runner, JobRegistry(worker_config.actor), asyncio.Event(), TOKEN)
    return {"queen": queen_app(queen), "hive": hive_app(hive), "worker": worker}


def routes(app: Quart) -> list[tuple[str, str]]:
    found = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", "x")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((method, path))
    return found


@pytest.mark.parametrize("role", ["queen", "hive", "worker"])
async def test_every_endpoint_refuses_a_request_without_the_token(role: str, tmp_path: Path) -> None:
    app = apps(tmp_path)[role]
    client = app.test_client()
    checked = routes(app)
    assert len(checked) >= 5
    for method, path in checked:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = await client.open(path, method=method, headers=headers, json={})
            body = await response.get_json()
            assert TOKEN not in (await response.get_data(as_text=True))
            if (method, path) == ("GET", "/health"):  # a bare liveness answer: who is there, nothing more
                assert response.status_code == 200 and set(body) == {"role"}, (role, body)
                continue
            if (role, method, path) == ("queen", "GET", "/"):  # Ollama's liveness text, nothing more
                assert response.status_code == 200 and await response.get_data(as_text=True) == "Ollama is running"
                continue
            if role == "queen" and method == "GET" and path in ("/dashboard", "/dashboard/"):
                page = await response.get_data(as_text=True)  # the login notice (or, with a wrong key, a 401)
                assert response.status_code in (200, 308, 401) and "localhost" not in page and "csrf" not in page
                continue
            if role == "queen" and (method, path) == ("GET", "/dashboard/static/x"):
                assert response.status_code in (401, 404)  # the page's own files only
                continue
            assert response.status_code == 401, (role, method, path, headers, response.status_code)
            if path.startswith("/api/"):  # Ollama's error shape: a string its clients show
                assert "Bearer" in body["error"], body
            else:
                assert body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("role", ["queen", "hive", "worker"])
async def test_the_token_opens_the_door(role: str, tmp_path: Path) -> None:
    app = apps(tmp_path)[role]
    response = await app.test_client().get("/health", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200


def test_token_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_token({"RBEE_TOKEN_FILE": str(path)})
    path.chmod(0o600)
    assert load_token({"RBEE_TOKEN_FILE": str(path)}) == TOKEN


def test_a_fleet_hosts_home_is_made_private_though_its_secret_lives_elsewhere(tmp_path: Path) -> None:
    """Issue 23.9: with RBEE_TOKEN_FILE set (every fleet host) RBEE_HOME kept its 0755, and the
    logs and hive.json in it were world-readable."""
    home = tmp_path / "host-home"
    home.mkdir(mode=0o755)
    (home / "logs").mkdir()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    assert load_token({"RBEE_TOKEN_FILE": str(token)}, home=home) == TOKEN
    assert home.stat().st_mode & 0o777 == 0o700


def test_the_secret_is_made_private_at_first_need(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    token = load_token({"RBEE_HOME": str(home)})
    assert len(token) >= 32 and load_token({"RBEE_HOME": str(home)}) == token  # made once, then read
    assert (home / "secret").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700


async def test_health_proves_the_secret_and_its_own_address_without_revealing_it(tmp_path: Path) -> None:
    async with served(apps(tmp_path)["queen"]) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/health", headers={CHALLENGE: "nonce-1"})
    address = url.removeprefix("http://")
    assert response.status_code == 200 and response.json() == {"role": "queen"}
    assert proves(TOKEN, "nonce-1", address, response.headers.get(PROOF))
    assert not proves("another-secret-0123456789", "nonce-1", address, response.headers.get(PROOF))
    assert not proves(TOKEN, "nonce-1", "127.0.0.1:7833", response.headers.get(PROOF))  # bound to its port
    assert TOKEN not in str(response.headers)


def relay_to(target: str, seen: list[dict[str, str]]) -> Quart:
    """Another user's server on the port the keeper dials, relaying every request to the
    owner's real queen on another port (issue 23.7), and recording what it receives."""
    relay = Quart(__name__)

    @relay.route("/<path:path>", methods=["GET", "POST"])
    async def anything(path: str) -> Any:
        seen.append(dict(request.headers))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with httpx.AsyncClient(base_url=target) as http:
            answer = await http.request(request.method, f"/{path}", headers=headers, content=await request.get_data())
        keep = {k: v for k, v in answer.headers.items() if k.lower().startswith("x-rbee")}
        return Response(answer.content, answer.status_code, keep, content_type="application/json")

    return relay


async def test_a_proof_relayed_from_the_real_queen_on_another_port_is_refused(tmp_path: Path) -> None:
    seen: list[dict[str, str]] = []
    async with served(apps(tmp_path)["queen"]) as real, served(relay_to(real, seen)) as impostor:
        assert await queen_answers(real, token=TOKEN)
        with pytest.raises(UnprovenPeerError, match="relaying"):
            await queen_answers(impostor, token=TOKEN)
        async with LinkClient(impostor, "queen", token=TOKEN) as client:
            with pytest.raises(UnprovenPeerError, match="nothing was sent"):
                await client.request_json("GET", "/v1/status")
    assert seen and all(TOKEN not in str(headers) for headers in seen)


async def test_every_link_client_proves_its_callee_on_each_connection_before_the_secret(tmp_path: Path) -> None:
    """Issue 23.6: a port freed by a dropped SSH forward or a stopped queen, then taken by
    another user, must receive no secret. A link client proves the server first."""
    seen: list[dict[str, str]] = []
    impostor = Quart(__name__)

    @impostor.route("/<path:path>", methods=["GET", "POST"])
    async def anything(path: str) -> Any:
        seen.append(dict(request.headers))
        return {"role": "queen", "ok": True}

    async with served(impostor) as url:
        hive_side = LinkClient(url, "queen", token=TOKEN, callee=Callee(TOKEN, peer="localhost"))
        async with hive_side:
            with pytest.raises(UnprovenPeerError):
                await hive_side.request_json("POST", "/v1/hives/localhost/heartbeat", {"x": 1})
    assert seen and all(TOKEN not in str(headers) for headers in seen)
    assert all(set(h) >= {"X-Rbee-Challenge"} and "Authorization" not in h for h in seen)


async def test_the_queen_proves_itself_to_a_hive_with_that_hives_secret(tmp_path: Path) -> None:
    queen = Queen(QueenConfig(home=tmp_path / "q"), "http://127.0.0.1:7833", TOKEN)
    hive_secret = "hive-secret-0123456789abcdef"
    queen.hives.launched("bee", "http://127.0.0.1:9", hive_secret)
    async with served(queen_app(queen)) as url:
        beat = LinkClient(url, "queen", token=hive_secret, callee=Callee(hive_secret, peer="bee"))
        stranger = LinkClient(url, "queen", token=hive_secret, callee=Callee(hive_secret, peer="wasp"))
        async with beat, stranger:
            answer = await beat.request_json("GET", "/health")
            assert answer == {"role": "queen"}  # proven, then the request went through
            with pytest.raises(UnprovenPeerError):  # the queen gave no hive "wasp" that secret
                await stranger.request_json("GET", "/health")


@pytest.mark.parametrize("url", ["http://127.0.0.1:1@10.9.9.9", "http://127.0.0.1:1@10.9.9.9:80",
                                 "http://127.0.0.1:80/../x", "http://127.0.0.1.evil:80", "https://127.0.0.1:80"])
async def test_the_hive_takes_only_a_loopback_queen_url_parsed_not_prefixed(tmp_path: Path, url: str) -> None:
    """Issue 23.8: ``startswith("http://127.0.0.1:")`` let ``http://127.0.0.1:1@10.9.9.9`` through."""
    client = apps(tmp_path)["hive"].test_client()
    response = await client.post("/v1/admin/queen", json={"url": url}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400, await response.get_data()


async def test_the_queen_never_calls_a_remote_hive_with_the_owners_key(tmp_path: Path) -> None:
    """Issue 23.10: a hive whose secret is missing was called with the owner's key."""
    queen = Queen(QueenConfig(home=tmp_path / "q"), "http://127.0.0.1:7833", TOKEN)
    peer = queen.hives.launched("bee", "http://127.0.0.1:9")
    assert peer.secret is None
    with pytest.raises(UnprovenPeerError, match="holds no secret for hive:bee"):
        queen.client_for(peer)


async def test_the_keeper_sends_nothing_to_a_queen_that_cannot_prove_itself(tmp_path: Path) -> None:
    """An impostor on the queen's port (another user bound it first) gets no secret."""
    seen: list[dict[str, str]] = []
    impostor = Quart(__name__)

    @impostor.route("/<path:path>", methods=["GET", "POST"])
    async def anything(path: str) -> Any:
        seen.append(dict(request.headers))
        return {"role": "queen"}

    async with served(impostor) as url:
        with pytest.raises(UnprovenPeerError, match="cannot prove it holds your secret"):
            await queen_answers(url, token=TOKEN)
        with pytest.raises(UnprovenPeerError):
            await stop_persistent(url, token=TOKEN)
    assert seen and all(TOKEN not in str(headers) for headers in seen)


def test_job_ids_carry_at_least_128_random_bits() -> None:
    ids = {new_job_id() for _ in range(2000)}
    assert len(ids) == 2000
    body = next(iter(ids)).removeprefix("job-")
    assert len(body) * 6 >= 128  # base64url: 6 bits a character


@pytest.mark.parametrize(
    "evil",
    ["$(touch {marker})", "`touch {marker}`", "x; touch {marker}", "x && touch {marker}", "'; touch {marker}; '",
     "x\ntouch {marker}", "$HOME|touch {marker}"],
)
def test_remote_commands_quote_hostile_values(evil: str, tmp_path: Path) -> None:
    """What the queen sends over SSH is run by the host's shell: hostile names stay data."""
    marker = tmp_path / "pwned"
    value = evil.format(marker=marker)
    command = Command.of("printf", "%s", value, env={"RBEE_X": value})
    result = subprocess.run(["/bin/sh", "-c", command.render()], capture_output=True, text=True, check=True)
    assert result.stdout == value
    assert not marker.exists()




async def test_a_hive_proves_itself_with_its_own_secret_and_opens_nothing_else(tmp_path: Path) -> None:
    queen = Queen(QueenConfig(home=tmp_path / "q"), "http://127.0.0.1:7833", TOKEN)
    first = queen.hives.launched("h1", "http://127.0.0.1:1001", "secret-of-h1-0123456789")
    queen.hives.launched("h2", "http://127.0.0.1:1002", "secret-of-h2-0123456789")
    client = queen_app(queen).test_client()
    beat = {"name": "h1"}

    async def status(method: str, path: str, secret: str, body: object = None) -> int:
        response = await client.open(path, method=method, headers={"Authorization": f"Bearer {secret}"}, json=body)
        return response.status_code

    assert await status("POST", "/v1/hives/h1/heartbeat", "secret-of-h1-0123456789", beat) == 200
    assert first.serving
    assert await status("POST", "/v1/hives/h1/heartbeat", "secret-of-h2-0123456789", beat) == 401  # h2 posing as h1
    assert await status("GET", "/v1/hives", "secret-of-h1-0123456789") == 401  # a hive's secret is not the owner's
    assert await status("POST", "/v1/admin/shutdown", "secret-of-h1-0123456789") == 401
    assert await status("GET", "/v1/hives", TOKEN) == 200
    await queen.hives.close()


async def test_a_worker_proves_itself_with_its_own_secret(tmp_path: Path) -> None:
    from rbee.hive.placement import Memory
    from rbee.hive.supervisor import WorkerRecord, WorkerSpec
    from rbee.link.spawn import Child
    from tests.server.test_hive_leaks import DEMAND

    hive = Hive(HiveConfig(home=tmp_path / "h", models_dir=tmp_path / "m"),
                Supervisor(HiveConfig(home=tmp_path / "h"), "http://127.0.0.1:7835", TOKEN), ModelCatalog(tmp_path),
                TOKEN)
    for worker_id in ("w-1", "w-2"):
        process = SimpleNamespace(pid=1, returncode=None)  # a record only: no process is needed here
        child = Child(name=worker_id, process=process, url="http://127.0.0.1:9", log_path=tmp_path / "w.log")  # type: ignore[arg-type]
        record = hive.supervisor.peers.add(WorkerRecord(worker_id, WorkerSpec(tmp_path / "m.gguf", "llama-cpp"),
                                                        child, DEMAND.size(Memory(ram_free=64 << 30))))
        record.secret = f"secret-of-{worker_id}-0123456789"
    client = hive_app(hive).test_client()
    beat = {"worker_id": "w-1", "state": "ready", "model_path": "/m.gguf", "backend": "llama-cpp"}

    async def status(path: str, secret: str, method: str = "POST") -> int:
        response = await client.open(path, method=method, headers={"Authorization": f"Bearer {secret}"}, json=beat)
        return response.status_code

    assert await status("/v1/workers/w-1/heartbeat", "secret-of-w-1-0123456789") == 200
    assert await status("/v1/workers/w-1/heartbeat", "secret-of-w-2-0123456789") == 401
    assert await status("/v1/workers", "secret-of-w-1-0123456789", "GET") == 401
    assert await status("/v1/workers", TOKEN, "GET") == 200


async def test_ollama_liveness_at_the_root_names_nothing(tmp_path: Path) -> None:
    """Ollama clients probe `GET /` or `HEAD /` before they send a key: the answer is its fixed text."""
    client = apps(tmp_path)["queen"].test_client()
    for method in ("GET", "HEAD"):
        response = await client.open("/", method=method)
        assert response.status_code == 200, method
    assert await (await client.get("/")).get_data(as_text=True) == "Ollama is running"
    assert (await client.post("/")).status_code in (401, 405)
