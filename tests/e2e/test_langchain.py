"""LangChain's `ChatOpenAI` against the queen, as agent and RAG code uses it: structured output
by both of its methods (a JSON schema response_format, and a forced function call), from the
built-in base model at temperature 0.8."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from tests.helpers import owner_token


class City(BaseModel):
    """A city and where it is."""

    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    size: Literal["small", "medium", "large"]
    # every string bounded: a grammar cannot make a base model end an unbounded one before max_tokens
    districts: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
async def test_with_structured_output_returns_the_model_every_time(queen_url: str, method: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="gemma3-270m", base_url=f"{queen_url}/v1", api_key=owner_token(),  # type: ignore[arg-type]
                      temperature=0.8, max_tokens=1000, max_retries=0)  # type: ignore[call-arg]
    structured = chat.with_structured_output(City, method=method)  # type: ignore[arg-type]
    answers = await asyncio.gather(*(structured.ainvoke("Describe Paris.") for _ in range(5)))
    assert all(isinstance(answer, City) for answer in answers), answers
