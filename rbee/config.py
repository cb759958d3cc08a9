"""Typed, frozen configuration of each role, built once at the edge.

A role process is started as ``python -m rbee.<role> --flag value ...``; the
parent builds the flags with ``to_args()`` and the child reads them back with
``from_args()``, so both sides always agree on the shape. Nothing from argv
or typer travels past these objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rbee.errors import ConfigError

DEFAULT_QUEEN_PORT = 7833
DEFAULT_HIVE_PORT = 7835
DEFAULT_MODEL = "gemma3-270m"
LOCAL_NODE = "localhost"
#: what a hive runs (``python -m``) for each worker; the queen checks it imports on every host
WORKER_MODULE = "rbee.worker"
DEFAULT_HEARTBEAT_S = 2.0
DEFAULT_QUEUE = 64
#: tokens an embedding worker takes per input (its context): inputs are embedded whole, never cut
EMBED_MAX_CTX = 8192


def rbee_home(env: Mapping[str, str] = os.environ) -> Path:
    """Where rbee keeps models, logs and run files: ``$RBEE_HOME`` or ``~/.rbee``."""
    return Path(env.get("RBEE_HOME") or Path.home() / ".rbee").expanduser()


def models_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("RBEE_MODELS_DIR") or rbee_home(env) / "models").expanduser()


def heartbeat_interval(env: Mapping[str, str] = os.environ) -> float:
    raw = env.get("RBEE_HEARTBEAT_INTERVAL")
    if raw is None:
        return DEFAULT_HEARTBEAT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"RBEE_HEARTBEAT_INTERVAL must be seconds, e.g. 2.0; got {raw!r}") from None
    if not 0.05 <= value <= 3600:
        raise ConfigError(f"RBEE_HEARTBEAT_INTERVAL must be between 0.05 and 3600 s; got {value}")
    return value


def _env_number(name: str, default: float, env: Mapping[str, str] = os.environ) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number; got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative; got {raw!r}")
    return value


def ping_interval(env: Mapping[str, str] = os.environ) -> float:
    """Seconds between keep-alive comments on an idle event stream."""
    return _env_number("RBEE_PING_INTERVAL", 5.0, env) or 5.0


def stall_timeout(env: Mapping[str, str] = os.environ) -> float:
    """Seconds a relay waits for anything (event or keep-alive) before it calls its peer hung."""
    return _env_number("RBEE_STALL_TIMEOUT", 30.0, env) or 30.0


def resume_grace(env: Mapping[str, str] = os.environ) -> float:
    """Seconds a job whose stream broke waits for its client to resume before it is cancelled."""
    return _env_number("RBEE_RESUME_GRACE", 15.0, env)


def peer_retention(env: Mapping[str, str] = os.environ) -> float:
    """Seconds a down or stopped hive or worker stays listed before it is dropped."""
    return _env_number("RBEE_PEER_RETENTION", 300.0, env)


def memory_budget(process: int, host: int | None) -> int:
    """What a hive's workers may hold in all: the lower of ``RBEE_MEMORY_BUDGET`` (``process``)
    and the inventory's ``memory`` for the host, where set (0: no cap)."""
    caps = [cap for cap in (process, host or 0) if cap > 0]
    return min(caps) if caps else 0


def queen_url(env: Mapping[str, str] = os.environ) -> str:
    return env.get("RBEE_QUEEN_URL") or f"http://127.0.0.1:{DEFAULT_QUEEN_PORT}"


@dataclass(frozen=True)
class ServeOptions:
    """Where and how long a role process serves. ``fd`` is a socket inherited from the parent."""

    host: str = "127.0.0.1"
    port: int = 0
    fd: int | None = None
    parent_pid: int | None = None


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    model_path: Path
    hive_url: str
    backend: str = "llama-cpp"
    heartbeat_interval: float = DEFAULT_HEARTBEAT_S
    n_ctx: int = 2048
    threads: int = 0
    #: layers llama.cpp puts on the GPU: -1 all, 0 none, N
    gpu_layers: int = 0
    #: fractions per visible GPU, comma-separated ("0.6,0.4"); empty = one GPU
    tensor_split: str = ""
    #: the unix sockets of this model's shares on helper hosts (rbee.worker.rpc_share), comma-separated:
    #: their devices take ``gpu_layers`` of the last layers, split by ``tensor_split``
    rpc: str = ""
    #: sequences decoded together (continuous batching); 0 = from the context size
    slots: int = 0
    #: requests that may wait for a slot before the worker answers 429
    queue_limit: int = DEFAULT_QUEUE
    ping_interval: float = field(default_factory=lambda: ping_interval())
    resume_grace: float = field(default_factory=lambda: resume_grace())
    serve: ServeOptions = field(default_factory=ServeOptions)

    @property
    def actor(self) -> str:
        return f"worker:{self.worker_id}"


