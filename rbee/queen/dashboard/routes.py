"""The dashboard's HTTP face on the queen: the page, its login, its one event stream, and the
actions it takes (chat, cancel, unload, pull).

Without a session the page is a login notice that names nothing, and every ``/dashboard/api/``
route answers 401. The session cookie opens those routes only: the fleet, admin and log
routes still need the owner's key. Actions must carry the session's CSRF token in a header
and come from the queen's own origin. Every response under ``/dashboard`` has a strict
Content-Security-Policy: scripts, styles and images from the queen only, no inline code.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from functools import cache
from importlib import resources
from typing import Any

import jinja2
from quart import Quart, Response, g, jsonify, request

from rbee.config import DEFAULT_MODEL
from rbee.errors import RequestError
from rbee.link.auth import SessionCheck
from rbee.link.jobs import Producer
from rbee.link.schemas import HiveView
from rbee.link.server import add_job_routes, error_body, read_json_body, sse_response
from rbee.queen.dashboard import views
from rbee.queen.dashboard.sessions import COOKIE, CSRF_HEADER, Sessions
from rbee.queen.keys import ClientKey
from rbee.queen.service import Queen

PREFIX = "/dashboard"
API = f"{PREFIX}/api"
#: the scope of a browser session's jobs: any model the fleet serves, `file:` only under model_roots
SESSION_KEY = ClientKey("dashboard", digest="")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
#: the live views, each a fragment the event stream replaces when it changes
LIVE = ("fleet", "workers", "jobs", "models", "model_options")
TICK_S = 1.0  # ages and rates move on their own: re-render at least this often
SPACING_S = 0.2  # and at most this often, however many heartbeats arrive
LOG_BACKLOG = 200


@cache
def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("rbee.queen.dashboard", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = views.size
    env.filters["age"] = views.age
    env.filters["clock"] = lambda at: time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"
    return env


def render(name: str, **context: Any) -> str:
    return templates().get_template(name).render(**context)


def same_origin() -> bool:
    """A browser names where a request comes from; one from another site is refused."""
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site")
    return (origin is None or origin == f"{request.scheme}://{request.host}") and site in (None, "same-origin", "none")


def session_gate(sessions: Sessions) -> SessionCheck:
    """What a request without a key may do: open the page and its files and log in; with a
    live session cookie, call the dashboard's API (actions with the CSRF token only)."""

    def check() -> tuple[Response, int] | bool | None:
        path = request.path
        if path in (PREFIX, f"{PREFIX}/", f"{PREFIX}/login") or path.startswith(f"{PREFIX}/static/"):
            return True  # the page names nothing without a session; login checks its token itself
        if not path.startswith(f"{API}/"):
            return None
        session = sessions.find(request.cookies.get(COOKIE))
        if session is None:
            return None
        if request.method not in ("GET", "HEAD") and not (same_origin() and session.allows(
                request.headers.get(CSRF_HEADER))):
            return jsonify(error_body("forbidden", "dashboard actions come from the dashboard's own page, with its "
                                                   f"{CSRF_HEADER} header; reload the page")), 403
        g.client_key = SESSION_KEY
        return True

    return check


class Dashboard:
    """The views rendered from the queen's state."""

    def __init__(self, queen: Queen, model_names: Callable[[], list[str]]) -> None:
        self.queen = queen
        self.model_names = model_names

    def fragments(self, hives: list[HiveView] | None = None) -> dict[str, str]:
        queen = self.queen
        hives = queen.status() if hives is None else hives
        catalogs = queen.catalogs()
        held = queen.registry.jobs()
        workers = views.workers(hives, queen.feed, catalogs)
        models = views.models(queen.fleet.inventory, catalogs, workers, held)
        return {
            "fleet": render("fleet.html", hosts=views.hosts(hives)),
            "workers": render("workers.html", workers=workers),
            "jobs": render("jobs.html", jobs=views.jobs(held)),
            "models": render("models.html", view=models),
            "model_options": render("model_options.html", names=self.model_names()),
        }

    def log_lines(self, after: int) -> tuple[str, int]:
        lines = self.queen.feed.lines_after(after)[-LOG_BACKLOG:]
        return render("log_lines.html", lines=lines), (lines[-1].seq if lines else after)

    async def frames(self) -> AsyncIterator[bytes]:
        """The page's one stream: each view's fragment when it changed, new log lines as they come."""
        sent: dict[str, str] = {}
        seq = 0
        stop = self.queen.stop
        while not stop.is_set():
            started = time.monotonic()
            fragments = self.fragments()
            chunk = [frame(name, html) for name, html in fragments.items() if sent.get(name) != html]
            sent = fragments
            log, last = self.log_lines(seq)
            if last != seq:
                chunk.append(frame("log", log))
                seq = last
            yield b"".join(chunk) or b": tick\n\n"
            await self.queen.feed.wait(TICK_S)
            rest = SPACING_S - (time.monotonic() - started)
            if rest > 0 and not stop.is_set():
                await asyncio.sleep(rest)


