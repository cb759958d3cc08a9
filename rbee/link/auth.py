"""Every hop is authenticated, on loopback too: ``Authorization: Bearer <secret>``.

Loopback is not a boundary: every other unix user of the queen's machine, and of
every fleet host the SSH forwards reach, can connect to 127.0.0.1. So:

- the owner's secret is made at first need in ``RBEE_HOME/secret`` (0600, RBEE_HOME
  0700); the queen and the keeper of the same user read it there. With
  ``RBEE_TOKEN_FILE`` set, that file is the secret instead (network mode);
- each hive gets its own secret when the queen launches it, each worker its own
  when its hive spawns it: a 0600 file whose path is the child's ``RBEE_TOKEN_FILE``
  (pushed over SFTP to a remote host). The parent calls the child with it, and the
  child proves itself with it in its heartbeats, so a heartbeat is accepted only
  from a peer this queen or hive launched. On the queen's machine the local hive and
  workers also accept the owner's secret (``RBEE_OWNER_TOKEN_FILE``); remote hosts
  never see it.

Secrets are compared in constant time, never logged, and never sent to a server that
has not proved it knows them: a bare ``/health`` answers who is there, and with
``X-Rbee-Challenge: NONCE`` also ``X-Rbee-Proof: HMAC(secret, NONCE|ADDRESS)``, where
ADDRESS is the ``host:port`` the server listens on, so a proof relayed from a queen on
another port does not pass for this one. Every link client runs that challenge on each
new connection before the first request (``rbee.link.transport``), so a port freed by a
dead SSH forward or a stopped queen and taken by another user receives no secret. A
caller that holds its own secret rather than the callee's (a hive calling its queen, a
worker its hive) names itself in ``X-Rbee-Peer``, and the callee proves with that
caller's secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from quart import Quart, Response, jsonify, request

from rbee.config import rbee_home
from rbee.errors import ConfigError, RequestError

ENV = "RBEE_TOKEN_FILE"
OWNER_ENV = "RBEE_OWNER_TOKEN_FILE"
SECRET_FILE = "secret"
CHALLENGE = "X-Rbee-Challenge"
PROOF = "X-Rbee-Proof"
PEER = "X-Rbee-Peer"


def load_token(env: Mapping[str, str] = os.environ, home: Path | None = None) -> str:
    """This rbee's secret: the file named by ``RBEE_TOKEN_FILE``, else ``HOME/secret`` (``home``
    or RBEE_HOME; made now if missing). Refuses a file others can read or another user owns.
    Every role calls it at start, so RBEE_HOME (logs, hive.json, run/) is made 0700 on every
    host, a fleet host's included, where the secret file lives elsewhere."""
    if home is not None or env.get("RBEE_HOME") or not env.get(ENV):  # a worker's home is its hive's
        _private_dir(home or rbee_home(env))
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
    if home.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{home} stays readable by others (chmod refused); set RBEE_HOME to a private directory")


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


def proof(token: str, challenge: str, address: str) -> str:
    """What only a holder of ``token`` listening at ``address`` (host:port) answers to ``challenge``."""
    return hmac.new(token.encode(), f"rbee-proof|{challenge}|{address}".encode(), hashlib.sha256).hexdigest()


def proves(token: str, challenge: str, address: str, answer: str | None) -> bool:
    return answer is not None and hmac.compare_digest(proof(token, challenge, address), answer)


@dataclass(frozen=True)
class Callee:
    """Who a link client may send its secret to: a server that proves it holds ``key`` and
    listens at ``address`` (host:port: the address dialled, or for an SSH forward the
    callee's own address behind it). ``peer`` names the caller when ``key`` is the caller's
    own secret (the callee proves with what it gave that caller)."""

    key: str
    address: str = ""
    peer: str = ""


def accepted(token: str, env: Mapping[str, str] = os.environ) -> list[str]:
    """The secrets a role accepts: its own, and the owner's where its parent gave it
    (``RBEE_OWNER_TOKEN_FILE``: the queen's machine only, so the owner's key opens the local
    hive and workers too; remote hives never get it)."""
    owner = env.get(OWNER_ENV)
    return [token, _read_private(Path(owner), OWNER_ENV)] if owner else [token]


