"""Scoped client keys: what an app, a web UI or an editor plugin gets instead of the owner's key.

A client key runs inference (the OpenAI routes, ``/v1/jobs``) and nothing else: no fleet,
no admin, no logs. It may be limited to some models (``rbee keys add NAME --models a,b``),
and names ``file:`` models only under the inventory's ``[queen] model_roots``. Keys are
stored as their sha256 in ``RBEE_HOME/keys.json`` (0600); the key itself is shown once, at
``rbee keys add``. The queen reads the file again whenever it changes, so ``rbee keys
revoke`` takes effect at the next request, with or without a queen running.

The owner's key (``RBEE_HOME/secret``) stays what the CLI uses, and may name any file the
owner can read.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from rbee.errors import BadModelRefError, ConfigError, ForbiddenError, RequestError

KEYS_FILE = "keys.json"
PREFIX = "rbee-ck-"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: routes a client key may call: inference, its own jobs' streams, the model list
CLIENT_ROUTES = (
    re.compile(r"^/v1/(chat/completions|completions|embeddings|models)$"),
    re.compile(r"^/v1/jobs(/[A-Za-z0-9_-]+(/stream)?)?$"),
    # Ollama's: inference and listings; pull and delete change the hosts' disks (the owner's)
    re.compile(r"^/api/(chat|generate|embed|embeddings|tags|show|ps|version)$"),
)


@dataclass(frozen=True)
class ClientKey:
    name: str
    digest: str  # sha256 of the key, hex
    models: tuple[str, ...] = ()  # empty: every model the fleet serves
    created: float = field(default_factory=time.time)

    def allows_route(self, path: str) -> bool:
        return any(route.fullmatch(path) for route in CLIENT_ROUTES)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "models": list(self.models) or "all", "created": self.created}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """``RBEE_HOME/keys.json``, read again when it changes."""

    def __init__(self, home: Path) -> None:
        self.path = home / KEYS_FILE
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, ClientKey] = {}

    def keys(self) -> list[ClientKey]:
        self._refresh()
        return sorted(self._keys.values(), key=lambda key: key.name)

    def find(self, key: str) -> ClientKey | None:
        """The client key ``key`` is, compared by its hash in constant time."""
        if not key.startswith(PREFIX):
            return None
        self._refresh()
        wanted = digest(key)
        found = None
        for entry in self._keys.values():
            if hmac.compare_digest(entry.digest, wanted):
                found = entry
        return found

    def add(self, name: str, models: Iterable[str] = ()) -> tuple[ClientKey, str]:
        """A new key named ``name``: returns it and the key itself (shown once, never stored)."""
        if not NAME.fullmatch(name):
            raise RequestError(f"key name {name!r}: 1 to 64 letters, digits, '.', '_' or '-'")
        self._refresh()
        if any(entry.name == name for entry in self._keys.values()):
            raise RequestError(f"a key named {name!r} exists; revoke it first (`rbee keys revoke {name}`)")
        secret = PREFIX + secrets.token_urlsafe(32)
        entry = ClientKey(name, digest(secret), tuple(dict.fromkeys(m.strip() for m in models if m.strip())))
        self._write([*self._keys.values(), entry])
        return entry, secret

    def revoke(self, name: str) -> ClientKey:
        self._refresh()
        entry = next((e for e in self._keys.values() if e.name == name), None)
        if entry is None:
            known = ", ".join(sorted(e.name for e in self._keys.values())) or "none"
            raise RequestError(f"no client key named {name!r} (keys: {known})")
        self._write([e for e in self._keys.values() if e.name != name])
        return entry

    def _refresh(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._keys = None, {}
            return
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{self.path} must be the owner's and private: chmod 600 {self.path}")
        try:
            rows = json.loads(self.path.read_text())["keys"]
            keys = [ClientKey(row["name"], row["digest"], tuple(row.get("models") or ()), row.get("created", 0.0))
                    for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path} is not a key list rbee wrote ({exc}); remove it and add keys "
                              "again") from exc
        self._keys = {entry.digest: entry for entry in keys}
        self._stamp = stamp

    def _write(self, keys: list[ClientKey]) -> None:
        """Atomically, 0600 from the start."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{KEYS_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"keys": [{**asdict(entry), "models": list(entry.models)} for entry in keys]}, handle, indent=1)
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            os.utime(self.path)  # a new mtime even within the same clock tick
        self._stamp = None
        self._refresh()


def check_model(key: ClientKey | None, refs: Iterable[str | None], roots: Iterable[str], default: str) -> None:
    """The one model policy of every route, decided at the queen before any hive opens a
    file: the owner (``key`` None) may name anything; a client key only its models, and
    ``file:`` paths only under ``model_roots``, with one answer whatever the file is."""
    if key is None:
        return
    for ref in refs:
        name = ref or default
        if name.startswith("file:") and not under_roots(name.removeprefix("file:"), roots):
            raise BadModelRefError(
                f"{name!r}: a client key names `file:` models only under the inventory's [queen] model_roots "
                f"({', '.join(roots) or 'none are listed'}); the owner's CLI is not limited")
        if key.models and name not in key.models:
            raise ForbiddenError(f"the client key {key.name!r} may use only {', '.join(key.models)}; "
                                 f"not {name!r}. `rbee keys add` makes a key for more models")


def under_roots(path_text: str, roots: Iterable[str]) -> bool:
    """Lexically: the queen never looks at the file (it may be on another host)."""
    path = PurePosixPath(path_text)
    return (path.is_absolute() and ".." not in path.parts and "\x00" not in path_text
            and any(path.is_relative_to(PurePosixPath(root)) for root in roots))
