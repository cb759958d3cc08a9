"""The official `openai` client against a real queen + hive + worker on the default model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rbee.link.client import LinkClient
from rbee.queen.keys import KeyStore
from tests.helpers import owner_headers, owner_token, queen, worker_stops
from tests.hub_server import HubServer, Repo

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def client(queen_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{queen_url}/v1", api_key=owner_token(), max_retries=0, timeout=120)


@pytest.fixture
def aclient(queen_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{queen_url}/v1", api_key=owner_token(), max_retries=0, timeout=120)


async def test_models_list(aclient: openai.AsyncOpenAI) -> None:
    ids = {model.id for model in (await aclient.models.list()).data}
    assert {"gemma3-270m", "localhost/gemma3-270m"} <= ids


async def test_a_scoped_client_key_streams_and_is_counted_but_opens_nothing_else(
        queen_url: str, rbee_env: dict[str, str]) -> None:
    """Issue 23.11: what the README gives clients is a key that only runs inference."""
    _, key = KeyStore(Path(rbee_env["RBEE_HOME"])).add("editor", ["gemma3-270m"])
    scoped = openai.AsyncOpenAI(base_url=f"{queen_url}/v1", api_key=key, max_retries=0, timeout=120)
    stream = await scoped.chat.completions.create(model="gemma3-270m", messages=CHAT, max_tokens=8, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text
    async with httpx.AsyncClient(base_url=queen_url, timeout=30) as http:
        for method, path in [("GET", "/v1/hives"), ("POST", "/v1/admin/shutdown"), ("GET", "/metrics")]:
            assert (await http.request(method, path, headers={"Authorization": f"Bearer {key}"})).status_code == 403
        metrics = (await http.get("/metrics", headers={"Authorization": f"Bearer {owner_token()}"})).text
    assert 'rbee_client_requests_total{key="editor"} 1.0' in metrics
    assert any(line.startswith('rbee_client_tokens_total{key="editor"}') and float(line.split()[-1]) >= 1
               for line in metrics.splitlines())
    KeyStore(Path(rbee_env["RBEE_HOME"])).revoke("editor")
    with pytest.raises(openai.AuthenticationError):
        await scoped.models.list()


async def test_chat_streaming_arrives_incrementally(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model="gemma3-270m", messages=CHAT, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    text: list[str] = []
    finish = usage = None
    async for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta.content
            if delta:
                arrivals.append(time.monotonic())
                text.append(delta)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(text).strip(), f"empty answer (finish_reason={finish})"
    # one chunk per token, not one burst at the end (no wall-clock bound: a GPU may take microseconds)
    assert len(arrivals) >= 5 and len(set(arrivals)) > 1, "chunks must arrive as they are generated"
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens == len(text) and usage.prompt_tokens > 0


def test_chat_non_streaming_with_usage(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="localhost/gemma3-270m", messages=CHAT, max_tokens=24,
                                              temperature=0, seed=3)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content, f"empty answer (finish_reason={choice.finish_reason})"
    assert response.usage is not None and response.usage.completion_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completions(client: openai.OpenAI) -> None:
    response = client.completions.create(model="gemma3-270m", prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
    assert response.choices[0].text.strip()
    assert response.usage is not None and response.usage.completion_tokens == 8
    assert response.choices[0].finish_reason == "length"


def test_penalties_and_llama_cpp_samplers_are_honoured(client: openai.OpenAI) -> None:
    """presence/frequency penalties reach llama.cpp's sampler: a greedy answer that repeats itself
    without them repeats less with them."""
    prompt = "The sky blue, the sky blue, the sky blue,"
    plain = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=24, temperature=0)
    penalised = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=24, temperature=0,
                                          presence_penalty=1.5, frequency_penalty=1.5,
                                          extra_body={"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.3})
    assert plain.choices[0].text != penalised.choices[0].text
    words = lambda text: text.split()  # noqa: E731
    assert len(set(words(penalised.choices[0].text))) > len(set(words(plain.choices[0].text)))


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert "no-such-model" in str(info.value)


@pytest.mark.parametrize(
    "extra, param",
    [({"n": 9}, "n"), ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
     ({"logit_bias": {"the": 5}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
     ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"temperature": 5}, "temperature"),
     ({"max_tokens": 0}, "max_tokens"), ({"presence_penalty": 3.0}, "presence_penalty"),
     ({"extra_body": {"keep_alive": "soon"}}, "keep_alive")],
)
def test_unsupported_or_invalid_parameters_are_400(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma3-270m", messages=CHAT, **extra)
    assert param in str(info.value)


async def test_disconnect_mid_stream_stops_the_worker(aclient: openai.AsyncOpenAI, queen_url: str) -> None:
    stream = await aclient.chat.completions.create(
        model="gemma3-270m", messages=[{"role": "user", "content": "Count to one thousand."}],
        max_tokens=1500, temperature=0, stream=True,
    )
    seen = 0
    async for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 5:
            break
    await stream.close()
    async with httpx.AsyncClient(headers=owner_headers(), base_url=queen_url) as http:
        worker_url = (await http.get("/v1/hives")).json()["hives"][0]["workers"][0]["url"]

    await worker_stops(worker_url, most=300)


@pytest.fixture
async def hub_queen(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[str]:
    """A queen whose hive downloads from a local hub server (no repo there but one)."""
    with HubServer() as server:
        server.repos["acme/tiny-GGUF"] = Repo(files={"README.md": b"no model here"})
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        async with queen(rbee_env) as url:
            yield url


BAD_MODELS = [
    ("hf:nobody/nothing", 404, "model_not_found"),
    ("hf:nobody/nothing:x.gguf", 404, "model_not_found"),
    ("hf:acme/tiny-GGUF", 404, "model_not_found"),  # a repo without a model
    ("hf:../../etc", 400, "bad_model_ref"),
    ("hf:acme/tiny-GGUF:...gguf", 400, "bad_model_ref"),  # its stem `..` named the whole catalog
]
CLIENT_FILE_MODELS = [  # a client key names files only under [queen] model_roots, answered at the queen
    ("file:/etc/passwd", 400, "bad_model_ref"),
    ("file:/", 400, "bad_model_ref"),
    ("file:/no/such/model.gguf", 400, "bad_model_ref"),
]
OWNER_FILE_MODELS = [  # the owner's CLI may name any file; what is not a model is still refused cleanly
    ("file:/etc/passwd", "bad_model"),
    ("file:/", "bad_model"),
    ("file:/no/such/model.gguf", "model_not_found"),
]


async def test_bad_model_values_get_4xx_naming_the_problem(hub_queen: str, rbee_env: dict[str, str]) -> None:
    client = openai.AsyncOpenAI(base_url=f"{hub_queen}/v1", api_key=owner_token(), max_retries=0, timeout=60)
    _, key = KeyStore(Path(rbee_env["RBEE_HOME"])).add("test-client")
    scoped = openai.AsyncOpenAI(base_url=f"{hub_queen}/v1", api_key=key, max_retries=0, timeout=60)
    for model, status, code in CLIENT_FILE_MODELS:
        with pytest.raises(openai.APIStatusError) as caught:
            await scoped.chat.completions.create(model=model, messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
        assert caught.value.status_code == status and isinstance(caught.value.body, dict), model
        assert caught.value.body["code"] == code and "model_roots" in caught.value.message, model
    for model, status, code in BAD_MODELS:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model=model, messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
        error = caught.value
        assert error.status_code == status and isinstance(error.body, dict) and error.body["code"] == code, (
            model, error.status_code, error.body)
        assert "root:" not in error.message, "the file's contents were echoed"
    async with LinkClient(hub_queen, "queen", token=owner_token()) as link:
        for model, code in OWNER_FILE_MODELS:
            ended = [event async for event in link.run({"prompt": "hi", "model": model, "max_tokens": 4})][-1]
            assert ended.type == "error" and ended["code"] == code, (model, ended)
            assert "root:" not in ended["message"]


async def test_an_unreachable_hub_is_a_502_naming_it(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = "http://127.0.0.1:9"  # the discard port: nothing listens
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    async with queen(rbee_env) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=owner_token(), max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.completions.create(model="hf:acme/tiny-GGUF", prompt="hi", max_tokens=4)
    assert caught.value.status_code == 502 and isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "hub_unreachable" and endpoint in caught.value.message


async def test_models_lists_aliases_and_pulled_models_and_each_name_answers(
        rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.helpers import eventually
    from tests.tiny_gguf import write_tiny_model

    with HubServer() as server:
        model = write_tiny_model(tmp_path / "tiny.gguf")
        server.repos["acme/tiny-GGUF"] = Repo(files={"tiny.gguf": model.read_bytes()})
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("RBEE_MODELS_DIR", str(tmp_path / "models"))  # the pull must not reach other tests
        inventory = '[[hive]]\nname = "localhost"\n\n[aliases]\ncoder = "hf:acme/tiny-GGUF"\n'
        async with queen(rbee_env, inventory, tmp_path) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=owner_token(), max_retries=0, timeout=120)
            before = {m.id: m.owned_by for m in (await client.models.list()).data}
            assert before["coder"] == before["localhost/coder"] == "localhost"
            answer = await client.completions.create(model="coder", prompt="hello", max_tokens=4, temperature=0)
            assert answer.model == "coder" and answer.choices[0].text

            async def pulled() -> set[str]:  # the hive's catalog reaches the queen with its next heartbeat
                return {m.id for m in (await client.models.list()).data} - set(before)

            new = await eventually(pulled, timeout=15)
            name = next(model_id for model_id in new if not model_id.startswith("localhost/"))
            assert f"localhost/{name}" in new, new
            again = await client.completions.create(model=name, prompt="hello", max_tokens=4, temperature=0)
            assert again.choices[0].text


async def test_logprobs_in_openai_shape_for_n_choices_streamed_or_not(aclient: openai.AsyncOpenAI) -> None:
    chat = await aclient.chat.completions.create(model="gemma3-270m", messages=CHAT, max_tokens=6, n=2, seed=3,
                                                 logprobs=True, top_logprobs=3)
    assert [choice.index for choice in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content  # seeds 3 and 4
    assert chat.usage is not None and chat.usage.completion_tokens >= 2 * 3
    for choice in chat.choices:
        scored = choice.logprobs.content if choice.logprobs else None
        assert scored and "".join(entry.token for entry in scored) == choice.message.content
        for entry in scored:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and bytes(entry.bytes or []).decode()
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-9  # the likeliest comes first
    legacy = await aclient.completions.create(model="gemma3-270m", prompt="The sky is", max_tokens=4,
                                              temperature=0, logprobs=2)
    scores = legacy.choices[0].logprobs
    assert scores is not None and "".join(scores.tokens or []) == legacy.choices[0].text
    assert scores.text_offset == [sum(len(t) for t in (scores.tokens or [])[:i]) for i in range(4)]
    streamed: dict[int, list[str]] = {0: [], 1: []}
    stream = await aclient.chat.completions.create(model="gemma3-270m", messages=CHAT, max_tokens=5, n=2,
                                                   logprobs=True, stream=True)
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                assert choice.logprobs is not None and choice.logprobs.content
                streamed[choice.index] += [entry.token for entry in choice.logprobs.content]
    assert all(streamed.values()), streamed


async def test_logit_bias_bans_and_forces_tokens(aclient: openai.AsyncOpenAI, models_dir: Path) -> None:
    from llama_cpp import Llama

    plain = await aclient.completions.create(model="gemma3-270m", prompt="The sky is", max_tokens=1, temperature=0)
    first = plain.choices[0].text
    vocab = Llama(model_path=str(next(models_dir.glob("gemma3-270m/*.gguf"))), vocab_only=True, verbose=False)
    (token,) = vocab.tokenize(first.encode(), add_bos=False, special=False)
    banned = await aclient.completions.create(model="gemma3-270m", prompt="The sky is", max_tokens=1,
                                              temperature=0, logit_bias={str(token): -100})
    assert banned.choices[0].text != first
    forced = await aclient.completions.create(model="gemma3-270m", prompt="The sky is", max_tokens=4,
                                              temperature=0.8, logit_bias={str(token): 100})
    assert forced.choices[0].text == first * 4


async def test_image_markers_are_never_sampled_even_when_forced(aclient: openai.AsyncOpenAI, models_dir: Path) -> None:
    """The default model writes runs of <start_of_image> into its text; rbee serves text, so the
    worker bans the markers, over a request's own bias too."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(next(models_dir.glob("gemma3-270m/*.gguf"))), vocab_only=True, verbose=False)
    (marker,) = vocab.tokenize(b"<start_of_image>", add_bos=False, special=True)
    (word,) = vocab.tokenize(b" blue", add_bos=False, special=False)
    answer = await aclient.completions.create(model="gemma3-270m", prompt="The sky is", max_tokens=4,
                                              temperature=0.8, logit_bias={str(marker): 100, str(word): 50})
    assert answer.choices[0].text == " blue" * 4  # the next favourite, where the marker was forced
