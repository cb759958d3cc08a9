"""Issue 27.1: the dashboard's login (a one-time token traded for an HttpOnly, SameSite=Strict
session cookie), what that session opens and what it does not, CSRF on every action, and the
page's Content-Security-Policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from quart import Quart
from quart.testing import QuartClient

from rbee.config import QueenConfig
from rbee.queen.app import create_app as queen_app
from rbee.queen.dashboard.sessions import COOKIE, CSRF_HEADER, Sessions
from rbee.queen.service import Queen
from tests.server.test_security import TOKEN

OWNER = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = {"Origin": "http://localhost"}  # the test client's own host


@pytest.fixture
def app(tmp_path: Path) -> Quart:
    return queen_app(Queen(QueenConfig(home=tmp_path / "q"), "http://127.0.0.1:7833", TOKEN))


async def login(client: QuartClient) -> str:
    """Log ``client`` in as a browser would; returns the page's CSRF token."""
    made = await client.post("/v1/dashboard/logins", headers=OWNER)
    assert made.status_code == 201
    token = (await made.get_json())["token"]
    traded = await client.post("/dashboard/login", json={"token": token}, headers=ORIGIN)
    assert traded.status_code == 200
    cookie = traded.headers["Set-Cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/dashboard" in cookie
    again = await client.post("/dashboard/login", json={"token": token}, headers=ORIGIN)
    assert again.status_code == 401 and "used already" in (await again.get_json())["error"]["message"]
    page = await (await client.get("/dashboard/")).get_data(as_text=True)
    found = re.search(r'name="rbee-csrf" content="([^"]+)"', page)
    assert found, "a logged-in page carries its CSRF token"
    return found.group(1)


async def test_without_a_session_the_page_names_nothing_and_the_api_is_closed(app: Quart) -> None:
    client = app.test_client()
    page = await client.get("/dashboard/")
    text = await page.get_data(as_text=True)
    assert page.status_code == 200 and "rbee dashboard" in text and "Not logged in" in text
    assert "localhost" not in text and "gemma" not in text and "rbee-csrf" not in text
    for path in ("/dashboard/api/events", "/dashboard/api/jobs/job-x/stream"):
        assert (await client.get(path)).status_code == 401
    assert (await client.post("/dashboard/api/pull", json={"ref": "hf:a/b"})).status_code == 401
    assert (await client.post("/v1/dashboard/logins")).status_code == 401  # a login needs the owner's key
    forged = await client.post("/dashboard/login", json={"token": "guess"}, headers=ORIGIN)
    assert forged.status_code == 401 and "Set-Cookie" not in forged.headers


async def test_a_session_opens_the_dashboard_only(app: Quart) -> None:
    client = app.test_client()
    csrf = await login(client)
    page = await client.get("/dashboard/")
    assert "localhost" in await page.get_data(as_text=True)  # the fleet view, server-rendered
    for method, path in [("GET", "/v1/hives"), ("POST", "/v1/admin/shutdown"), ("GET", "/v1/workers"),
                         ("POST", "/v1/jobs"), ("GET", "/metrics"), ("GET", "/api/tags"),
                         ("POST", "/v1/dashboard/logins")]:
        response = await client.open(path, method=method, json={}, headers={CSRF_HEADER: csrf, **ORIGIN})
        assert response.status_code == 401, (path, response.status_code)  # the cookie is no key


async def test_actions_need_the_csrf_header_and_the_queens_origin(app: Quart) -> None:
    client = app.test_client()
    csrf = await login(client)
    body = {"model": "no-such-model", "prompt": "hi"}
    missing = await client.post("/dashboard/api/jobs", json=body)
    assert missing.status_code == 403 and CSRF_HEADER in (await missing.get_json())["error"]["message"]
    wrong = await client.post("/dashboard/api/jobs", json=body, headers={CSRF_HEADER: csrf[:-1] + "x"})
    assert wrong.status_code == 403
    elsewhere = await client.post("/dashboard/api/jobs", json=body,
                                  headers={CSRF_HEADER: csrf, "Origin": "http://127.0.0.1:8080"})
    assert elsewhere.status_code == 403
    cross = await client.post("/dashboard/api/jobs", json=body, headers={CSRF_HEADER: csrf,
                                                                          "Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    made = await client.post("/dashboard/api/jobs", json=body, headers={CSRF_HEADER: csrf, **ORIGIN})
    assert made.status_code == 201  # a job; it fails later, at routing, on the unknown model
    cancelled = await client.delete(f"/dashboard/api/jobs/{(await made.get_json())['job_id']}",
                                    headers={CSRF_HEADER: csrf})
    assert cancelled.status_code == 202
    files = await client.post("/dashboard/api/jobs", json={"model": "file:/etc/passwd", "prompt": "hi"},
                              headers={CSRF_HEADER: csrf})
    assert files.status_code == 400 and "model_roots" in (await files.get_json())["error"]["message"]
    logout = await client.post("/dashboard/api/logout", json={}, headers={CSRF_HEADER: csrf})
    assert logout.status_code == 200
    assert (await client.get("/dashboard/api/events")).status_code == 401


async def test_every_dashboard_answer_has_a_strict_content_security_policy(app: Quart) -> None:
    client = app.test_client()
    for path in ("/dashboard/", "/dashboard/static/dashboard.js", "/dashboard/static/dashboard.css"):
        response = await client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe" not in policy
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = await (await client.get("/dashboard/")).get_data(as_text=True)
    assert "<script>" not in page and " style=" not in page and "http" not in page.replace("http-equiv", "")
    assert (await client.get("/dashboard/static/../app.py")).status_code == 404
    assert (await client.get("/dashboard/static/secret")).status_code == 404


def test_login_tokens_work_once_and_expire() -> None:
    now = [0.0]
    sessions = Sessions(clock=lambda: now[0], login_ttl=300, session_ttl=3600)
    token = sessions.login_token()
    cookie = sessions.redeem(token)
    assert cookie is not None and sessions.find(cookie) is not None
    assert sessions.redeem(token) is None  # once
    late = sessions.login_token()
    now[0] = 301.0
    assert sessions.redeem(late) is None  # five minutes
    now[0] = 3601.0
    assert sessions.find(cookie) is None  # the session ends too
    assert sessions.redeem(None) is None and sessions.redeem("") is None and sessions.find("") is None
    for _ in range(100):  # a loop of `rbee dashboard` keeps only the newest logins
        sessions.login_token()
    assert len(sessions._logins) <= 16
