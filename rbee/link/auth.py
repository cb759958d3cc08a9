"""Every hop is authenticated, on loopback too: ``Authorization: Bearer <secret>``.

Loopback is not a boundary: every other unix user of the queen's machine, and of
every fleet host the SSH forwards reach, can connect to 127.0.0.1. So each rbee
has a secret, made at first need in ``RBEE_HOME/secret`` (0600, RBEE_HOME 0700):
the queen, the keeper run by the same user, and the local hive and workers read
it there; a remote hive gets it as a 0600 file over SFTP (``RBEE_TOKEN_FILE``,
only the path on a command line). With ``RBEE_TOKEN_FILE`` set, that file is the
secret instead (network mode). The secret is compared in constant time, never
logged, and never sent to a server that has not proved it knows it: a bare
``/health`` answers who is there, and with ``X-Rbee-Challenge: NONCE`` also
``X-Rbee-Proof: HMAC(secret, NONCE)``, which the keeper checks first.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from quart import Quart, Response, jsonify, request

from rbee.config import rbee_home
from rbee.errors import ConfigError

ENV = "RBEE_TOKEN_FILE"
SECRET_FILE = "secret"
CHALLENGE = "X-Rbee-Challenge"
PROOF = "X-Rbee-Proof"


def load_token(env: Mapping[str, str] = os.environ, home: Path | None = None) -> str:
    """This rbee's secret: the file named by ``RBEE_TOKEN_FILE``, else ``HOME/secret`` (``home``
    or RBEE_HOME; made now if missing). Refuses a file others can read or another user owns."""
    return _read_private(secret_file(env, home), ENV)


def secret_file(env: Mapping[str, str] = os.environ, home: Path | None = None) -> Path:
    """Where the secret is (made there if missing): what a parent passes its children as
    ``RBEE_TOKEN_FILE``, so every role of one rbee reads the same file."""
    path_text = env.get(ENV)
    if path_text:
        return Path(path_text).expanduser()
    home = home or rbee_home(env)
    _private_dir(home)
    path = home / SECRET_FILE
    if not path.exists():
        _create(path)
    return path


def _private_dir(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = home.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"{home} belongs to another user; set RBEE_HOME to a directory of your own")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        home.chmod(0o700)  # rbee's own directory: nobody else needs to read it


def _create(path: Path) -> None:
    """Write a new secret with O_EXCL and mode 0600 from the start (no window where others
    could read it); if another process made it first, theirs is kept."""
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))


def _read_private(path: Path, where: str) -> str:
    try:
        info = path.stat()
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the secret file {path}: {exc.strerror}") from exc
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to another user; rbee uses only a secret file of its own user")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is readable by others; make it private: chmod 600 {path}")
    if len(token) < 16:
        raise ConfigError(f"{path}: the secret is too short; use at least 16 characters (e.g. openssl rand -hex 32)")
    return token


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def proof(token: str, challenge: str) -> str:
    """What only a holder of ``token`` can answer to ``challenge``."""
    return hmac.new(token.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def proves(token: str, challenge: str, answer: str | None) -> bool:
    return answer is not None and hmac.compare_digest(proof(token, challenge), answer)


def install_auth(app: Quart, token: str | None, role: str) -> None:
    """Refuse every request without the secret (401). ``GET /health`` without it answers only
    the role (a liveness check), plus the proof for a challenge."""
    if not token:
        return
    expected = f"Bearer {token}".encode()

    @app.before_request
    async def _check() -> tuple[Response, int, dict[str, str]] | None:
        given = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        if request.path == "/health" and request.method in ("GET", "HEAD"):
            challenge = request.headers.get(CHALLENGE, "")[:200]
            headers = {PROOF: proof(token, challenge)} if challenge else {}
            return jsonify({"role": role}), 200, headers
        body = {"error": {"code": "unauthorized", "message": "every rbee request needs 'Authorization: Bearer "
                          "<secret>'; the owner's secret is in RBEE_HOME/secret (`rbee queen key` prints it)",
                          "type": "authentication_error"}}
        return jsonify(body), 401, {"WWW-Authenticate": "Bearer"}
