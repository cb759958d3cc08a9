"""The `rbee` command. Parses flags into typed settings and hands them on; nothing
from typer goes further than this module."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rbee import __version__
from rbee.config import heartbeat_interval, queen_url, rbee_home
from rbee.errors import RbeeError
from rbee.keeper.render import JobPrinter
from rbee.keeper.session import queen_answers, queen_session, start_persistent, stop_persistent
from rbee.link.client import LinkClient
from rbee.link.schemas import parse_job_request

app = typer.Typer(
    help="rbee: the machines you own as one LLM inference fleet.", no_args_is_help=True, add_completion=False
)
queen_app = typer.Typer(help="Run the queen (the orchestrator) by hand.", no_args_is_help=True)
app.add_typer(queen_app, name="queen")

err = Console(stderr=True, highlight=False, soft_wrap=True)

QueenUrl = Annotated[
    str | None, typer.Option("--queen-url", help="Queen to use [default: $RBEE_QUEEN_URL or http://127.0.0.1:7833]")
]


@dataclass(frozen=True)
class Settings:
    """What every command needs, read once from flags and the environment."""

    queen_url: str
    home: Path
    heartbeat_interval: float

    @classmethod
    def load(cls, url: str | None) -> Settings:
        return cls(url or queen_url(), rbee_home(), heartbeat_interval())


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
        err.print(f"[bold red]error[/] ({exc.code}): {escape(exc.message)}")
        raise typer.Exit(2) from None


@app.command()
def infer(
    prompt: Annotated[str, typer.Argument(help="The prompt to complete.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model reference [default: gemma3-270m]")] = None,
    node: Annotated[str | None, typer.Option("--node", "-n", help="Hive to run on [default: localhost]")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop sequence (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No narration, only tokens and errors.")] = False,
    url: QueenUrl = None,
) -> None:
    """Stream a completion: tokens on stdout, narration on stderr."""
    request = run_sync(
        parse_job_request,
        {
            "prompt": prompt, "model": model, "node": node, "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop or [],
        },
    )
    settings = run_sync(Settings.load, url)
    printer = JobPrinter(quiet=quiet)
    run(_infer(settings, request.downstream(), printer))
    if not printer.succeeded:
        raise typer.Exit(1)


async def _infer(settings: Settings, body: dict[str, Any], printer: JobPrinter) -> None:
    async with queen_session(settings.queen_url, settings.home, settings.heartbeat_interval) as queen:
        if queen.child is not None and not printer.quiet:
            err.print(f"[dim]keeper[/dim] started an ephemeral queen at {queen.url}")
        async with LinkClient(queen.url, "queen", stall_timeout=None) as client:
            async for event in client.run(body):
                printer.show(event)


@queen_app.command("start")
def queen_start(url: QueenUrl = None) -> None:
    """Start a persistent queen that stays after this command."""
    settings = run_sync(Settings.load, url)
    child = run(start_persistent(settings.queen_url, settings.home, settings.heartbeat_interval))
    if child is None:
        err.print(f"a queen already answers at {settings.queen_url}")
    else:
        err.print(f"queen started at {child.url} (pid {child.pid}); logs: {child.log_path}")


@queen_app.command("stop")
def queen_stop(url: QueenUrl = None) -> None:
    """Stop the queen, and the hives it started on this machine."""
    settings = run_sync(Settings.load, url)
    if run(stop_persistent(settings.queen_url)):
        err.print(f"queen at {settings.queen_url} stopped")
    else:
        err.print(f"no queen answers at {settings.queen_url}")


@queen_app.command("status")
def queen_status(url: QueenUrl = None) -> None:
    """Show whether the queen runs and the hives it knows."""
    settings = run_sync(Settings.load, url)
    run(_status(settings))


async def _status(settings: Settings) -> None:
    if not await queen_answers(settings.queen_url):
        err.print(f"no queen answers at {settings.queen_url}; start one with `rbee queen start`")
        raise typer.Exit(1)
    async with LinkClient(settings.queen_url, "queen") as client:
        hives = (await client.request_json("GET", "/v1/hives"))["hives"]
    table = Table("hive", "state", "reason", "heartbeat age", "workers", title=f"queen at {settings.queen_url}")
    for hive in hives:
        age = hive["heartbeat_age_s"]
        table.add_row(
            hive["name"], hive["state"], hive["reason"], "-" if age is None else f"{age:.1f} s",
            ", ".join(f"{w['worker_id']} ({w['state']})" for w in hive["workers"]) or "-",
        )
    Console().print(table)


@app.command()
def version() -> None:
    """Print rbee's version."""
    typer.echo(__version__)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
