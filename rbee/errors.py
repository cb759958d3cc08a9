"""The one exception tree of rbee. Every message is written for the operator:
what went wrong, where, and how to fix it. One code per class; the code is what
`error` events and JSON error bodies carry, so a peer's error keeps its meaning
across every hop.

    RbeeError                              internal               500
    ├── ConfigError (ValueError)           bad_config             400  bad flag, env var or setting
    │   ├── InventoryError                 bad_inventory          400  inventory.toml fails validation
    │   └── TrustError                     trust_refused          400  `fleet trust` could not pin a host key
    ├── RequestError (ValueError)          bad_request            400  a body or parameter that fails validation
    │   ├── BadModelRefError               bad_model_ref          400  a model reference that does not parse
    │   ├── BadModelError                  bad_model              400  a file or folder that is not a usable model
    │   └── EngineError                    no_engine              400  no engine on the host runs that model form
    ├── NotFoundError (LookupError)        not_found              404
    │   ├── ModelNotFoundError             model_not_found        404  unknown model, missing file, empty repo
    │   ├── UnknownNodeError               unknown_node           404  a node the inventory does not name
    │   ├── UnknownWorkerError             unknown_worker         404  a worker id the hive does not know
    │   └── JobNotFoundError               job_not_found          404  stream/cancel for an id nobody knows
    ├── ModelError                         model_error            500  provisioning went wrong on the host
    │   ├── ModelLoadError                 model_load_failed      500  the engine could not load the file
    │   ├── DownloadError                  download_failed        502  the Hub answered, the download failed
    │   │   └── DownloadInterruptedError   download_interrupted   502  the connection kept failing; bytes kept to resume
    │   └── DiskFullError                  disk_full              507  no room for the model
    ├── NoCapacityError                    no_capacity            503  no memory for a new worker on the host
    │   └── NoHiveError                    no_hive                503  no hive is up to schedule on
    ├── QueueFullError                     queue_full             429  every slot busy, wait queue full (Retry-After)
    ├── JobCancelledError                  cancelled              499  the client (or a shutdown) cancelled the job
    ├── LinkError (ConnectionError)        link_failed            502  a peer did not answer or broke the stream
    │   ├── StallError                     stalled                504  nothing, not even a keep-alive, for too long
    │   ├── PeerDownError                  peer_down              503  the peer missed its heartbeats
    │   ├── HubUnreachableError            hub_unreachable        502  the model hub's endpoint cannot be reached
    │   ├── UnprovenPeerError              unproven_peer          502  a server that cannot prove it holds our secret
    │   ├── SshError                       ssh_failed             502  an SSH connection failed
    │   │   ├── HostKeyError               host_key_refused       502  the host key is not the pinned one
    │   │   └── RemoteCommandError         remote_command_failed  502  a command on the host failed
    │   └── PeerError                      (the peer's code)      502  the peer answered with an error
    │       ├── WorkerDiedError            worker_died            503  the worker's process exited mid-job
    │       └── WorkerStalledError         worker_stalled         503  the worker hung and was killed
    ├── UnauthorizedError                  unauthorized           401  no or wrong bearer token
    ├── ForbiddenError                     forbidden              403  a client key outside its scope (routes, models)
    └── StartupError                       startup_failed         503  a role (queen, hive, worker) failed to start
        ├── NodeDownError                  node_down              503  the node is marked down
        ├── WheelhouseError                wheelhouse_failed      500  the queen could not build what hosts install
        ├── EngineBuildError               engine_build_failed    500  the engine build does not run on this CPU
        └── PrivateNetworkError            no_private_network     503  a host cannot fence off a split's RPC server

``HTTP`` below maps every code to its HTTP status and OpenAI error type; a test checks
it against the tree. Foreign exceptions are translated at the boundary where they
occur, with ``raise ... from exc``.
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


class InventoryError(ConfigError):
    code = "bad_inventory"


class TrustError(ConfigError):
    code = "trust_refused"


class RequestError(RbeeError, ValueError):
    code = "bad_request"
    status = 400


class BadModelRefError(RequestError):
    code = "bad_model_ref"


class BadModelError(RequestError):
    """Not a model: the message names the path and what is missing, never the file's bytes."""

    code = "bad_model"