@dataclass(frozen=True)
class HiveConfig:
    name: str = LOCAL_NODE
    queen_url: str = ""
    home: Path = field(default_factory=rbee_home)
    models_dir: Path = field(default_factory=models_dir)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_S
    worker_ready_timeout: float = 120.0
    backend: str = "auto"  # the inventory's per-hive `backend =`
    ping_interval: float = field(default_factory=lambda: ping_interval())
    stall_timeout: float = field(default_factory=lambda: stall_timeout())
    resume_grace: float = field(default_factory=lambda: resume_grace())
    peer_retention: float = field(default_factory=lambda: peer_retention())
    worker_idle_timeout: float = field(default_factory=lambda: _env_number("RBEE_WORKER_IDLE_TIMEOUT", 900.0))
    #: bytes rbee's workers may hold in all; 0 = whatever is free
    memory_budget: int = field(default_factory=lambda: int(_env_number("RBEE_MEMORY_BUDGET", 0)))
    serve: ServeOptions = field(default_factory=lambda: ServeOptions(port=DEFAULT_HIVE_PORT))

    @property
    def actor(self) -> str:
        return f"hive:{self.name}"


@dataclass(frozen=True)
class QueenConfig:
    home: Path = field(default_factory=rbee_home)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_S
    ephemeral: bool = False
    hive_ready_timeout: float = 60.0
    inventory: str = ""
    ping_interval: float = field(default_factory=lambda: ping_interval())
    stall_timeout: float = field(default_factory=lambda: stall_timeout())
    resume_grace: float = field(default_factory=lambda: resume_grace())
    peer_retention: float = field(default_factory=lambda: peer_retention())
    serve: ServeOptions = field(default_factory=lambda: ServeOptions(port=DEFAULT_QUEEN_PORT))

    actor = "queen"


C = TypeVar("C")


def to_args(config: Any) -> list[str]:
    """Flags for ``config`` (``--fd``/``--parent-pid`` are added by the spawner)."""
    args: list[str] = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name == "serve":
            if value.fd is None:
                args += ["--host", value.host, "--port", str(value.port)]
            continue
        flag = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif value not in (None, ""):
            args += [flag, str(value)]
    return args


def from_args(cls: type[C], argv: Sequence[str]) -> C:
    """Parse flags made by :func:`to_args` back into ``cls``."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=f"rbee {cls.__name__}")
    defaults = {"host": "127.0.0.1", "port": 0}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        if item.name == "serve":
            default_serve = item.default_factory() if item.default_factory is not dataclasses.MISSING else None
            defaults["port"] = default_serve.port if default_serve else 0
            continue
        kind = hints[item.name]
        flag = "--" + item.name.replace("_", "-")
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(flag, dest=item.name, action="store_true")
        else:
            parser.add_argument(flag, dest=item.name, type=_converter(kind), required=required)
    parser.add_argument("--host", default=defaults["host"])
    parser.add_argument("--port", type=int, default=defaults["port"])
    parser.add_argument("--fd", type=int)
    parser.add_argument("--parent-pid", type=int)
    ns = vars(parser.parse_args(list(argv)))
    serve = ServeOptions(ns.pop("host"), ns.pop("port"), ns.pop("fd"), ns.pop("parent_pid"))
    values = {key: value for key, value in ns.items() if value is not None}
    return cls(**values, serve=serve)  # type: ignore[call-arg]


def _converter(kind: Any) -> Any:
    if kind in (int, float, str, Path):
        return kind
    raise TypeError(f"no flag converter for {kind!r}")
