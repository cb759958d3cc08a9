"""Faults on real processes: killed and hung workers, a killed hive, cancels, concurrent
jobs, loopback-only sockets and network mode. Each test ends with no orphan (rbee_env)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee.config import QueenConfig, ServeOptions
from rbee.keeper.session import start_queen
from rbee.link.client import LinkClient
from rbee.link.events import Event
from tests.conftest import processes_of
from tests.helpers import RBEE, eventually, interruptible, owner_headers, owner_token, warm_up, worker_stops

GREEDY = {"temperature": 0.0, "seed": 11}
LONG = {"prompt": "Count from one to one thousand: one, two, three,", "max_tokens": 1500, **GREEDY}


async def hives(queen_url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        return list((await http.get("/v1/hives")).json()["hives"])


async def the_worker(queen_url: str) -> dict[str, Any]:
    return (await hives(queen_url))[0]["workers"][-1]


async def worker_health(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers=owner_headers(), base_url=url, timeout=2) as http:
        return dict((await http.get("/health")).json())


@pytest.fixture
async def fast_queen(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A queen whose links call a silent peer hung after 2 s (keep-alives every 0.5 s)."""
    monkeypatch.setenv("RBEE_STALL_TIMEOUT", "2")
    monkeypatch.setenv("RBEE_PING_INTERVAL", "0.5")
    config = QueenConfig(home=Path(rbee_env["RBEE_HOME"]), heartbeat_interval=0.5, ephemeral=True,
                         serve=ServeOptions())
    child = await start_queen(config, ephemeral=True)
    try:
        yield child.url
    finally:
        await child.stop(grace=20.0)


async def signal_mid_stream(client: LinkClient, pid: int, signum: int) -> tuple[list[Event], float]:
    """Run a long job and send ``signum`` to ``pid`` at its fourth token; return the job's
    events and when the signal went."""
    received = []
    sent_at = 0.0
    async for event in client.run(LONG):
        received.append(event)
        if event.type == "token" and event["index"] == 3:
            os.kill(pid, signum)
            sent_at = time.monotonic()
    return received, sent_at


