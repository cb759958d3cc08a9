"""Ollama's requests as rbee's fields, and rbee's answers as Ollama's shapes: pure translation."""

from __future__ import annotations

import pytest

from rbee.link import events
from rbee.queen.api.errors import ApiError
from rbee.queen.api.ollama import ChatIn, GenerateIn, ollama_calls, parameter_size, pull_lines, show_body, timings


def test_options_become_the_openai_fields_of_the_same_meaning() -> None:
    req = ChatIn.model_validate({"model": "m", "format": "json", "keep_alive": "5m", "options": {
        "num_predict": 12, "temperature": 0.2, "top_k": 5, "min_p": 0.1, "stop": ["\n"], "seed": 7,
        "num_thread": 4, "num_ctx": 2048}})
    fields = req.sampling()
    assert fields["max_tokens"] == 12 and fields["temperature"] == 0.2 and fields["top_k"] == 5
    assert fields["stop"] == ["\n"] and fields["seed"] == 7 and "num_thread" not in fields
    assert fields["response_format"] == {"type": "json_object"} and fields["keep_alive"] == "5m"
    assert req.placement() == {"ctx": 2048}
    unlimited = ChatIn.model_validate({"model": "m", "options": {"num_predict": -1}}).sampling()
    assert "max_tokens" not in unlimited  # -1 (Ollama's "until done") is rbee's default budget
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert GenerateIn.model_validate({"model": "m", "format": schema}).sampling()["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "format", "schema": schema}}


@pytest.mark.parametrize("body, words", [
    ({"think": True}, "does not support thinking"),
    ({"options": {"mirostat": 2}}, "mirostat"),
    ({"format": "yaml"}, "format"),
    ({"options": {"num_ctx": 12}}, "num_ctx"),
])
def test_what_rbee_cannot_honour_is_a_400_naming_it(body: dict[str, object], words: str) -> None:
    req = ChatIn.model_validate({"model": "m", **body})
    with pytest.raises(ApiError) as caught:
        req.sampling()
        req.placement()
    assert caught.value.status == 400 and words in caught.value.message


def test_tool_choice_from_options_and_keep_alive_zero() -> None:
    req = ChatIn.model_validate({"model": "m", "keep_alive": 0, "options": {"tool_choice": "required"}})
    assert req.sampling()["tool_choice"] == "required" and req.unloads()
    assert not ChatIn.model_validate({"model": "m", "keep_alive": "5m"}).unloads()


def test_tool_calls_carry_their_arguments_as_objects() -> None:
    calls = ollama_calls([{"id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}])
    assert calls == [{"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]
    turn = ChatIn.model_validate({"model": "m", "messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "f"}]}).openai_messages()
    assert turn[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}' and turn[1]["tool_call_id"] == "f"
    with pytest.raises(ApiError, match="images"):
        ChatIn.model_validate({"model": "m", "messages": [{"role": "user", "content": "x", "images": ["AA=="]}]}
                              ).openai_messages()


def test_sizes_and_durations() -> None:
    assert parameter_size(268_098_176) == "268M" and parameter_size(7_241_732_096) == "7.2B"
    assert parameter_size(70_553_706_496) == "70.6B" and parameter_size(1_000) == "1K"
    end = events.end(10, 0.5, "stop", prompt_tokens=4, prompt_ms=100.0)
    spent = timings(0.0, end)  # started at perf_counter 0: a total far above the worker's
    assert spent["eval_count"] == 10 and spent["prompt_eval_count"] == 4
    assert spent["prompt_eval_duration"] == 100_000_000 and spent["eval_duration"] == 400_000_000
    assert spent["load_duration"] == spent["total_duration"] - 500_000_000


async def test_pull_progress_lines() -> None:
    async def stream():  # type: ignore[no-untyped-def]
        yield events.narration("hive:a", "download", "downloading hf:o/r:x.gguf (4.2 MB)", bytes=0, total=42)
        yield events.narration("hive:a", "download", "x.gguf: 4.2/4.2 MB", bytes=42, total=42)
        yield events.narration("hive:a", "verify", "checking the sha256 of x.gguf")
        yield events.narration("hive:a", "report", "x is in the catalog", model={"sha256": "ab" * 32, "ref": "r"})
        yield events.end(0, 0.1, "done")

    lines = [line async for line in pull_lines(stream())]
    assert lines[0] == {"status": "pulling manifest"}
    assert [(line.get("completed"), line.get("total")) for line in lines[1:3]] == [(0, 42), (42, 42)]
    assert [line["status"] for line in lines[3:]] == ["verifying sha256 digest", "writing manifest", "success"]
    assert lines[4]["digest"] == "ab" * 32


def test_show_reads_the_header_and_template() -> None:
    shown = show_body({"model": {"ref": "hf:o/r:m.gguf", "format": "gguf", "architecture": "gemma3",
                                 "context_length": 32768, "parameters": 268_098_176, "quantization": "Q4_K_M",
                                 "modified": 1.7e9},
                       "header": {"general.architecture": "gemma3", "gemma3.context_length": 32768,
                                  "tokenizer.chat_template": "{% if tools %}…{% endif %}",
                                  "tokenizer.ggml.tokens": None}})
    assert shown["model_info"]["gemma3.context_length"] == 32768 and "tokenizer.chat_template" not in shown[
        "model_info"]
    assert shown["capabilities"] == ["completion", "tools", "embedding"]
    assert shown["details"]["parameter_size"] == "268M" and shown["details"]["quantization_level"] == "Q4_K_M"
    assert "num_ctx         32768" in shown["parameters"]
