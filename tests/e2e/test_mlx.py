"""The MLX backend for real (mlx[cpu] on Linux) on a tiny random-weight model, through
hive → queen → client, and one logical model served by either engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.link.client import LinkClient
from tests.helpers import owner_headers, owner_token, queen, worker_stops
from tests.hub_server import HubServer, Repo

mlx_lm = pytest.importorskip("mlx_lm")


@pytest.fixture(scope="session")
def tiny_mlx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.mlx_model import write_tiny_mlx_model

    return write_tiny_mlx_model(tmp_path_factory.mktemp("mlx") / "tiny-llama")


@pytest.fixture
async def mixed_queen(rbee_env: dict[str, str], tiny_mlx: Path, models_dir: Path, tmp_path: Path) -> AsyncIterator[str]:
    """A queen whose inventory names one logical model in both forms."""
    gguf = next(models_dir.glob("gemma3-270m/*.gguf"))
    inventory = f'[models.both]\ngguf = "file:{gguf}"\nmlx = "file:{tiny_mlx}"\n\n[[hive]]\nname = "localhost"\n'
    async with queen(rbee_env, inventory, tmp_path) as url:
        yield url


async def test_mlx_worker_streams_token_by_token(queen_url: str, tiny_mlx: Path) -> None:
    body = {"prompt": "hello world", "model": f"file:{tiny_mlx}", "max_tokens": 40, "temperature": 0.8, "seed": 1}
    arrivals = []
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        events = []
        async for event in client.run(body):  # run() requires the closing [DONE]
            events.append(event)
            if event.type == "token":
                arrivals.append(time.monotonic())
    assert events[-1].type == "end", events[-1]
    assert any(e.type == "narration" and e["action"] == "engine" and "mlx" in e["message"] for e in events)
    # the random-weight model may sample its EOS early (seen: after 9 tokens); what matters is that
    # several tokens arrive one by one
    assert len(arrivals) >= 5 and arrivals[-1] > arrivals[0]
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        worker = (await http.get("/v1/workers")).json()["workers"][0]
    assert worker["backend"] == "mlx" and "mlx" in worker["engine_reason"]


async def test_mlx_generation_is_cancelled(queen_url: str, tiny_mlx: Path) -> None:
    body = {"prompt": "count", "model": f"file:{tiny_mlx}", "max_tokens": 400, "temperature": 0.8, "seed": 2}
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        handle = await client.create(body)
        async for event in client.stream(handle):
            if event.type == "token" and event["index"] == 3:
                await client.cancel(handle)
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        worker_url = (await http.get("/v1/workers")).json()["workers"][0]["url"]

    await worker_stops(worker_url, most=100)


@pytest.mark.parametrize("backend, engine", [("mlx", "mlx"), ("llama-cpp", "llama-cpp"), (None, "llama-cpp")])
async def test_one_logical_model_on_either_engine(mixed_queen: str, backend: str | None, engine: str) -> None:
    body: dict[str, Any] = {"prompt": "hello", "model": "both", "max_tokens": 8, "temperature": 0.0}
    if backend:
        body["backend"] = backend
    async with LinkClient(mixed_queen, "queen", token=owner_token()) as client:
        events = [e async for e in client.run(body)]
    assert events[-1].type == "end" and events[-1]["tokens"] > 0, events[-1]
    chosen = next(e for e in events if e.type == "narration" and e["action"] == "engine")
    assert chosen["message"].startswith(engine)


async def test_mlx_dir_with_missing_files_is_refused(queen_url: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken-mlx"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        events = [e async for e in client.run({"prompt": "x", "model": f"file:{broken}"})]
    assert events[-1].type == "error"
    assert "safetensors" in events[-1]["message"] and str(broken) in events[-1]["message"]


@pytest.fixture
async def hub_mlx_queen(rbee_env: dict[str, str], tiny_mlx: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, Repo]]:
    """A queen whose inventory names an MLX repo on a local hub; its own empty catalog."""
    repo = Repo(files={**{p.name: p.read_bytes() for p in tiny_mlx.iterdir()}, "README.md": b"# tiny"})
    with HubServer() as server:
        server.repos["acme/tiny-mlx"] = repo
        for key, value in {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"),
                           "RBEE_MODELS_DIR": str(tmp_path / "catalog")}.items():
            monkeypatch.setenv(key, value)
        inventory = '[models.tiny]\nmlx = "hf:acme/tiny-mlx"\n\n[[hive]]\nname = "localhost"\nbackend = "mlx"\n'
        async with queen(rbee_env, inventory, tmp_path) as url:
            yield url, repo


async def test_mlx_repo_from_the_hub_through_a_logical_model(hub_mlx_queen: tuple[str, Repo], tmp_path: Path) -> None:
    url, repo = hub_mlx_queen
    body = {"prompt": "hello world", "model": "tiny", "max_tokens": 12, "temperature": 0.0}
    async with LinkClient(url, "queen", token=owner_token()) as client:
        events = [e async for e in client.run(body)]
    assert events[-1].type == "end" and events[-1]["tokens"] > 0, events[-1]
    narrated = [e["message"] for e in events if e.type == "narration"]
    assert any("downloading hf:acme/tiny-mlx (MLX, 4 files" in m for m in narrated), narrated
    assert any(m.startswith("mlx") for m in narrated)
    assert "README.md" not in {name for _, name, _ in repo.requests}
    assert (tmp_path / "catalog" / "tiny-mlx" / "mlx" / "model.safetensors").is_file()
    async with LinkClient(url, "queen", token=owner_token()) as client:  # the second job finds it in the catalog
        again = [e async for e in client.run(body)]
    assert not any(e.type == "narration" and e["action"] == "download" for e in again)
    assert [e["text"] for e in again if e.type == "token"] == [e["text"] for e in events if e.type == "token"]


async def test_mlx_worker_serves_streams_at_once(queen_url: str, tiny_mlx: Path) -> None:
    """mlx-lm's batch generator: four streams decode together, so their tokens interleave. Long
    enough that the last job's arrival (tens of ms behind the first, through queen and hive)
    still finds the first one running: alone, the tiny model makes 40 tokens in a few ms. Greedy,
    so no stream meets an end-of-text token early (at 0.8 one sometimes did)."""
    body = {"prompt": "hello world", "model": f"file:{tiny_mlx}", "max_tokens": 400, "temperature": 0}

    async def arrivals(client: LinkClient) -> list[float]:
        return [time.monotonic() async for e in client.run(body) if e.type == "token"]

    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await arrivals(client)  # load the worker
        streams = await asyncio.gather(*(arrivals(client) for _ in range(4)))
    assert all(len(times) > 100 for times in streams), [len(t) for t in streams]
    starts, ends = [t[0] for t in streams], [t[-1] for t in streams]
    assert max(starts) < min(ends), "the streams ran one after another, not together"
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        (worker,) = (await http.get("/v1/workers")).json()["workers"]
        health = (await http.get(f"{worker['url']}/health")).json()  # live, not a heartbeat old
    assert health["backend"] == "mlx" and health["load"]["slots"] == 8