class EngineError(RequestError):
    code = "no_engine"


class NotFoundError(RbeeError, LookupError):
    code = "not_found"
    status = 404


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class UnknownNodeError(NotFoundError):
    code = "unknown_node"


class UnknownWorkerError(NotFoundError):
    code = "unknown_worker"


class JobNotFoundError(NotFoundError):
    code = "job_not_found"


class ModelError(RbeeError):
    code = "model_error"
    status = 500


class ModelLoadError(ModelError):
    code = "model_load_failed"


class DownloadError(ModelError):
    code = "download_failed"
    status = 502


class DownloadInterruptedError(DownloadError):
    """The connection kept failing: the bytes staged so far are kept, and the next pull resumes."""

    code = "download_interrupted"


class DiskFullError(ModelError):
    code = "disk_full"
    status = 507


class NoCapacityError(RbeeError):
    code = "no_capacity"
    status = 503


class NoHiveError(NoCapacityError):
    code = "no_hive"


class QueueFullError(RbeeError):
    """Every slot of a worker is busy and its queue is full; ``retry_after`` seconds is a fair wait."""

    code = "queue_full"
    status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobCancelledError(RbeeError):
    code = "cancelled"
    status = 499  # the client closed the request (nginx's convention)


class LinkError(RbeeError, ConnectionError):
    code = "link_failed"
    status = 502


class StallError(LinkError):
    code = "stalled"
    status = 504


class PeerDownError(LinkError):
    code = "peer_down"
    status = 503


class HubUnreachableError(LinkError):
    code = "hub_unreachable"


class UnprovenPeerError(LinkError):
    code = "unproven_peer"


class SshError(LinkError):
    code = "ssh_failed"


class HostKeyError(SshError):
    code = "host_key_refused"


class RemoteCommandError(SshError):
    code = "remote_command_failed"


class PeerError(LinkError):
    """The peer answered, with an `error` event or an error status.

    Keeps the peer's own code and actor so the operator sees who failed.
    """

    code = "peer_error"

    def __init__(self, message: str, *, code: str | None = None, actor: str = "") -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.actor = actor


class WorkerDiedError(PeerError):
    code = "worker_died"
    status = 503


class WorkerStalledError(PeerError):
    code = "worker_stalled"
    status = 503


class UnauthorizedError(RbeeError):
    code = "unauthorized"
    status = 401


class ForbiddenError(RbeeError):
    """A valid key asked for something outside its scope (a client key and a fleet route)."""

    code = "forbidden"
    status = 403


class StartupError(RbeeError):
    code = "startup_failed"
    status = 503


class NodeDownError(StartupError):
    code = "node_down"


class WheelhouseError(StartupError):
    code = "wheelhouse_failed"
    status = 500


class EngineBuildError(StartupError):
    """The installed llama.cpp cannot run here: no CPU variant of it decodes on this machine, or
    the one asked for is not in the build."""

    code = "engine_build_failed"
    status = 500


class PrivateNetworkError(StartupError):
    """A host cannot fence off a split's RPC server (no network namespace for its user)."""

    code = "no_private_network"


def _tree(cls: type[RbeeError]) -> list[type[RbeeError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _tree(child))]


#: every class of the tree, root first
CLASSES: tuple[type[RbeeError], ...] = tuple(_tree(RbeeError))


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status (its clients branch on it)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "server_error"


#: code → (HTTP status, OpenAI error type), for every class of the tree
HTTP: dict[str, tuple[int, str]] = {cls.code: (cls.status, openai_type(cls.status)) for cls in CLASSES}


def http_status(code: str) -> tuple[int, str]:
    """Status and OpenAI type for a code, e.g. one carried by a peer's `error` event."""
    return HTTP.get(code, (500, "server_error"))
