"""`rbee keys …`: scoped keys for clients (apps, web UIs, editor plugins), so the owner's key
stays with the CLI. They live in RBEE_HOME/keys.json, which a running queen re-reads on
change: no queen is needed to add or revoke one, and a revoke takes effect at once."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rbee.config import rbee_home
from rbee.keeper.common import err, run_sync
from rbee.queen.keys import KeyStore

keys_app = typer.Typer(help="Scoped keys for OpenAI/Ollama clients (inference only).", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)


def _store() -> KeyStore:
    return KeyStore(rbee_home())


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="What the key is for, e.g. open-webui")],
    models: Annotated[str, typer.Option("--models", "-m", help="Comma-separated model names it may use "
                                        "[default: every model]")] = "",
) -> None:
    """Make a key that may only run inference (on the models named). It is printed once, as the
    last line of stdout: OPENAI_API_KEY=$(rbee keys add my-app | tail -1)."""
    entry, secret = run_sync(_store().add, name, models.split(","))
    err.print(f"client key {entry.name!r} made: inference only, models: {', '.join(entry.models) or 'all'}. "
              "It is shown once; `rbee keys revoke` ends it.")
    typer.echo(secret)


@keys_app.command("list")
def keys_list() -> None:
    """Every client key: name, models, when it was made (the keys themselves are not stored)."""
    keys = run_sync(_store().keys)
    table = Table("name", "models", "created", title="client keys")
    for entry in keys:
        table.add_row(entry.name, ", ".join(entry.models) or "all",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created)))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name (`rbee keys list`)")]) -> None:
    """End a client key: the queen refuses it from its next request on."""
    entry = run_sync(_store().revoke, name)
    err.print(f"client key {entry.name!r} revoked")
