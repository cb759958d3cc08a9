"""inventory.toml: the hosts of the fleet, read with tomllib into pydantic models.

Shared by the keeper (which validates the file before anything starts) and the
queen (which acts on it). Every error names the file, the line and the key.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from rbee.config import DEFAULT_QUEEN_PORT, LOCAL_NODE, rbee_home
from rbee.errors import InventoryError
from rbee.link.schemas import Duration

HIVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SSH_TARGET = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
    r"(?P<host>[A-Za-z0-9._-]+|\[[0-9a-fA-F:]+\])"
    r"(?::(?P<port>\d{1,5}))?$"
)
MODEL_REF = re.compile(
    r"^(?:hf:[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(?::[A-Za-z0-9._/-]+)?"
    r"|file:/.+"
    r"|[A-Za-z0-9][A-Za-z0-9._-]*)$"
)


def check_model_ref(ref: str) -> str:
    if not MODEL_REF.match(ref) or ".." in ref.split(":", 1)[-1].split("/"):
        raise ValueError(
            f"{ref!r} is not a model reference: use a catalog name (gemma3-270m), hf:org/repo[:file.gguf] "
            "or file:/absolute/path"
        )
    return ref


class QueenSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(default=DEFAULT_QUEEN_PORT, ge=1, le=65535)
    heartbeat_interval: float = Field(default=2.0, ge=0.05, le=3600)
    #: absolute folders under which the OpenAI API may name `file:` models (the CLI is not limited)
    model_roots: tuple[str, ...] = ()

    @field_validator("model_roots")
    @classmethod
    def _absolute(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for root in value:
            if not root.startswith("/") or ".." in root.split("/"):
                raise ValueError(f"{root!r} is not an absolute folder without '..'")
        return value


class SshSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    known_hosts: str | None = None
    connect_timeout: float = Field(default=15.0, gt=0, le=600)


class SshTarget(BaseModel):
    model_config = ConfigDict(frozen=True)

    user: str | None
    host: str
    port: int | None

    def __str__(self) -> str:
        return (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")


class HiveEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    ssh: str | None = None
    identity_file: str | None = None
    python: str = "python3"
    home: str = "~/.rbee"
    models: tuple[str, ...] = ()
    backend: str = "auto"
    #: layers llama.cpp offloads on this host: -1 all (default where the build can), 0 none, N
    gpu_layers: int | None = Field(default=None, ge=-1, le=10_000)
    #: split a model no single GPU holds over several (tensor_split)
    gpu_split: bool = False
    #: "source": build llama-cpp-python on the host even where the queen could push a wheel
    build: Literal["auto", "source"] = "auto"
    #: how long an idle worker stays loaded on this host ("15m"; 0 unloads after each job, -1 keeps)
    keep_alive: Duration | None = None
    #: the most rbee's workers may hold on this host in all ("12GB", "512MB" or bytes), RAM or VRAM
    memory: ByteSize | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not HIVE_NAME.match(value):
            raise ValueError(f"{value!r} is not a hive name: letters, digits, '.', '_' and '-', at most 63")
        return value

    @field_validator("ssh")
    @classmethod
    def _ssh(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = SSH_TARGET.match(value)
        if not match or (match["port"] and not 0 < int(match["port"]) < 65536):
            raise ValueError(f"{value!r} is not an ssh target: write user@host or user@host:port")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_model_ref(ref) for ref in value)

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in ("auto", "llama-cpp", "mlx"):
            raise ValueError(f"backend must be auto, llama-cpp or mlx, not {value!r}")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: ByteSize | None) -> ByteSize | None:
        if value is not None and value <= 0:
            raise ValueError("must be more than 0 bytes: a size such as \"12GB\" or \"512MB\"")
        return value

    @field_validator("python", "home")
    @classmethod
    def _no_control_chars(cls, value: str) -> str:
        if not value or any(ord(ch) < 32 for ch in value):
            raise ValueError("must be a non-empty path without control characters")
        return value

    @property
    def remote(self) -> bool:
        return self.ssh is not None

    @property
    def target(self) -> SshTarget:
        match = SSH_TARGET.match(self.ssh or "")
        assert match is not None
        port = int(match["port"]) if match["port"] else None
        return SshTarget(user=match["user"], host=match["host"].strip("[]"), port=port)


class LogicalModel(BaseModel):
    """One model under one name, in the form each engine needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gguf: str | None = None
    mlx: str | None = None
    #: context length in tokens; omitted = the model's trained length, as far as memory allows
    ctx: int | None = Field(default=None, ge=256, le=1_048_576)
    #: layers llama.cpp offloads for this model, over the hive's setting
    gpu_layers: int | None = Field(default=None, ge=-1, le=10_000)
    #: sequences one worker decodes together (continuous batching); default: from the context size
    parallel: int | None = Field(default=None, ge=1, le=64)
    #: requests that may wait for a slot; past it the answer is 429 with Retry-After
    queue: int | None = Field(default=None, ge=0, le=10_000)
    #: the hives to split it across (the first runs the main worker), where none holds it alone
    split: tuple[str, ...] | None = Field(default=None, min_length=2)

    @field_validator("gguf", "mlx")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        return check_model_ref(value) if value is not None else None

    @model_validator(mode="after")
    def _some_form(self) -> LogicalModel:
        if self.gguf is None and self.mlx is None:
            raise ValueError("give at least one form: gguf = \"…\" and/or mlx = \"…\"")
        return self

    def forms(self) -> dict[str, str]:
        return {key: value for key, value in (("gguf", self.gguf), ("mlx", self.mlx)) if value}


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queen: QueenSection = QueenSection()
    ssh: SshSection = SshSection()
    hive: tuple[HiveEntry, ...] = ()
    models: dict[str, LogicalModel] = {}
    #: other names for models: ``coder = "hf:org/repo"`` (a ref, a catalog name or a logical model)
    aliases: dict[str, str] = {}
    path: str = ""

    @model_validator(mode="after")
    def _unique_names(self) -> Inventory:
        seen: set[str] = set()
        for index, entry in enumerate(self.hive):
            if entry.name in seen:
                raise ValueError(f"hive.{index}.name: duplicate hive name {entry.name!r}")
            seen.add(entry.name)
        for name, model in self.models.items():
            strangers = [hive for hive in model.split or () if hive not in seen]
            if strangers:
                raise ValueError(f"models.{name}.split: {', '.join(strangers)} is not a [[hive]] name; "
                                 f"hives: {', '.join(sorted(seen)) or 'none'}")
            if model.split is not None and model.gguf is None:
                raise ValueError(f"models.{name}.split: a split runs on llama.cpp, so give the model a gguf form")
        for alias, target in self.aliases.items():
            if alias in self.models:
                raise ValueError(f"aliases.{alias}: {alias!r} is also a [models] name; use one of the two")
            if not target.strip() or target in self.aliases:
                raise ValueError(f"aliases.{alias}: must name a model (a ref, a catalog name or a [models] "
                                 f"name), not {target!r}")
        return self

    def resolve_alias(self, name: str | None) -> str | None:
        """The model an ``[aliases]`` name stands for; any other name as it is."""
        return self.aliases.get(name, name) if name is not None else None

    def get(self, name: str) -> HiveEntry | None:
        return next((entry for entry in self.hive if entry.name == name), None)

    def memory(self, name: str) -> int | None:
        """The ``memory`` cap of hive ``name``, if the inventory lists it with one."""
        entry = self.get(name)
        return int(entry.memory) if entry is not None and entry.memory is not None else None

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.hive]

    @classmethod
    def local_only(cls) -> Inventory:
        return cls(hive=(HiveEntry(name=LOCAL_NODE),))