def frame(name: str, html: str) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'html': html})}\n\n".encode()


def mount_dashboard(app: Quart, queen: Queen, make_producer: Callable[[dict[str, Any]], Producer],
                    make_pull: Callable[[dict[str, Any]], Producer], model_names: Callable[[], list[str]]) -> None:
    dashboard = Dashboard(queen, model_names)
    sessions = queen.sessions

    @app.after_request
    async def _protect(response: Response) -> Response:
        if request.path == PREFIX or request.path.startswith(f"{PREFIX}/"):
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["X-Frame-Options"] = "DENY"
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get(PREFIX)
    async def dashboard_bare() -> Response:
        return Response("", status=308, headers={"Location": f"{PREFIX}/"})

    @app.get(f"{PREFIX}/")
    async def dashboard_page() -> Response:
        session = sessions.find(request.cookies.get(COOKIE))
        if session is None:
            return Response(render("login.html"), content_type="text/html; charset=utf-8")
        hives = queen.status()  # once, for the views and the host lists
        page = render("page.html", csrf=session.csrf, views=dashboard.fragments(hives),
                      hosts=[row.name for row in hives], default_model=DEFAULT_MODEL)
        return Response(page, content_type="text/html; charset=utf-8")

    @app.get(f"{PREFIX}/static/<name>")
    async def dashboard_static(name: str) -> Response:
        kind = STATIC.get(name)
        if kind is None:
            return Response("not found", status=404, content_type="text/plain")
        body = resources.files("rbee.queen.dashboard").joinpath("static", name).read_bytes()
        return Response(body, content_type=kind, headers={"Cache-Control": "no-cache"})

    @app.post(f"{PREFIX}/login")
    async def dashboard_login() -> tuple[Response, int]:
        """The page trades the URL's one-time token for its session cookie."""
        if not same_origin():
            return jsonify(error_body("forbidden", "log in from the dashboard's own page")), 403
        body = await read_json_body()
        cookie = sessions.redeem(body.get("token"))
        if cookie is None:
            return jsonify(error_body("unauthorized", "this login link was used already or is older than "
                                                      "5 minutes; run `rbee dashboard` for a new one")), 401
        response = jsonify({"ok": True})
        response.set_cookie(COOKIE, cookie, max_age=int(sessions.session_ttl), path=PREFIX, httponly=True,
                            samesite="Strict")
        return response, 200

    @app.post("/v1/dashboard/logins")
    async def dashboard_logins() -> tuple[Response, int]:
        """A one-time login for `rbee dashboard` (the owner's key only: not a dashboard route)."""
        return jsonify({"token": sessions.login_token(), "path": f"{PREFIX}/",
                        "expires_in": int(sessions.login_ttl)}), 201

    @app.get(f"{API}/events")
    async def dashboard_events() -> Response:
        return await sse_response(dashboard.frames())

    @app.post(f"{API}/logout")
    async def dashboard_logout() -> Response:
        sessions.end(request.cookies.get(COOKIE))
        response = jsonify({"ok": True})
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # the playground's chats are link jobs: POST creates one, GET …/stream follows it, DELETE cancels
    add_job_routes(app, queen.registry, make_producer, prefix=f"{API}/jobs")

    @app.post(f"{API}/pull")
    async def dashboard_pull() -> tuple[Response, int]:
        """A pull that runs to its end whether or not the page stays: the Models view follows
        it through its narration."""
        job = queen.registry.create(make_pull(await read_json_body()), detached=True)
        queen.feed.notify()
        return jsonify({"job_id": job.id}), 202

    @app.post(f"{API}/workers/<node>/<worker_id>/stop")
    async def dashboard_unload(node: str, worker_id: str) -> Response:
        if node not in queen.known_nodes():
            raise RequestError(f"unknown node {node!r}")
        result = await queen.on_hive(node, "POST", f"/v1/workers/{worker_id}/stop")
        queen.feed.notify()
        return jsonify(result)
