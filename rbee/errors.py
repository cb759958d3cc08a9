"""The one exception tree of rbee. Every message is written for the operator:
what went wrong, where, and how to fix it.

    RbeeError
    ├── ConfigError (ValueError)          bad flag, env var or setting
    ├── ModelError
    │   ├── ModelNotFoundError (LookupError)  unknown model reference or missing file
    │   └── ModelLoadError                    the engine could not load the file
    ├── RequestError (ValueError)         a request body that fails validation
    ├── QueueFullError                    every slot busy and the wait queue at its limit (429, Retry-After)
    ├── JobNotFoundError (LookupError)    stream/cancel for an id nobody knows
    ├── LinkError (ConnectionError)       a peer did not answer or broke the stream
    │   └── PeerError                     the peer answered with an `error` event
    └── StartupError                      a role (queen, hive, worker) failed to start

Foreign exceptions are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class RbeeError(Exception):
    """Root of every error rbee raises on purpose.

    ``code`` is the stable machine-readable name used in `error` events and
    JSON error bodies; ``status`` the HTTP status a server answers with.
    """

    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(RbeeError, ValueError):
    code = "bad_config"
    status = 400


class ModelError(RbeeError):
    code = "model_error"
    status = 500


class ModelNotFoundError(ModelError, LookupError):
    code = "model_not_found"
    status = 404


class ModelLoadError(ModelError):
    code = "model_load_failed"
    status = 500


class RequestError(RbeeError, ValueError):
    code = "bad_request"
    status = 400


class QueueFullError(RbeeError):
    """Every slot of a worker is busy and its queue is full; ``retry_after`` seconds is a fair wait."""

    code = "queue_full"
    status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobNotFoundError(RbeeError, LookupError):
    code = "job_not_found"
    status = 404


class LinkError(RbeeError, ConnectionError):
    code = "link_failed"
    status = 502


class PeerError(LinkError):
    """The peer answered, with an `error` event or an error status.

    Keeps the peer's own code and actor so the operator sees who failed.
    """

    def __init__(self, message: str, *, code: str = "peer_error", actor: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.actor = actor


class StartupError(RbeeError):
    code = "startup_failed"
    status = 503