def default_path(env: Mapping[str, str] = os.environ) -> Path | None:
    """``$RBEE_INVENTORY``, else ``RBEE_HOME/inventory.toml``, else ``~/.config/rbee/inventory.toml``.

    Never ``./inventory.toml``: an inventory picks the SSH targets rbee connects to with the
    operator's keys and the ``known_hosts`` that ``fleet trust`` appends to, and a cloned
    repository (this one ships an example) must not choose those by being the working
    directory. ``--inventory ./inventory.toml`` names it explicitly."""
    if env.get("RBEE_INVENTORY"):
        return Path(env["RBEE_INVENTORY"]).expanduser()
    config_home = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    for candidate in (rbee_home(env) / "inventory.toml", config_home / "rbee" / "inventory.toml"):
        if candidate.is_file():
            return candidate
    return None


def ignored_here(cwd: Path | None = None) -> Path | None:
    """``./inventory.toml`` when there is one: rbee names it in its hint, and does not read it."""
    here = (cwd or Path.cwd()) / "inventory.toml"
    return here if here.is_file() else None


def load(path: Path) -> Inventory:
    """Read and check ``path``. An inventory chooses the programs and SSH targets the queen runs
    with the operator's keys, so it must be the operator's own file, writable by nobody else."""
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read the inventory: {exc.strerror}") from exc
    if info.st_uid != os.getuid():
        raise InventoryError(f"{path} belongs to another user; rbee reads only an inventory its own user owns "
                             f"(copy it: cp {path} ~/.config/rbee/inventory.toml)")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InventoryError(f"{path} is writable by other users, who could make rbee run their programs; "
                             f"fix: chmod go-w {path}")
    return parse(text, str(path))


def parse(text: str, filename: str = "inventory.toml") -> Inventory:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{filename}: not valid TOML: {exc}") from exc
    try:
        return Inventory.model_validate({**data, "path": filename})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown key {loc[-1]!r}"
            if not loc and message.startswith("hive."):  # from the model validator
                loc_text, message = message.split(": ", 1)
                loc = loc_text.split(".")
            line = locate(text, loc)
            problems.append(f"{filename}:{line}: {'.'.join(loc) or 'file'}: {message}")
        raise InventoryError("\n".join(problems)) from exc


def locate(text: str, loc: list[str]) -> int:
    """The line of the key at ``loc`` (e.g. ["hive", "1", "ssh"]), best effort: tomllib keeps no positions."""
    lines = text.splitlines()
    start, end = 0, len(lines)
    if loc and loc[0] in ("hive", "queen", "ssh", "models"):
        section = loc[0]
        if section == "hive" and len(loc) > 1 and loc[1].isdigit():
            headers = [i for i, line in enumerate(lines) if re.match(r"^\s*\[\[\s*hive\s*\]\]", line)]
            index = int(loc[1])
            if index < len(headers):
                start = headers[index]
                end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
            key = loc[2] if len(loc) > 2 else None
        elif section == "models" and len(loc) > 1:
            name = re.escape(loc[1])
            header = next((i for i, line in enumerate(lines)
                           if re.match(rf"^\s*\[\s*models\.\"?{name}\"?\s*\]", line)), None)
            if header is not None:
                start = header
                end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
            key = loc[2] if len(loc) > 2 else None
        else:
            header = next((i for i, line in enumerate(lines) if re.match(rf"^\s*\[\s*{section}\s*\]", line)), None)
            if header is not None:
                start = header
                end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
            key = loc[1] if len(loc) > 1 else None
    else:
        key = loc[0] if loc else None
    if key is not None:
        for i in range(start, end):
            if re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", lines[i]):
                return i + 1
    return start + 1
