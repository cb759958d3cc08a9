"""Many streams at once on one worker (continuous batching on the real model): answers as
good as alone, slots freed on cancel, disconnect and error, a bounded queue that says
where a request waits and answers 429 with Retry-After past its limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from rbee.link.client import LinkClient
from rbee.link.events import Event
from tests.helpers import eventually, owner_headers, owner_token, queen

#: Counting and code leave the model few near-ties, so some streams match their solo text exactly
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The sky is blue because",
           "1, 2, 3, 4, 5, 6,", "for i in range(10):"]
#: The largest gap between the best two logits of a solo run at which a concurrent greedy
#: stream may pick the other one: llama.cpp's batched kernels move logits by up to ~0.25
#: (measured on this model), so a stream may part from its solo text only at such a near-tie.
NEAR_TIE = 0.5


@pytest.fixture
async def batching_queen(rbee_env: dict[str, str], models_dir: Path, tmp_path: Path) -> AsyncIterator[str]:
    """`small` is the default model with 2 slots and a queue of 1."""
    gguf = next(models_dir.glob("gemma3-270m/*.gguf"))
    inventory = (f'[models.small]\ngguf = "file:{gguf}"\nctx = 4096\nparallel = 2\nqueue = 1\n\n'
                 '[[hive]]\nname = "localhost"\n')
    async with queen(rbee_env, inventory, tmp_path) as url:
        yield url


async def tokens_of(client: LinkClient, body: dict[str, Any]) -> list[str]:
    return [e["text"] async for e in client.run(body) if e.type == "token"]


def margin(model: Path, text: str) -> float:
    """The gap between the best two next-token logits after ``text``, by llama-cpp-python alone
    (with the CPU variant rbee's workers load: a portable build registers none by itself)."""
    from rbee.engine.backends import load

    load()
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=512, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.eval(tokens)
        best = np.sort(np.asarray(llm.scores[len(tokens) - 1]))[-2:]
        return float(best[1] - best[0])
    finally:
        llm.close()


async def test_concurrent_streams_answer_as_they_do_alone(queen_url: str, models_dir: Path) -> None:
    body = {"max_tokens": 24, "temperature": 0.0}
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        alone = [await tokens_of(client, {**body, "prompt": p}) for p in PROMPTS]
        together = await asyncio.gather(*(tokens_of(client, {**body, "prompt": p}) for p in PROMPTS))
        async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
            (worker,) = (await http.get("/v1/workers")).json()["workers"]
    assert worker["load"]["slots"] == 8  # the default: up to 8, with 1024 tokens of context each
    model = next(models_dir.glob("gemma3-270m/*.gguf"))
    identical = 0
    for prompt, solo, concurrent in zip(PROMPTS, alone, together, strict=True):
        assert len(solo) == len(concurrent) == 24
        part = next((i for i, (a, b) in enumerate(zip(solo, concurrent, strict=True)) if a != b), None)
        if part is None:
            identical += 1
            continue
        gap = await asyncio.to_thread(margin, model, prompt + "".join(solo[:part]))
        assert gap < NEAR_TIE, f"{prompt!r} parted at token {part} ({solo[part]!r} vs {concurrent[part]!r}), gap {gap}"
    assert identical >= 2, (alone, together)


async def worker_load(queen_url: str) -> dict[str, Any]:
    """The worker's load now, from the worker itself (the queen's view waits for a heartbeat)."""
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        workers = (await http.get("/v1/workers")).json()["workers"]
        if not workers:
            return {}
        load: dict[str, Any] = (await http.get(f"{workers[0]['url']}/health")).json()["load"]
    return load


async def test_the_queue_is_bounded_says_where_a_request_waits_and_frees_slots(batching_queen: str) -> None:
    # a grammar that admits one 300-word answer: no early end of text frees a slot behind the test's back
    words = " ".join(["word"] * 300)
    long = {"model": "small", "prompt": "Say word:", "max_tokens": 400, "grammar": f'root ::= "{words}"'}
    async with LinkClient(batching_queen, "queen", token=owner_token()) as client:
        warm = [e async for e in client.run({**long, "max_tokens": 2})]
        assert warm[-1].type == "end"
        running = [await client.create(long) for _ in range(2)]  # both slots
        streams = [client.stream(handle) for handle in running]
        for stream in streams:  # each has produced a token: both slots are busy
            while (await anext(stream)).type != "token":
                pass
        queued = await client.create(long)
        waiting: list[Event] = []
        queued_stream = client.stream(queued)  # kept open: a dropped stream would cancel the job
        while not (waiting and waiting[-1].type == "narration" and waiting[-1]["action"] == "queue"):
            waiting.append(await anext(queued_stream))
        assert "waiting, position 1" in waiting[-1]["message"], waiting
        refused = [e async for e in client.run(long)]  # past the queue limit of 1
        assert refused[-1].type == "error" and refused[-1]["code"] == "queue_full", refused[-1]
        assert refused[-1]["retry_after"] >= 1 and "queue limit 1" in refused[-1]["message"]
        # the OpenAI API: 429 with Retry-After, in OpenAI's error shape
        api = openai.AsyncOpenAI(base_url=f"{batching_queen}/v1", api_key=owner_token(), max_retries=0)
        with pytest.raises(openai.RateLimitError) as limited:
            await api.completions.create(model="small", prompt="Hi", max_tokens=4)
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        assert limited.value.body["code"] == "queue_full"  # type: ignore[index]
        # a queued request is cancelled cleanly, a running one frees its slot on cancel
        await client.cancel(queued)
        ended = [event async for event in queued_stream]
        assert ended[-1].type == "error" and ended[-1]["code"] == "cancelled", ended[-1]
        for handle in running:  # running ones free their slots on cancel
            await client.cancel(handle)
        for stream in streams:
            await stream.aclose()
        await eventually(lambda: _idle(batching_queen), timeout=15)
        after = [e async for e in client.run({**long, "max_tokens": 3})]
    assert after[-1].type == "end", after[-1]


async def _slots_busy(queen_url: str) -> int:
    return int((await worker_load(queen_url)).get("slots_busy", -1))


async def _idle(queen_url: str) -> bool:
    return await _slots_busy(queen_url) == 0


async def test_a_request_that_fails_in_the_engine_frees_its_slot(queen_url: str) -> None:
    async with LinkClient(queen_url, "queen", token=owner_token()) as client:
        bad = [e async for e in client.run({"prompt": "Hi", "max_tokens": 4, "grammar": "root ::= ("})]
        good = [e async for e in client.run({"prompt": "Hi", "max_tokens": 4, "grammar": 'root ::= "yes" | "no"'})]
    assert bad[-1].type == "error" and "grammar" in bad[-1]["message"], bad[-1]
    assert good[-1].type == "end" and "".join(e["text"] for e in good if e.type == "token") in ("yes", "no")
    await eventually(lambda: _idle(queen_url), timeout=5)  # the load comes with the next heartbeat
