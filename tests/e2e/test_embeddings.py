"""Embeddings through the official `openai` client, LangChain's `OpenAIEmbeddings`, and
`rbee embed`, from a worker loaded for embeddings on the real default model."""

from __future__ import annotations

import base64
import json
import math
import struct

import openai
import pytest

from tests.helpers import owner_token, run_rbee

TEXTS = ["The sky is blue.", "A fleet of machines streams tokens.", "Bonjour tout le monde."]
DIMENSIONS = 640  # Gemma 3 270M's embedding length


@pytest.fixture
def aclient(queen_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{queen_url}/v1", api_key=owner_token(), max_retries=0, timeout=120)


def close(a: list[float], b: list[float], tolerance: float = 1e-4) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < tolerance


async def test_vectors_are_deterministic_normalised_and_a_batch_equals_one_by_one(
        aclient: openai.AsyncOpenAI) -> None:
    batch = await aclient.embeddings.create(model="gemma3-270m", input=TEXTS)
    assert [item.index for item in batch.data] == [0, 1, 2] and batch.model == "gemma3-270m"
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > len(TEXTS)
    for item, text in zip(batch.data, TEXTS, strict=True):
        assert len(item.embedding) == DIMENSIONS
        assert abs(math.sqrt(sum(v * v for v in item.embedding)) - 1) < 1e-4
        alone = await aclient.embeddings.create(model="gemma3-270m", input=text)
        assert close(alone.data[0].embedding, item.embedding, 1e-6), text
    again = await aclient.embeddings.create(model="gemma3-270m", input=TEXTS)
    assert all(close(a.embedding, b.embedding, 1e-6) for a, b in zip(again.data, batch.data, strict=True))
    assert not close(batch.data[0].embedding, batch.data[1].embedding, 0.05), "different texts, different vectors"


async def test_base64_carries_the_same_floats(aclient: openai.AsyncOpenAI, queen_url: str) -> None:
    import httpx

    floats = await aclient.embeddings.create(model="gemma3-270m", input=TEXTS[0])
    async with httpx.AsyncClient(base_url=queen_url, headers={"Authorization": f"Bearer {owner_token()}"},
                                 timeout=60) as http:
        raw = (await http.post("/v1/embeddings", json={"model": "gemma3-270m", "input": TEXTS[0],
                                                       "encoding_format": "base64"})).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert close(list(struct.unpack(f"<{len(packed) // 4}f", packed)), floats.data[0].embedding, 1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"input": [[1, 2, 3]]}, "not token ids"),
    ({"input": ""}, "empty strings"),
    ({"input": "hi", "dimensions": 64}, "dimensions"),
    ({"input": "hi", "model": "nope"}, "does not exist"),
])
async def test_bad_embedding_requests_are_4xx_naming_the_problem(aclient: openai.AsyncOpenAI,
                                                                 fields: dict[str, object], message: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await aclient.embeddings.create(**{"model": "gemma3-270m", **fields})  # type: ignore[arg-type]
    assert caught.value.status_code in (400, 404) and message in caught.value.message


async def test_langchain_openai_embeddings(queen_url: str) -> None:
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(model="gemma3-270m", base_url=f"{queen_url}/v1", api_key=owner_token(),  # type: ignore[arg-type]
                                check_embedding_ctx_length=False, max_retries=0)
    documents = await embedder.aembed_documents(TEXTS)
    query = await embedder.aembed_query(TEXTS[0])
    assert [len(vector) for vector in documents] == [DIMENSIONS] * 3
    assert close(query, documents[0])


async def test_rbee_embed_prints_dimension_and_norm_or_json(rbee_env: dict[str, str]) -> None:
    code, chunks, stderr = await run_rbee(["embed", *TEXTS[:2]], rbee_env)
    out = b"".join(chunk for _, chunk in chunks).decode()
    assert code == 0, stderr
    assert out.count(f"{DIMENSIONS} dimensions, norm 1.0000") == 2, out
    assert "embeddings" in stderr and "pooling" in stderr  # what the worker was loaded as
    code, chunks, stderr = await run_rbee(["embed", "--json", "-q", TEXTS[0]], rbee_env)
    assert code == 0, stderr
    document = json.loads(b"".join(chunk for _, chunk in chunks))
    assert len(document["data"][0]["embedding"]) == DIMENSIONS and document["data"][0]["text"] == TEXTS[0]
