"""Structured output through the official `openai` client: JSON that parses and validates,
every time, even from the built-in base model at temperature 0.8 (grammar-constrained by
llama.cpp's sampler)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.helpers import owner_headers, owner_token

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
        "required": ["name", "address"]},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"]},
    "enum": {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"enum": [1, 2, 3]},
        "ok": {"type": "boolean"}}, "required": ["colour", "count", "ok"]},
}


@pytest.fixture
def aclient(queen_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{queen_url}/v1", api_key=owner_token(), max_retries=0, timeout=120)


@pytest.mark.parametrize("name", SCHEMAS)
async def test_json_schema_output_parses_and_validates_20_of_20(aclient: openai.AsyncOpenAI, name: str) -> None:
    schema = SCHEMAS[name]

    async def one() -> str:
        response = await aclient.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "Describe a person as JSON."}],
            temperature=0.8, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
        )
        assert response.choices[0].finish_reason == "stop", response
        return response.choices[0].message.content or ""

    outputs = await asyncio.gather(*(one() for _ in range(20)))
    for text in outputs:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(outputs)) > 1, "temperature 0.8 should vary the answers"


async def test_json_object_is_json(aclient: openai.AsyncOpenAI) -> None:
    response = await aclient.chat.completions.create(
        model="gemma3-270m", messages=[{"role": "user", "content": 'Give a JSON object with a "city" key.'}],
        temperature=0, max_tokens=200, response_format={"type": "json_object"},
    )
    text = response.choices[0].message.content or ""
    assert text.lstrip().startswith("{"), text
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("schema, named", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "schema.properties.a.not"),
    ({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}, "schema.properties.n.maximum"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "schema.uniqueItems"),
])
async def test_a_schema_feature_rbee_cannot_enforce_is_a_400_naming_it(aclient: openai.AsyncOpenAI,
                                                                        schema: dict[str, Any], named: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "x"}], max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert "cannot enforce" in str(info.value) and named in str(info.value)


async def worker_pids(queen_url: str) -> list[int]:
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        return [w["pid"] for hive in (await http.get("/v1/hives")).json()["hives"] for w in hive["workers"]]


async def test_a_schema_that_would_nest_the_grammar_50000_deep_is_a_400_and_the_worker_lives(
        aclient: openai.AsyncOpenAI, queen_url: str) -> None:
    """Issue 23.4: this 211-byte request made the converter nest its grammar 50,000 deep, and
    llama.cpp's parser overflowed the engine thread's stack: SIGSEGV, every stream dead."""
    await aclient.completions.create(model="gemma3-270m", prompt="Hi", max_tokens=2)
    before = await worker_pids(queen_url)
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 50000}}, "required": ["a"]}
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "x"}], max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert "schema.properties.a.maxLength" in str(info.value) and "50000" in str(info.value)
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": deep}}}}]
    with pytest.raises(openai.BadRequestError, match="nested deeper than 32"):
        await aclient.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "x"}], max_tokens=8, tools=tools,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "f"}},
        )
    after = await aclient.completions.create(model="gemma3-270m", prompt="Hi", max_tokens=2)
    assert after.choices[0].text
    assert await worker_pids(queen_url) == before


@pytest.mark.parametrize("grammar, named", [
    ("root ::= " + "(" * 40000 + '"a"' + ")" * 40000, "parentheses nested 40000 deep"),
    ('root ::= "a"{0,50000}', "repetition"),
    ("root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} | "b"\n' for i in range(3000)) + 'r3000 ::= "a"\n',
     "rules"),
])
async def test_a_raw_grammar_too_deep_or_too_big_is_a_400_at_the_queen(queen_url: str, grammar: str,
                                                                         named: str) -> None:
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url, timeout=60) as http:
        response = await http.post("/v1/jobs", json={"prompt": "x", "model": "gemma3-270m", "grammar": grammar})
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions", "/v1/completions"])
async def test_a_body_nested_50000_deep_is_a_400_not_a_500(queen_url: str, path: str) -> None:
    """Issue 23.5: Python's JSON parser raised RecursionError, answered as a 500."""
    body = '{"prompt": ' + "[" * 50000 + "]" * 50000 + "}"
    async with httpx.AsyncClient(headers={**owner_headers(), "Content-Type": "application/json"},
                                 base_url=queen_url, timeout=60) as http:
        response = await http.post(path, content=body)
        assert response.status_code == 400, response.text
        assert "nests" in response.text
        shallow = '{"prompt": ' + "[" * 100 + "]" * 100 + "}"
        assert (await http.post(path, content=shallow)).status_code == 400
