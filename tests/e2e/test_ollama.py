"""The official `ollama` Python client and LangChain's ChatOllama against a real queen + hive +
worker on the default model (issue 26)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import ollama
import pytest
from langchain_ollama import ChatOllama

from rbee.queen.keys import KeyStore
from tests.helpers import eventually, owner_headers, owner_token, worker_stops
from tests.hub_server import HubServer, Repo, write_tiny_gguf

MODEL = "gemma3-270m"
FAST = {"num_predict": 8, "temperature": 0}


@pytest.fixture
def client(queen_url: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=queen_url, headers={"Authorization": f"Bearer {owner_token()}"}, timeout=120)


async def test_version_list_show_and_an_unknown_model(client: ollama.AsyncClient, queen_url: str) -> None:
    async with httpx.AsyncClient(base_url=queen_url, timeout=30) as http:
        root = await http.get("/")  # no key: a liveness text that names nothing
        assert root.status_code == 200 and root.text == "Ollama is running"
        refused = await http.get("/api/tags")
        assert refused.status_code == 401 and "Bearer" in refused.json()["error"]  # Ollama's shape: a string
        version = (await http.get("/api/version", headers={"Authorization": f"Bearer {owner_token()}"})).json()
    version = version["version"]
    assert all(part.isdigit() for part in version.split("."))
    listed = {m.model: m for m in (await client.list()).models}
    assert {MODEL, f"localhost/{MODEL}"} <= set(listed)
    shown = await client.show(MODEL)
    assert "completion" in (shown.capabilities or [])
    info = shown.modelinfo or {}
    assert info["general.architecture"] == "gemma3" and info["gemma3.context_length"] > 0
    assert shown.details is not None and shown.details.quantization_level == "Q4_K_M"
    assert shown.details.family == "gemma3" and shown.details.parameter_size.endswith("M")

    async def reported() -> ollama.ListResponse.Model | None:  # show ran a hive: its next heartbeat lists it
        entry = {m.model: m for m in (await client.list()).models}[MODEL]
        return entry if (entry.size or 0) > 100_000_000 else None

    assert len((await eventually(reported, timeout=10)).digest or "") == 64
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat("no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404 and 'model "no-such-model" not found' in caught.value.error


async def test_chat_and_generate_stream_and_whole(client: ollama.AsyncClient) -> None:
    arrivals: list[float] = []
    parts: list[str] = []
    final = None
    async for chunk in await client.chat(MODEL, messages=[{"role": "user", "content": "Name three colours."}],
                                         stream=True, options={"num_predict": 16, "temperature": 0}):
        if not chunk.done:
            arrivals.append(time.monotonic())
            parts.append(chunk.message.content or "")
        else:
            final = chunk
    assert "".join(parts).strip() and len(parts) >= 5 and len(set(arrivals)) > 1
    assert final is not None and final.done_reason in ("stop", "length")
    assert final.eval_count == len(parts) and (final.prompt_eval_count or 0) > 0
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, name), int), name
    assert final.total_duration > final.eval_duration > 0 and final.prompt_eval_duration > 0
    whole = await client.chat(MODEL, messages=[{"role": "user", "content": "Name three colours."}],
                              options={"num_predict": 16, "temperature": 0})
    assert whole.message.content == "".join(parts)  # temperature 0: the same tokens, streamed or not
    raw = await client.generate(MODEL, "The capital of France is", raw=True, options=FAST)
    assert raw.response.strip() and raw.done and raw.eval_count and raw.eval_count <= 8
    templated = await client.generate(MODEL, "Say hello.", system="You are terse.", options=FAST)
    assert templated.response.strip()


async def test_json_schema_format_and_a_forced_tool_call(client: ollama.AsyncClient) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"]}
    answer = await client.chat(MODEL, messages=[{"role": "user", "content": "Name a city as JSON."}],
                               format=schema, options={"num_predict": 40, "temperature": 0})
    assert isinstance(json.loads(answer.message.content or "")["city"], str)
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"]}}}
    # Ollama has no tool_choice; rbee takes OpenAI's in options (what every Ollama client can set)
    called = await client.chat(MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                               tools=[weather], options={"num_predict": 40, "temperature": 0,
                                                         "tool_choice": "required"})
    calls = called.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments, dict) and isinstance(calls[0].function.arguments["city"], str)


async def test_a_client_that_leaves_mid_stream_stops_the_worker(queen_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to one thousand."}],
            "options": {"num_predict": 1500, "temperature": 0}}
    async with httpx.AsyncClient(base_url=queen_url, headers=owner_headers(), timeout=60) as http:
        async with http.stream("POST", "/api/chat", json=body) as response:
            lines = response.aiter_lines()
            for _ in range(5):
                assert not json.loads(await anext(lines))["done"]
        worker_url = (await http.get("/v1/hives")).json()["hives"][0]["workers"][0]["url"]
    await worker_stops(worker_url, most=300)


async def test_embed_ps_and_keep_alive_zero_unloads(client: ollama.AsyncClient) -> None:
    embedded = await client.embed(MODEL, ["red", "blue"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) > 100
    single = await client.embeddings(MODEL, "red")
    assert len(single.embedding) == len(embedded.embeddings[0])
    loaded = await client.generate(MODEL, "", keep_alive="5m")  # an empty prompt only loads
    assert loaded.done_reason == "load"
    running = (await client.ps()).models
    assert any(m.model == MODEL and (m.size or 0) > 0 and m.expires_at is not None for m in running), running
    unloaded = await client.generate(MODEL, "", keep_alive=0)
    assert unloaded.done_reason == "unload"
    await eventually(lambda: _none_of(client), timeout=30)


async def _none_of(client: ollama.AsyncClient) -> bool:
    return not any(m.model == MODEL for m in (await client.ps()).models)


async def test_pull_with_progress_then_delete(rbee_env: dict[str, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import queen

    shutil.rmtree(Path(rbee_env["RBEE_MODELS_DIR"]) / "pulled", ignore_errors=True)  # a shared catalog's leftover
    with HubServer() as server:
        server.repos["acme/pull-GGUF"] = Repo(files={"pulled.gguf": write_tiny_gguf(tmp_path / "p.gguf").read_bytes()})
        for key, value in {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1",
                           "HF_HOME": str(tmp_path / "hf")}.items():
            monkeypatch.setenv(key, value)
            rbee_env[key] = value
        async with queen(rbee_env) as url:
            client = ollama.AsyncClient(host=url, headers={"Authorization": f"Bearer {owner_token()}"}, timeout=120)
            lines = [status async for status in await client.pull("hf:acme/pull-GGUF:pulled.gguf", stream=True)]
            progress = [s for s in lines if s.total]
            assert progress and progress[-1].completed == progress[-1].total > 4_000_000
            assert lines[-1].status == "success"
            await eventually(lambda: _listed(client, "pulled"), timeout=10)  # the hive's next heartbeat
            _, key = KeyStore(Path(rbee_env["RBEE_HOME"])).add("editor")
            scoped = ollama.AsyncClient(host=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            with pytest.raises(ollama.ResponseError) as refused:  # a client key runs models, never deletes them
                await scoped.delete("pulled")
            assert refused.value.status_code == 403 and "owner's key" in refused.value.error
            assert (await client.delete("pulled")).status == "success"
            await eventually(lambda: _missing(client, "pulled"), timeout=10)
            with pytest.raises(ollama.ResponseError) as gone:
                await client.delete("pulled")
            assert gone.value.status_code == 404


async def _listed(client: ollama.AsyncClient, name: str) -> bool:
    return name in {m.model for m in (await client.list()).models}


async def _missing(client: ollama.AsyncClient, name: str) -> bool:
    return not await _listed(client, name)


async def test_langchain_chat_ollama_invokes_and_streams(queen_url: str) -> None:
    llm = ChatOllama(model=MODEL, base_url=queen_url, num_predict=12, temperature=0,
                     client_kwargs={"headers": {"Authorization": f"Bearer {owner_token()}"}})
    reply = await llm.ainvoke("Name three colours.")
    assert isinstance(reply.content, str) and reply.content.strip()
    pieces = [chunk.content async for chunk in llm.astream("Name three colours.")]
    assert len([p for p in pieces if p]) >= 3 and "".join(map(str, pieces)) == reply.content