def write_secret(path: Path, secret: str | None = None) -> str:
    """A new secret (or ``secret``) for a peer this process launches, in a 0600 file (only its
    path travels)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secret or secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(secret)
    return secret


PeerSecret = Callable[[], "str | None"]
#: the secret a named caller was given (a hive's, by its name; a worker's, by its id)
PeerKey = Callable[[str], "str | None"]
#: a key that is not the owner's or a peer's (a scoped client key): None refuses it, a
#: response refuses it with that answer, True lets the request through
ClientCheck = Callable[[str], "Response | tuple[Response, int] | bool | None"]
#: a request without a key (a browser's, carrying a session cookie): the same verdicts
SessionCheck = Callable[[], "Response | tuple[Response, int] | bool | None"]


def listen_address() -> str:
    """The ``host:port`` this request reached the server on (its own socket, not a header)."""
    server = request.scope.get("server") if hasattr(request, "scope") else None
    if not server:
        return ""
    host, port = server[0], server[1]
    return f"{host}:{port}"


def install_auth(app: Quart, tokens: Sequence[str] | Callable[[], Sequence[str]], role: str,
                 peer_secret: PeerSecret | None = None, peer_key: PeerKey | None = None,
                 client: ClientCheck | None = None, open_paths: Sequence[str] = (),
                 session: SessionCheck | None = None) -> None:
    """Refuse every request without one of ``tokens`` (401); ``tokens`` may be a callable, for a
    hive whose secret the queen rotates. ``peer_secret`` may name one more secret for this
    request: a heartbeat route accepts the sending peer's own secret, so a hive or worker
    proves who it is. ``client`` judges any other bearer key (the queen's scoped client keys).
    ``GET /health`` without a secret answers only the role (a liveness check), plus the proof
    of a challenge: with this server's own secret, or with the secret of the caller that
    ``X-Rbee-Peer`` names (``peer_key``). ``open_paths`` answer GET and HEAD without a key
    (a liveness text that names nothing, like Ollama's ``/``). ``session`` judges a request that
    carries no key at all (the queen's dashboard: its pages and its cookie session)."""
    current = tokens if callable(tokens) else (lambda: tokens)
    if not any(current()):
        return

    @app.before_request
    async def _check() -> Response | tuple[Response, int] | tuple[Response, int, dict[str, str]] | None:
        given = request.headers.get("Authorization", "").encode()
        if any(hmac.compare_digest(given, f"Bearer {token}".encode()) for token in current() if token):
            return None
        peer = peer_secret() if peer_secret is not None else None
        if peer and hmac.compare_digest(given, f"Bearer {peer}".encode()):
            return None
        if request.path == "/health" and request.method in ("GET", "HEAD"):
            return _health(role, current()[0], peer_key)
        if request.path in open_paths and request.method in ("GET", "HEAD"):
            return None
        verdict: Response | tuple[Response, int] | bool | None = None
        if client is not None and given.startswith(b"Bearer "):
            verdict = client(given[7:].decode(errors="replace"))
        elif session is not None and not given:
            verdict = session()
        if verdict is True:
            return None
        if verdict is not None and verdict is not False:
            return verdict
        body = {"error": {"code": "unauthorized", "message": "every rbee request needs 'Authorization: Bearer "
                          "<secret>'; the owner's secret is in RBEE_HOME/secret (`rbee queen key` prints it), "
                          "a client's key comes from `rbee keys add`", "type": "authentication_error"}}
        return jsonify(body), 401, {"WWW-Authenticate": "Bearer"}


def _health(role: str, own: str, peer_key: PeerKey | None) -> tuple[Response, int, dict[str, str]]:
    challenge = request.headers.get(CHALLENGE, "")[:200]
    headers: dict[str, str] = {}
    if challenge:
        asker = request.headers.get(PEER, "")[:200]
        key = (peer_key(asker) if peer_key is not None and asker else None) or (None if asker else own)
        if key:
            headers[PROOF] = proof(key, challenge, listen_address())
    return jsonify({"role": role}), 200, headers


def loopback_url(url: object) -> str:
    """``url`` if it is ``http://127.0.0.1:PORT`` exactly (parsed, not a prefix match: the
    prefix ``http://127.0.0.1:1@10.9.9.9`` names another host), else a RequestError."""
    parts = urlsplit(url) if isinstance(url, str) else None
    try:
        port = parts.port if parts is not None else None
    except ValueError:
        port = None
    if (parts is None or parts.scheme != "http" or parts.hostname != "127.0.0.1" or parts.username is not None
            or parts.password is not None or port is None or parts.path not in ("", "/") or parts.query
            or parts.fragment or parts.netloc != f"127.0.0.1:{port}"):
        raise RequestError('body must be {"url": "http://127.0.0.1:PORT"}: a queen reached over loopback')
    return f"http://127.0.0.1:{port}"
