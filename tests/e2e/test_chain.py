"""The whole chain on one machine: keeper → queen → hive → worker, real model, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.link.client import LinkClient
from tests.helpers import RBEE, eventually, interruptible, owner_headers, owner_token, run_rbee, warm_up, worker_stops

GREEDY = {"temperature": 0.0, "seed": 7}


async def test_infer_streams_real_tokens_and_leaves_nothing(rbee_env: dict[str, str]) -> None:
    code, chunks, stderr = await run_rbee(
        ["infer", "--max-tokens", "48", "--temperature", "0", "--seed", "1", "The capital of France is"], rbee_env
    )
    assert code == 0, stderr
    text = b"".join(chunk for _, chunk in chunks).decode()
    assert text.strip(), "the model produced no text"
    # Real streaming: stdout arrives in many pieces spread over the generation,
    # the first well before the last (a replay would arrive at once at the end).
    assert len(chunks) >= 10, chunks
    first, last = chunks[0][0], chunks[-1][0]
    assert last - first > 0.1, f"all output arrived within {last - first:.3f} s"
    for actor in ("queen", "hive:localhost", "worker:"):
        assert actor in stderr
    assert "done: 48 tokens" in stderr and "tokens/s" in stderr


async def test_dual_call_shape_at_every_tier(queen_url: str) -> None:
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url, timeout=60) as http:
        hive = worker = None
        for _ in range(2):  # the first job brings the hive and the worker up
            await assert_link_shape(http, queen_url)
        hives = (await http.get("/v1/hives")).json()["hives"]
        hive = hives[0]["url"]
        worker = hives[0]["workers"][0]["url"]
    for url in (hive, worker):
        async with httpx.AsyncClient(headers=owner_headers(), base_url=url, timeout=60) as http:
            await assert_link_shape(http, url)


async def assert_link_shape(http: httpx.AsyncClient, url: str) -> None:
    created = await http.post("/v1/jobs", json={"prompt": "Hello", "max_tokens": 4, **GREEDY})
    assert created.status_code == 201, (url, created.text)
    body = created.json()
    assert set(body) == {"job_id", "sse_url"} and body["job_id"].startswith("job-")
    stream = await http.get(body["sse_url"])
    assert stream.text.rstrip().endswith("data: [DONE]"), (url, stream.text[-300:])
    assert '"type":"token"' in stream.text.replace(" ", "")
    missing = await http.get("/v1/jobs/job-unknown/stream")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


async def worker_of(queen_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        hives = (await http.get("/v1/hives")).json()["hives"]
    return hives[0]["workers"][0]


@pytest.mark.parametrize("how", ["delete", "close"])
async def test_cancel_stops_generation_at_the_worker(queen_url: str, how: str) -> None:
    """An explicit DELETE, or a client that closes its stream on purpose (run() DELETEs then)."""
    body = {"prompt": "Count: one, two, three,", "max_tokens": 1500, **GREEDY}
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        if how == "delete":
            handle = await client.create(body)
            seen = 0
            async for event in client.stream(handle):
                seen += event.type == "token"
                if seen == 5:
                    await client.cancel(handle)
        else:
            async with contextlib.aclosing(client.run(body)) as events:
                seen = 0
                async for event in events:
                    seen += event.type == "token"
                    if seen == 5:
                        break
    worker = await worker_of(queen_url)
    await worker_stops(worker["url"], most=200)


async def test_missing_model_file_fails_fast(rbee_env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    started = time.monotonic()
    code, _, stderr = await run_rbee(["infer", "-m", f"file:{missing}", "hello"], rbee_env, timeout=30)
    assert code != 0
    assert str(missing) in stderr and "not found" in stderr
    assert time.monotonic() - started < 20


async def test_corrupt_model_file_fails_fast_naming_the_file(rbee_env: dict[str, str], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    started = time.monotonic()
    code, _, stderr = await run_rbee(["infer", "-m", f"file:{corrupt}", "hello"], rbee_env, timeout=30)
    assert code != 0
    assert str(corrupt) in stderr and ("could not load" in stderr or "corrupt" in stderr)
    assert time.monotonic() - started < 20


async def test_killed_worker_is_marked_dead_by_its_hive(queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        await warm_up(client)
    worker = await worker_of(queen_url)
    os.kill(worker["pid"], signal.SIGKILL)
    # 3 heartbeat intervals of 0.5 s; the hive's view reaches the queen with the next hive beat.
    async def marked() -> bool:
        return (await worker_of(queen_url))["state"] == "down"

    await eventually(marked, timeout=1.5 + 0.5 + 0.5)
    state = await worker_of(queen_url)
    assert "signal 9" in state["reason"] or "heartbeat" in state["reason"]


async def test_ctrl_c_cancels_and_exits_cleanly(rbee_env: dict[str, str]) -> None:
    process = await asyncio.create_subprocess_exec(
        *RBEE, "infer", "--max-tokens", "1500", "--temperature", "0", "Count: one, two,",
        env=rbee_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=interruptible,
    )
    assert process.stdout is not None and process.stderr is not None
    assert await asyncio.wait_for(process.stdout.read(8), 60), "no token before the interrupt"
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 130, stderr.decode()
    assert "interrupted" in stderr.decode()


async def test_truncated_model_fails_fast_with_the_workers_own_error(
    rbee_env: dict[str, str], tmp_path: Path, models_dir: Path
) -> None:
    """A file whose header reads fine but whose tensors are cut off: only llama.cpp can tell."""
    source = next(models_dir.glob("gemma3-270m/*.gguf"))
    truncated = tmp_path / "truncated.gguf"
    with source.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(source.stat().st_size // 3))
    started = time.monotonic()
    code, _, stderr = await run_rbee(["infer", "-m", f"file:{truncated}", "hello"], rbee_env, timeout=60)
    assert code != 0
    assert str(truncated) in stderr and "could not load" in stderr, stderr
    assert time.monotonic() - started < 30


async def test_prompt_longer_than_the_context_is_a_clear_400(queen_url: str) -> None:
    too_long = "word " * 3000
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        events = [e async for e in client.run({"prompt": too_long, "max_tokens": 8, "ctx": 2048})]
    error = events[-1]
    assert error.type == "error" and error["code"] == "bad_request", error
    assert "tokens" in error["message"] and "2048" in error["message"]
    far_too_long = "word " * 35_000  # past the default model's trained context, 32768
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url, timeout=60) as http:
        response = await http.post("/v1/completions", json={"model": "gemma3-270m", "prompt": far_too_long})
    assert response.status_code == 400 and "32768" in response.json()["error"]["message"]


async def test_default_model_answers_a_3000_token_prompt(queen_url: str) -> None:
    """The worker's context is the model's trained length (32768), not a fixed 2048."""
    prompt = "The sky is blue. " * 600 + "The colour of the sky is"
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        events = [e async for e in client.run({"prompt": prompt, "max_tokens": 4, "temperature": 0})]
    end = events[-1]
    assert end.type == "end", end
    assert end["prompt_tokens"] >= 3000 and end["tokens"] >= 1
    spawned = [e for e in events if e.type == "narration" and e["action"] == "spawn"]
    assert not spawned or "context 32768 (the model's trained length)" in spawned[0]["message"]
