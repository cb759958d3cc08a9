"""What every keeper command shares: settings read once, and errors turned into exit codes."""

from __future__ import annotations

import asyncio
import functools
import os
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rbee import inventory
from rbee.config import heartbeat_interval, queen_url, rbee_home
from rbee.errors import RbeeError
from rbee.keeper.render import remote
from rbee.keeper.session import QueenHandle, queen_answers, queen_session
from rbee.link.auth import load_token
from rbee.link.client import LinkClient
from rbee.link.schemas import HiveView, parse_wire

err = Console(stderr=True, highlight=False, soft_wrap=True)

QueenUrl = Annotated[
    str | None, typer.Option("--queen-url", help="Queen to use [default: $RBEE_QUEEN_URL or http://127.0.0.1:7833]")
]
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Model reference [default: gemma3-270m]")]
NodeOption = Annotated[str | None, typer.Option(
    "--node", "-n", help="Hive to run on; a,b splits the model across those hives, the first running the main "
                         "worker [default: the scheduler's choice]")]
KeepAlive = Annotated[str | None, typer.Option(help="How long the model stays loaded once idle: 30s, 5m, 1h; "
                                                    "0 unloads after, -1 keeps [default: the hive's].")]
InventoryPath = Annotated[
    Path | None,
    typer.Option("--inventory", "-i", help="Inventory file [default: $RBEE_INVENTORY, RBEE_HOME/inventory.toml, "
                 "~/.config/rbee/inventory.toml; never ./inventory.toml unless named]"),
]


@dataclass(frozen=True)
class Settings:
    """What a command needs, read once from flags and the environment."""

    queen_url: str
    home: Path
    heartbeat_interval: float
    inventory_path: Path | None

    @functools.cached_property
    def token(self) -> str:
        """The secret (never printed), read when a command first talks to a queen: a command
        that fails before, e.g. on a bad inventory, leaves RBEE_HOME untouched."""
        return load_token(home=self.home)

    @classmethod
    def load(cls, url: str | None, inventory_path: Path | None = None) -> Settings:
        """Flags beat the environment, which beats the inventory's ``[queen]`` table."""
        path = inventory_path or inventory.default_path()
        queen = _queen_section(path)
        if url is None and "RBEE_QUEEN_URL" not in os.environ and queen is not None:
            url = f"http://127.0.0.1:{queen.port}"
        interval = heartbeat_interval()
        if "RBEE_HEARTBEAT_INTERVAL" not in os.environ and queen is not None:
            interval = queen.heartbeat_interval
        return cls(url or queen_url(), rbee_home(), interval, path.resolve() if path else None)

    def client(self, url: str, stall_timeout: float | None = 300.0) -> LinkClient:
        return LinkClient(url, "queen", stall_timeout=stall_timeout, token=self.token)

    def session(self) -> AbstractAsyncContextManager[QueenHandle]:
        """The queen to talk to: the running one, or an ephemeral one for this command."""
        return queen_session(self.queen_url, self.home, self.heartbeat_interval, self.inventory_path, self.token)

    def inventory(self) -> inventory.Inventory:
        """The validated inventory (errors name file:line:key), or the local-only default."""
        if self.inventory_path is None:
            return inventory.Inventory.local_only()
        return inventory.load(self.inventory_path)


async def running_hives(settings: Settings, fix: str) -> list[HiveView]:
    """The hives the running queen knows; without a queen, say so with ``fix`` and exit 1."""
    if not await queen_answers(settings.queen_url, token=settings.token):
        err.print(f"no queen answers at {settings.queen_url}; {fix}")
        raise typer.Exit(1)
    async with settings.client(settings.queen_url) as client:
        body = await client.request_json("GET", "/v1/hives")
    return [parse_wire(HiveView, row, "hive row from the queen") for row in body["hives"]]


def run(coro: Any) -> Any:
    """Run a command's coroutine; operator errors become a message and exit code 2."""
    return run_sync(asyncio.run, coro)


def run_sync(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: the job was cancelled")
        raise typer.Exit(130) from None
    except RbeeError as exc:
        err.print(f"[bold red]error[/] ({remote(exc.code)}): {remote(exc.message)}")
        raise typer.Exit(2) from None


def _queen_section(path: Path | None) -> inventory.QueenSection | None:
    """The inventory's ``[queen]`` table, or None without an inventory. A bad inventory is
    reported by the command that reads it whole, not here."""
    if path is None:
        return None
    try:
        return inventory.load(path).queen
    except RbeeError:
        return None
