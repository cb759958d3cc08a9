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
from tests.helpers import eventually, run_rbee, warm_up
from tests.hub_server import HubServer, Repo, write_tiny_gguf


def test_gguf_metadata_of_the_real_default_model(models_dir: Path) -> None:
    info = read_info(next(models_dir.glob("gemma3-270m/*.gguf")))
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 32768
    assert 250e6 < info.parameters < 300e6
    assert info.layers == 18 and info.kv_heads == 1 and info.head_dim == 256


async def workers(queen_url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=queen_url) as http:
        return list((await http.get("/v1/workers")).json()["workers"])


async def test_second_infer_reuses_the_warm_worker(queen_url: str) -> None:
    async with LinkClient(queen_url, "queen") as client:
        first = await warm_up(client)
        spawned = await workers(queen_url)
        second = await warm_up(client)
    assert first[-1].type == second[-1].type == "end"
    assert len(spawned) == 1
    assert [w["worker_id"] for w in await workers(queen_url)] == [spawned[0]["worker_id"]]
    assert any(e.type == "narration" and e["action"] == "reuse" for e in second)
    assert not any(e.type == "narration" and e["action"] == "spawn" for e in second)


@pytest.fixture
def small_budget(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_MEMORY_BUDGET", str(100 * 1024 * 1024))  # 100 MB: the default model needs more


async def test_admission_refuses_a_model_too_large_for_the_budget(small_budget: None, queen_url: str) -> None:
    async with LinkClient(queen_url, "queen") as client:
        received = [e async for e in client.run({"prompt": "Hi", "max_tokens": 2})]
    error = received[-1]
    assert error.type == "error" and error["code"] == "no_capacity", error
    assert "needs" in error["message"] and "GB" in error["message"] and "free" in error["message"]
    assert await workers(queen_url) == []


@pytest.fixture
def short_idle(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_WORKER_IDLE_TIMEOUT", "1")


async def test_idle_workers_are_stopped(short_idle: None, queen_url: str) -> None:
    async with LinkClient(queen_url, "queen") as client:
        await warm_up(client)
    pid = (await workers(queen_url))[0]["pid"]

    async def stopped() -> bool:
        rows = await workers(queen_url)
        return bool(rows) and rows[0]["state"] == "stopped" and "idle" in rows[0]["reason"]

    await eventually(stopped, timeout=10)
    await eventually(lambda: not _alive(pid), timeout=10)


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
