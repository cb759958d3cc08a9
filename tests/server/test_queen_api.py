"""The queen's request handling without starting any hive: validation, OpenAI errors,
the OpenAPI document, and fuzzed bodies that must get a 4xx JSON answer, never a 500."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbee.config import QueenConfig
from rbee.queen.app import create_app
from rbee.queen.service import Queen


@pytest.fixture
def app(tmp_path: Path) -> Any:
    queen = Queen(QueenConfig(home=tmp_path), "http://127.0.0.1:7833")
    return create_app(queen)


def test_every_route_is_in_the_openapi_document(app: Any) -> None:
    routes = {
        (rule.rule.replace("<", "{").replace(">", "}"), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods
        if method not in ("HEAD", "OPTIONS") and rule.endpoint != "static"
    }
    from rbee.queen.openapi import document as build

    doc = build()
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented, (routes - documented, documented - routes)


async def test_openapi_is_served(app: Any) -> None:
    response = await app.test_client().get("/openapi.json")
    assert response.status_code == 200
    body = await response.get_json()
    assert body["openapi"].startswith("3.") and "/v1/chat/completions" in body["paths"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
          "logprobs", "node", "tools", "tool_choice", "response_format", "template", "top_k"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6) | JSON_VALUES)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/jobs"])
async def test_malformed_bodies_get_4xx_json(app: Any, path: str, body: Any) -> None:
    if isinstance(body, dict) and path != "/v1/jobs":
        body.pop("model", None)  # without a valid model every body is refused before any job starts
    if isinstance(body, dict) and path == "/v1/jobs":
        body["max_tokens"] = -1  # always invalid: nothing may start a hive here
    response = await app.test_client().post(path, data=json.dumps(body), headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, await response.get_data()
    assert "error" in await response.get_json()


async def test_garbage_is_400(app: Any) -> None:
    response = await app.test_client().post("/v1/chat/completions", data=b"\xff{", headers={})
    assert response.status_code == 400
    assert (await response.get_json())["error"]["type"] == "invalid_request_error"


def test_a_client_key_names_files_only_under_the_model_roots() -> None:
    from rbee.errors import BadModelRefError
    from rbee.queen.keys import ClientKey, check_model

    key = ClientKey("app", "0" * 64)
    check_model(key, ["file:/srv/models/qwen.gguf", "file:/srv/models/a/b", None], ["/srv/models"], "gemma3-270m")
    check_model(None, ["file:/etc/passwd"], ["/srv/models"], "gemma3-270m")  # the owner: any file
    for bad in ("file:/etc/passwd", "file:/", "file:/srv/models/../../etc/passwd", "file:/srv/modelsX/y.gguf",
                "file:relative.gguf"):
        with pytest.raises(BadModelRefError, match="model_roots"):
            check_model(key, [bad], ["/srv/models"], "gemma3-270m")
