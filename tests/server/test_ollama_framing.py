"""Ollama's NDJSON framing read by the real `ollama` client: tokens holding line breaks of every
kind a line splitter knows (httpx splits at U+2028, U+2029 and NEL too) arrive intact, one chunk
each. The queen's Ollama routes are served by Hypercorn; the tokens come from a job producer in
place of the fleet, since no model can be made to emit exactly these characters."""

from __future__ import annotations

import ollama
from quart import Quart

from rbee.link import events
from rbee.link.jobs import Job, JobRegistry, Producer
from rbee.queen.api.models import ModelIndex
from rbee.queen.api.ollama import line, mount_ollama
from tests.helpers import served

TOKENS = ["line one\nline two", "\u2028", "a\u2029b", "\x85", "\r\n", "\"quoted\" \\ end"]


def tokens_producer(body: dict[str, object]) -> Producer:
    async def produce(job: Job) -> None:
        for index, text in enumerate(TOKENS):
            job.emit(events.token(index, text))
        job.emit(events.end(len(TOKENS), 0.002, "stop", prompt_tokens=3, prompt_ms=1.0))

    return produce


def test_a_line_breaker_inside_a_token_is_escaped() -> None:
    encoded = line({"response": "".join(TOKENS)})
    assert encoded.count(b"\n") == 1 and encoded.endswith(b"\n")
    assert all(breaker not in encoded.decode() for breaker in ("\u2028", "\u2029", "\x85", "\r"))


async def test_the_ollama_client_reads_every_token_whole() -> None:
    app = Quart(__name__)
    registry = JobRegistry("queen", ping=None)
    mount_ollama(app, registry, ModelIndex(lambda: {"localhost": ["m"]}), tokens_producer, None, None)  # type: ignore[arg-type]
    try:
        async with served(app) as url:
            client = ollama.AsyncClient(host=url, timeout=30)
            chunks = [chunk async for chunk in await client.chat("m", messages=[{"role": "user", "content": "x"}],
                                                                    stream=True)]
            generated = [chunk async for chunk in await client.generate("m", "x", stream=True)]
    finally:
        await registry.close()
    assert [c.message.content for c in chunks[:-1]] == TOKENS
    assert [c.response for c in generated[:-1]] == TOKENS
    final = chunks[-1]
    assert final.done and final.eval_count == len(TOKENS) and final.prompt_eval_count == 3
    assert final.prompt_eval_duration == 1_000_000 and final.eval_duration == 1_000_000
