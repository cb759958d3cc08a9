"""Tool plans without a server: which constraint a tool_choice puts on generation, and how
the generated text becomes OpenAI tool_calls."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from rbee.errors import RequestError
from rbee.queen.api.errors import ApiError
from rbee.queen.api.requests import ChatMessageIn
from rbee.queen.tools import plan

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "time"}}


def test_a_named_choice_constrains_to_its_arguments() -> None:
    chosen = plan([WEATHER, TIME], {"type": "function", "function": {"name": "weather"}})
    assert chosen is not None and chosen.forced and chosen.streams_arguments
    assert chosen.response_format() == {"type": "json_schema", "schema": WEATHER["function"]["parameters"]}
    (called,) = chosen.calls('{"city": "Oslo"}') or []
    assert called["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}


def test_required_among_several_names_the_function_in_the_output() -> None:
    chosen = plan([WEATHER, TIME], "required")
    assert chosen is not None and chosen.forced and not chosen.streams_arguments
    branches = (chosen.response_format() or {})["schema"]["anyOf"]
    assert [b["properties"]["name"] for b in branches] == [{"const": "weather"}, {"const": "time"}]
    (called,) = chosen.calls('{"name": "time", "arguments": {}}') or []
    assert called["function"]["name"] == "time" and json.loads(called["function"]["arguments"]) == {}
    lone = plan([WEATHER], "required")
    assert lone is not None and lone.name == "weather"  # one function: its arguments stream


def test_auto_reads_tagged_calls_and_otherwise_text() -> None:
    chosen = plan([WEATHER], "auto")
    assert chosen is not None and not chosen.forced and chosen.response_format() is None
    assert chosen.calls("It is sunny.") is None
    text = 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    (called,) = chosen.calls(text) or []
    assert json.loads(called["function"]["arguments"]) == {"city": "Rome"}
    assert chosen.calls('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>') is None
    assert plan([WEATHER], "none") is None and plan(None, None) is None


@pytest.mark.parametrize("tools, choice, message", [
    (None, "required", "no tools to choose from"),
    ([WEATHER, WEATHER], "auto", "must be unique"),
    ([{"type": "function", "function": {"name": "a b"}}], "auto", "tools[0].function.name"),
    ([{"type": "retrieval"}], "auto", "tools[0]: must be"),
    ([WEATHER], {"type": "function", "function": {"name": "x"}}, "no tool is named 'x'"),
    ([WEATHER], "sometimes", "tool_choice:"),
    ([WEATHER], {"type": "function", "function": "weather"}, "tool_choice:"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "auto", "must be an object"),
])
def test_bad_tools_are_refused_naming_the_field(tools: list[dict[str, object]] | None, choice: object,
                                                message: str) -> None:
    with pytest.raises(RequestError) as caught:
        plan(tools, choice)
    assert message in caught.value.message


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.sampled_from(["function", "auto", "name"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "function", "name", "parameters", "properties", "text", "image_url"]), inner,
        max_size=4),
    max_leaves=16,
)


@given(tools=JSON, choice=JSON)
def test_any_tools_and_choice_give_a_plan_or_a_request_error(tools: Any, choice: Any) -> None:
    try:
        plan(tools, choice)
    except RequestError:
        pass


@given(message=st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "tool_call_id"]), JSON, max_size=4))
def test_any_message_is_read_or_refused_with_a_400(message: dict[str, Any]) -> None:
    try:
        ChatMessageIn.model_validate(message).job_message(0)
    except ValidationError:
        pass  # the route answers these with a 400 too
    except ApiError as exc:
        assert exc.status == 400
