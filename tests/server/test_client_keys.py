"""Issue 23.11-12: scoped client keys, and one model policy for every route, decided at the
queen by the key before any hive opens a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from quart import Quart

from rbee.config import QueenConfig
from rbee.queen.app import create_app as queen_app
from rbee.queen.keys import KeyStore
from rbee.queen.service import Queen
from tests.server.test_security import TOKEN


@pytest.fixture
def queen(tmp_path: Path) -> tuple[Quart, KeyStore]:
    home = tmp_path / "q"
    return queen_app(Queen(QueenConfig(home=home), "http://127.0.0.1:7833", TOKEN)), KeyStore(home)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_client_key_runs_inference_only(queen: tuple[Quart, KeyStore]) -> None:
    app, store = queen
    _, key = store.add("webui")
    client = app.test_client()
    assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
    for method, path in [("GET", "/v1/hives"), ("GET", "/v1/status"), ("POST", "/v1/admin/shutdown"),
                         ("POST", "/v1/fleet/jobs"), ("GET", "/metrics"), ("GET", "/v1/catalog"),
                         ("POST", "/v1/catalog/jobs"), ("GET", "/v1/logs")]:
        response = await client.open(path, method=method, headers=bearer(key), json={})
        assert response.status_code in (403, 404, 405), (path, response.status_code)
        if response.status_code == 403:
            assert "runs inference only" in (await response.get_json())["error"]["message"]
    assert (await client.post("/v1/admin/shutdown", headers=bearer(key))).status_code == 403
    assert (await client.get("/v1/hives", headers=bearer(TOKEN))).status_code == 200  # the owner's key: all


async def test_a_revoked_key_is_refused_at_its_next_request(queen: tuple[Quart, KeyStore], tmp_path: Path) -> None:
    app, store = queen
    _, key = store.add("plugin")
    client = app.test_client()
    assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
    KeyStore(tmp_path / "q").revoke("plugin")  # another process (the CLI) edits the file
    assert (await client.get("/v1/models", headers=bearer(key))).status_code == 401
    assert (await client.get("/v1/models", headers=bearer(key[:-1] + "x"))).status_code == 401


def test_keys_are_stored_hashed_and_private(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    entry, key = store.add("app", ["gemma3-270m"])
    text = store.path.read_text()
    assert key not in text and entry.digest in text and store.path.stat().st_mode & 0o777 == 0o600
    assert store.find(key) == entry and store.find("rbee-ck-nope") is None
    with pytest.raises(Exception, match="exists"):
        store.add("app")


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_a_client_key_names_files_only_under_model_roots_with_one_answer(queen: tuple[Quart, KeyStore],
                                                                               path: str) -> None:
    """Issue 23.12: `/v1/jobs` with file:/etc/passwd reached the hive, and a missing file
    answered differently (a file-existence oracle). Now every route answers the same, at
    the queen, whatever the file."""
    app, store = queen
    _, key = store.add("app")
    client = app.test_client()
    answers = []
    for ref in ("file:/etc/passwd", "file:/etc/nonexistent-0xyz", "file:/"):
        body: dict[str, Any] = {"model": ref, "prompt": "x", "messages": [{"role": "user", "content": "x"}],
                                "input": "x"}
        if path == "/v1/jobs":
            body = {"model": ref, "prompt": "x"}
        response = await client.post(path, json=body, headers=bearer(key))
        error = (await response.get_json())["error"]
        answers.append((response.status_code, error["message"].replace(ref, "REF")))
    assert answers[0][0] == 400 and len(set(answers)) == 1, answers
    assert "model_roots" in answers[0][1]


async def test_a_key_for_some_models_is_refused_the_others(queen: tuple[Quart, KeyStore]) -> None:
    app, store = queen
    _, key = store.add("narrow", ["qwen"])
    client = app.test_client()
    response = await client.post("/v1/jobs", json={"model": "gemma3-270m", "prompt": "x"}, headers=bearer(key))
    assert response.status_code == 403 and "may use only qwen" in (await response.get_json())["error"]["message"]
    response = await client.post("/v1/chat/completions", headers=bearer(key),
                                 json={"model": "hf:evil/model", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code in (403, 404)
    listing = await (await client.get("/v1/models", headers=bearer(key))).get_json()
    assert all(m["id"].rsplit("/", 1)[-1] == "qwen" for m in listing["data"])
