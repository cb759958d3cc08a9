"""The dashboard's login: `rbee dashboard` asks the queen (with the owner's key) for a one-time
token and prints it in a URL; the page trades it, once, for a browser session.

The session is an HttpOnly, SameSite=Strict cookie that opens the dashboard's own routes and
nothing else, and carries a CSRF token the page sends back in a header on every action. The
queen keeps only hashes, in memory: a queen restart logs every browser out. A login token
lives a few minutes and works once, so a URL left in a terminal's scrollback or the browser's
history is worth nothing afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "rbee_dashboard"
CSRF_HEADER = "X-Rbee-Csrf"
LOGIN_TTL_S = 300.0
SESSION_TTL_S = 12 * 3600.0
#: outstanding logins and live sessions kept; past it the oldest goes (a loop of `rbee
#: dashboard` cannot grow the queen's memory)
MOST_LOGINS = 16
MOST_SESSIONS = 64


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    csrf: str
    expires: float  # on the sessions' clock

    def allows(self, sent: str | None) -> bool:
        """The CSRF token an action must carry: another site's page cannot read it."""
        return sent is not None and hmac.compare_digest(sent.encode(), self.csrf.encode())


class Sessions:
    """One-time login tokens and the browser sessions they became, by their sha256."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, login_ttl: float = LOGIN_TTL_S,
                 session_ttl: float = SESSION_TTL_S) -> None:
        self.clock = clock
        self.login_ttl = login_ttl
        self.session_ttl = session_ttl
        self._logins: OrderedDict[str, float] = OrderedDict()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def login_token(self) -> str:
        token = secrets.token_urlsafe(32)
        self._logins[_digest(token)] = self.clock() + self.login_ttl
        while len(self._logins) > MOST_LOGINS:
            self._logins.popitem(last=False)
        return token

    def redeem(self, token: object) -> str | None:
        """Trade a login token for a new session (the cookie's value); None for a token
        unknown, used already or expired."""
        if not isinstance(token, str) or not token:
            return None
        expires = self._logins.pop(_digest(token), None)
        if expires is None or expires < self.clock():
            return None
        cookie = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(24), expires=self.clock() + self.session_ttl)
        self._sessions[_digest(cookie)] = session
        while len(self._sessions) > MOST_SESSIONS:
            self._sessions.popitem(last=False)
        return cookie

    def find(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        key = _digest(cookie)
        session = self._sessions.get(key)
        if session is not None and session.expires < self.clock():
            del self._sessions[key]
            return None
        return session

    def end(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(_digest(cookie), None)