async def test_worker_killed_mid_stream(queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await warm_up(client)
        first = await the_worker(queen_url)
        received, killed_at = await signal_mid_stream(client, first["pid"], signal.SIGKILL)
        detected = time.monotonic() - killed_at
        error = received[-1]
        assert error.type == "error" and error["code"] == "worker_died", error
        assert first["worker_id"] in error["message"] and "hive:localhost" in error["message"]
        assert "signal 9" in error["message"]
        assert detected < 2.0, f"the error took {detected:.2f} s"
        print(f"\nworker death → error at the client: {detected * 1000:.0f} ms")

        async def marked_dead() -> bool:
            rows = (await hives(queen_url))[0]["workers"]
            return any(w["worker_id"] == first["worker_id"] and w["state"] == "down" and "signal 9" in w["reason"]
                       for w in rows)

        await eventually(marked_dead, timeout=2)  # the queen sees it with the hive's next heartbeat
        again = await warm_up(client)
    assert again[-1].type == "end"
    assert (await the_worker(queen_url))["worker_id"] != first["worker_id"], "a fresh worker serves the next job"


async def test_a_hung_worker_misses_its_heartbeats_and_its_job_ends(fast_queen: str) -> None:
    """SIGSTOP: the worker's keep-alives would stop too, but its missed heartbeats end the job
    first (3 × 0.5 s), with an error naming it; the hung worker is killed."""
    async with LinkClient(fast_queen, "queen", token=owner_token()) as client:
        await warm_up(client)
        worker = await the_worker(fast_queen)
        received, stopped_at = await signal_mid_stream(client, worker["pid"], signal.SIGSTOP)
        waited = time.monotonic() - stopped_at
    error = received[-1]
    assert error.type == "error" and error["code"] == "peer_down", error
    assert f"worker:{worker['worker_id']} missed 3 heartbeats" in error["message"]
    assert waited < 3 * 0.5 + 1.0, f"the job ended {waited:.2f} s after the worker hung"
    print(f"\nhung worker → error at the client: {waited * 1000:.0f} ms")
    await eventually(lambda: not psutil.pid_exists(worker["pid"]) or
                     psutil.Process(worker["pid"]).status() == psutil.STATUS_ZOMBIE, timeout=5)


async def test_a_hung_hive_misses_its_heartbeats_and_its_job_ends(fast_queen: str) -> None:
    async with LinkClient(fast_queen, "queen", token=owner_token()) as client:
        await warm_up(client)
        hive_pid = (await hives(fast_queen))[0]["pid"]
        try:
            received, stopped_at = await signal_mid_stream(client, hive_pid, signal.SIGSTOP)
            waited = time.monotonic() - stopped_at
        finally:
            os.kill(hive_pid, signal.SIGCONT)
    error = received[-1]
    assert error.type == "error" and error["code"] == "peer_down", error
    assert "hive:localhost missed 3 heartbeats" in error["message"]
    assert waited < 3 * 0.5 + 1.0, f"the job ended {waited:.2f} s after the hive hung"
    print(f"\nhung hive → error at the client: {waited * 1000:.0f} ms")
    again = await eventually(lambda: _state_of_first_hive(fast_queen, "up"), timeout=5)
    assert again["reason"] == "heartbeats resumed"


async def _state_of_first_hive(queen_url: str, state: str) -> dict[str, Any] | None:
    hive = (await hives(queen_url))[0]
    return hive if hive["state"] == state else None


async def test_killed_hive_is_marked_down_and_its_job_ends_with_an_error(queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await warm_up(client)
        hive_pid = (await hives(queen_url))[0]["pid"]
        received, killed_at = await signal_mid_stream(client, hive_pid, signal.SIGKILL)
    assert received[-1].type == "error" and "hive:localhost" in received[-1]["message"], received[-1]

    async def down() -> dict[str, Any] | None:
        hive = (await hives(queen_url))[0]
        return hive if hive["state"] == "down" else None

    hive = await eventually(down, timeout=3 * 0.5 + 1.0)
    print(f"\nhive death → marked down: {(time.monotonic() - killed_at) * 1000:.0f} ms")
    assert "missed 3 heartbeats" in hive["reason"]


@pytest.mark.parametrize("how", ["sigint", "delete"])
async def test_cancel_reaches_the_worker_within_a_second(rbee_env: dict[str, str], queen_url: str, how: str) -> None:
    env = {**rbee_env, "RBEE_QUEEN_URL": queen_url}
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await warm_up(client)
    worker = await the_worker(queen_url)
    if how == "sigint":
        process = await asyncio.create_subprocess_exec(
            *RBEE, "infer", "--max-tokens", "1500", "--temperature", "0", LONG["prompt"], env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=interruptible,
        )
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.read(16), 60)
        process.send_signal(signal.SIGINT)
        cancelled_at = time.monotonic()
    else:
        async with (LinkClient(queen_url, "queen", token=owner_token()) as client,
                    contextlib.aclosing(client.run(LONG)) as events):
            async for event in events:  # closing the stream early DELETEs the job
                if event.type == "token" and event["index"] == 3:
                    break
        cancelled_at = time.monotonic()
    latency = await worker_stops(worker["url"], most=1500) - cancelled_at
    print(f"\ncancel ({how}) → worker idle: {latency * 1000:.0f} ms")
    assert latency < 1.0
    if how == "sigint":
        assert await asyncio.wait_for(process.wait(), 30) == 130


async def test_a_dropped_stream_is_kept_for_the_resume_grace_then_cancelled(
    rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that breaks without a DELETE may be a network blip: the job goes on for the
    resume grace (here 2 s), then it is cancelled down to the worker."""
    monkeypatch.setenv("RBEE_RESUME_GRACE", "2")
    config = QueenConfig(home=Path(rbee_env["RBEE_HOME"]), heartbeat_interval=0.5, ephemeral=True,
                         serve=ServeOptions())
    child = await start_queen(config, ephemeral=True)
    try:
        async with LinkClient(child.url, "queen", token=owner_token()) as client:
            await warm_up(client)
            worker = await the_worker(child.url)
            handle = await client.create(LONG)
            async for event in client.stream(handle):
                if event.type == "token" and event["index"] == 3:
                    break  # the connection closes; no DELETE
            dropped_at = time.monotonic()
            before = (await worker_health(worker["url"]))["tokens_generated"]
            stopped = await worker_stops(worker["url"], most=1500) - dropped_at
            assert (await worker_health(worker["url"]))["tokens_generated"] > before, "it went on meanwhile"
            assert 2.0 <= stopped < 2.0 + 3.0, f"cancelled {stopped:.2f} s after the drop"
            status = await client.request_json("GET", handle.sse_url.rsplit("/stream", 1)[0])
            assert status["finished"] is True
    finally:
        await child.stop(grace=20.0)


async def test_two_jobs_at_once_on_one_worker_do_not_mix(queen_url: str) -> None:
    body = {"prompt": "The three primary colours are", "max_tokens": 24, **GREEDY}
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:

        async def text() -> str:
            events = [e async for e in client.run(body)]
            assert events[-1].type == "end", events[-1]
            return "".join(e["text"] for e in events if e.type == "token")

        alone = await text()
        both = await asyncio.gather(text(), text())
    assert both[0] == both[1] == alone
    assert len((await hives(queen_url))[0]["workers"]) == 1


async def test_every_server_listens_on_loopback_only(rbee_env: dict[str, str], queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await warm_up(client)
    listening = []
    for process in processes_of(Path(rbee_env["RBEE_HOME"])):
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append((process.pid, conn.laddr.ip, conn.laddr.port))
    roles = {p.pid for p in processes_of(Path(rbee_env["RBEE_HOME"]))}
    assert len({pid for pid, _, _ in listening}) == len(roles) == 3, listening  # queen, hive, worker
    assert all(ip == "127.0.0.1" for _, ip, _ in listening), listening


async def test_network_mode_keeps_the_token_secret(rbee_env: dict[str, str], tmp_path: Path) -> None:
    token = "tok-" + os.urandom(16).hex()
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {**rbee_env, "RBEE_TOKEN_FILE": str(token_file)}
    process = await asyncio.create_subprocess_exec(
        *RBEE, "infer", "--max-tokens", "24", "--temperature", "0", "Hello", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = await asyncio.wait_for(process.stdout.read(8), 60)
    argvs = [" ".join(p.cmdline()) for p in processes_of(Path(rbee_env["RBEE_HOME"]))]
    rest, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert (first + rest).strip()
    assert len(argvs) >= 3 and not any(token in argv for argv in argvs)
    assert token not in stderr.decode()
    for log in Path(rbee_env["RBEE_HOME"]).rglob("*.log"):
        assert token not in log.read_text(errors="replace"), log


async def test_metrics_and_structured_logs(rbee_env: dict[str, str], queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        events = [e async for e in client.run({"prompt": "Hi", "max_tokens": 5, **GREEDY})]
    job_tokens = sum(e.type == "token" for e in events)
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        text = (await http.get("/metrics")).text
        hive_url = (await hives(queen_url))[0]["url"]
    assert 'rbee_jobs_total{role="queen",state="ok"} 1.0' in text
    assert f'rbee_tokens_total{{role="queen"}} {float(job_tokens)}' in text
    assert 'rbee_time_to_first_token_seconds_count{role="queen"} 1.0' in text
    assert 'rbee_peer_up{kind="hive",name="localhost",state="up"} 1.0' in text
    async with httpx.AsyncClient(headers=owner_headers(), base_url=hive_url) as http:
        hive_text = (await http.get("/metrics")).text
    assert 'rbee_jobs_total{role="hive:localhost",state="ok"} 1.0' in hive_text
    assert 'rbee_peer_up{kind="worker"' in hive_text and "rbee_heartbeat_age_seconds" in hive_text
    log = Path(rbee_env["RBEE_HOME"]) / "logs" / "hive-localhost.log"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    ended = [line for line in lines if line["msg"].startswith("job ended")]
    assert ended and ended[0]["actor"] == "hive:localhost" and ended[0]["job"].startswith("job-")
