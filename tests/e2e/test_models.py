"""Models, devices, admission and worker reuse on real processes (issue: models & scheduling)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.hive.gguf_meta import read_info
from rbee.link.client import LinkClient
from tests.helpers import eventually, owner_headers, owner_token, queen, run_rbee, warm_up
from tests.hub_server import HubServer, Repo, write_tiny_gguf


def test_gguf_metadata_of_the_real_default_model(models_dir: Path) -> None:
    info = read_info(next(models_dir.glob("gemma3-270m/*.gguf")))
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 32768
    assert 250e6 < info.parameters < 300e6
    assert info.layers == 18 and info.kv_heads == 1 and info.head_dim == 256


async def workers(queen_url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        return list((await http.get("/v1/workers")).json()["workers"])


async def test_second_infer_reuses_the_warm_worker(queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        first = await warm_up(client)
        spawned = await workers(queen_url)
        second = await warm_up(client)
    assert first[-1].type == second[-1].type == "end"
    assert len(spawned) == 1
    assert [w["worker_id"] for w in await workers(queen_url)] == [spawned[0]["worker_id"]]
    assert any(e.type == "narration" and e["action"] == "reuse" for e in second)
    assert not any(e.type == "narration" and e["action"] == "spawn" for e in second)


async def test_worker_reports_where_the_engine_put_the_model(queen_url: str, rbee_env: dict[str, str]) -> None:
    """What llama.cpp itself logged at load, not a guess: on this CPU-only build, no layer offloaded."""
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        events = await warm_up(client)
    ready = next(e for e in events if e.type == "narration" and e["action"] == "ready")
    assert "on CPU: 0/19 layers offloaded" in ready["message"] and "context 32768" in ready["message"]
    assert ready["engine"]["gpu_offload_supported"] is False
    async def reported() -> list[dict[str, Any]]:  # the queen's view comes with the hive's next heartbeat
        return [w for w in await workers(queen_url) if w["engine"]]

    (worker,) = await eventually(reported, timeout=5)
    engine = worker["engine"]
    assert engine["device"] == "CPU" and (engine["layers_offloaded"], engine["layers_total"]) == (0, 19)
    assert engine["kv_in_ram"] == 2 * 18 * 32768 * 1 * 256 * 2  # f16 K+V, every layer, the trained context
    assert 200e6 < engine["weights_in_ram"] < 300e6
    assert worker["n_ctx"] == 32768 and worker["gpu_layers"] == 0 and worker["placement"] == "CPU"
    code, chunks, _ = await run_rbee(["workers", "list"], {**rbee_env, "RBEE_QUEEN_URL": queen_url})
    stdout = b"".join(chunk for _, chunk in chunks).decode()
    assert code == 0 and "0/19" in stdout and "32768" in stdout, stdout


async def test_workers_are_shared_only_for_the_same_context_and_offload(queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await warm_up(client, {"ctx": 4096})
        again = await warm_up(client, {"ctx": 4096})
        other = await warm_up(client, {"ctx": 8192})
    assert any(e.type == "narration" and e["action"] == "reuse" for e in again)
    assert any(e.type == "narration" and e["action"] == "spawn" and "context 8192 (asked for)" in e["message"]
               for e in other)
    assert sorted(w["n_ctx"] for w in await workers(queen_url)) == [4096, 8192]


@pytest.fixture
def small_budget(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_MEMORY_BUDGET", str(100 * 1024 * 1024))  # 100 MB: the default model needs more


async def test_admission_refuses_a_model_too_large_for_the_budget(small_budget: None, queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        received = [e async for e in client.run({"prompt": "Hi", "max_tokens": 2})]
    error = received[-1]
    assert error.type == "error" and error["code"] == "no_capacity", error
    assert "needs" in error["message"] and "GB" in error["message"] and "free" in error["message"]
    assert await workers(queen_url) == []


async def test_a_hosts_memory_in_the_inventory_caps_its_workers(rbee_env: dict[str, str], tmp_path: Path) -> None:
    """Issue 25.1: `memory = "100MB"` on the `localhost` entry is the hive's budget, in its
    heartbeat's free memory and in admission, whose refusal names the inventory key."""
    inventory = '[[hive]]\nname = "localhost"\nmemory = "100MB"\n'
    async with queen(rbee_env, inventory, tmp_path) as url:
        async with LinkClient(url, "queen", token=owner_token()) as client:
            received = [e async for e in client.run({"prompt": "Hi", "max_tokens": 2, "node": "localhost"})]
        error = received[-1]
        assert error.type == "error" and error["code"] == "no_capacity", error
        assert "(0.10 GB budget" in error["message"] and "`memory` in inventory.toml" in error["message"], error

        async def reported() -> int | None:
            async with httpx.AsyncClient(base_url=url, headers=owner_headers()) as http:
                hives = (await http.get("/v1/hives")).json()["hives"]
            return next((h["free_memory"] for h in hives if h["name"] == "localhost" and h["state"] == "up"), None)

        free = await eventually(reported)
        assert 0 < free <= 100 * 10**6, free
        assert await workers(url) == []


