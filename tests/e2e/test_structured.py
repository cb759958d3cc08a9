"""Structured output through the official `openai` client: JSON that parses and validates,
every time, even from the built-in base model at temperature 0.8 (grammar-constrained by
llama.cpp's sampler)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.helpers import owner_token

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
