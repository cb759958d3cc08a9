"""Network mode: every request to every role carries ``Authorization: Bearer <token>``.

The token lives in a file (``RBEE_TOKEN_FILE``, mode 0600) and reaches hosts over
SFTP, never on a command line; it is compared in constant time and never logged.
Without a token file, rbee runs in local mode: loopback only, no token.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from quart import Quart, Response, jsonify, request

from rbee.errors import ConfigError

ENV = "RBEE_TOKEN_FILE"


def load_token(env: Mapping[str, str] = os.environ) -> str | None:
    """The shared token, or None in local mode. Refuses a file others can read."""
    path_text = env.get(ENV)
    if not path_text:
        return None
    path = Path(path_text).expanduser()
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{ENV}={path}: cannot read the token file: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is readable by others; make it private: chmod 600 {path}")
    if len(token) < 16:
        raise ConfigError(f"{path}: the token is too short; use at least 16 characters (e.g. openssl rand -hex 32)")
    return token


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def install_auth(app: Quart, token: str | None) -> None:
    """Refuse every request without the token (401), /health included: in network mode
    nothing about the fleet is public."""
    if not token:
        return
    expected = f"Bearer {token}".encode()

    @app.before_request
    async def _check() -> tuple[Response, int, dict[str, str]] | None:
        given = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        body = {"error": {"code": "unauthorized", "message": "this rbee runs in network mode: send "
                          "'Authorization: Bearer <token>' (the token is in the file named by RBEE_TOKEN_FILE)",
                          "type": "invalid_request_error"}}
        return jsonify(body), 401, {"WWW-Authenticate": "Bearer"}