@pytest.fixture
def short_idle(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_WORKER_IDLE_TIMEOUT", "1")


async def test_idle_workers_are_stopped(short_idle: None, queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        events = await warm_up(client)
    assert events[-1].type == "end", events[-1]  # a load slower than the 1 s keep-alive once got it stopped
    pid = (await eventually(lambda: workers(queen_url)))[0]["pid"]  # the queen sees it with the next heartbeat

    async def stopped() -> bool:
        rows = await workers(queen_url)
        return bool(rows) and rows[0]["state"] == "stopped" and "idle" in rows[0]["reason"]

    await eventually(stopped, timeout=10)
    await eventually(lambda: not _alive(pid), timeout=10)


@pytest.fixture
def two_small_workers_do_not_fit(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # one worker of the default model with a 4096-token context (~0.33 GB) fits, a second does not
    monkeypatch.setenv("RBEE_MEMORY_BUDGET", str(500 * 1024 * 1024))


async def test_short_memory_unloads_the_least_recently_used_idle_worker(two_small_workers_do_not_fit: None,
                                                                      queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await warm_up(client, {"ctx": 4096})
        first = (await eventually(lambda: workers(queen_url)))[0]
        second = await warm_up(client, {"ctx": 2048})
    unloads = [e["message"] for e in second if e.type == "narration" and e["action"] == "unload"]
    assert len(unloads) == 1 and f"worker:{first['worker_id']}" in unloads[0] and "least recently used" in unloads[0]
    assert second[-1].type == "end", second[-1]

    async def first_stopped_second_up() -> bool:  # as the queen sees them with the hive's next heartbeat
        states = {w["worker_id"]: w["state"] for w in await workers(queen_url)}
        return states.pop(first["worker_id"], None) == "stopped" and list(states.values()) == ["up"]

    await eventually(first_stopped_second_up, timeout=10)
    await eventually(lambda: not _alive(first["pid"]), timeout=10)


async def test_keep_alive_minus_one_is_never_unloaded_for_room(two_small_workers_do_not_fit: None,
                                                              queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await warm_up(client, {"ctx": 4096, "keep_alive": -1})
        refused = await warm_up(client, {"ctx": 2048})
    assert refused[-1].type == "error" and refused[-1]["code"] == "no_capacity", refused[-1]

    async def kept() -> bool:  # the queen sees the worker's state with the hive's next heartbeat
        return [w["state"] for w in await workers(queen_url)] == ["up"]

    await eventually(kept, timeout=10)


async def test_keep_alive_zero_unloads_after_the_job(queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        ended = await warm_up(client, {"keep_alive": "0s"})
    assert ended[-1].type == "end"

    async def unloaded() -> str:
        rows = await workers(queen_url)
        return rows[0]["reason"] if rows and rows[0]["state"] == "stopped" else ""

    assert "keep_alive 0" in await eventually(unloaded, timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def hub(rbee_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[HubServer, dict[str, str]]]:
    data = write_tiny_gguf(tmp_path / "tiny.gguf", megabytes=24).read_bytes()
    with HubServer() as server:
        server.repos["acme/tiny-GGUF"] = Repo(files={"tiny-Q4_K_M.gguf": data})
        env = {**rbee_env, "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}
        yield server, env


async def rbee(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    code, chunks, err = await run_rbee(list(args), env, timeout=120)
    return code, b"".join(chunk for _, chunk in chunks).decode(), err


async def test_models_pull_list_rm_through_the_chain(hub: tuple[HubServer, dict[str, str]]) -> None:
    _, env = hub
    env = {**env, "COLUMNS": "250"}
    code, _, err = await rbee(env, "models", "pull", "hf:acme/tiny-GGUF", "--node", "localhost")
    assert code == 0, err
    assert "tiny-q4_k_m is ready" in err
    code, out, err = await rbee(env, "models", "list")
    assert code == 0, err
    assert "tiny-q4_k_m" in out and "F32" in out and "gemma3-270m" in out
    code, _, err = await rbee(env, "models", "rm", "tiny-q4_k_m", "--node", "localhost")
    assert code == 0, err
    code, out, _ = await rbee(env, "models", "list")
    assert "tiny-q4_k_m" not in out


async def test_inventory_sets_a_models_context_and_offload(rbee_env: dict[str, str], models_dir: Path,
                                                           tmp_path: Path) -> None:
    gguf = next(models_dir.glob("gemma3-270m/*.gguf"))
    inventory = f'[models.short]\ngguf = "file:{gguf}"\nctx = 4096\ngpu_layers = 0\n\n[[hive]]\nname = "localhost"\n'
    async with queen(rbee_env, inventory, tmp_path) as url:
        async with LinkClient(url, "queen", token=owner_token()) as client:
            events = await warm_up(client, {"model": "short"})
            asked = await warm_up(client, {"model": "short", "ctx": 2048})  # the job's own choice wins
        assert events[-1].type == "end" and asked[-1].type == "end"
        by_ctx = {w["n_ctx"]: w for w in await workers(url)}
        assert sorted(by_ctx) == [2048, 4096] and by_ctx[4096]["gpu_layers"] == 0
