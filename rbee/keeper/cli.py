"""The `rbee` command. Parses flags into typed settings and hands them on; nothing
from typer goes further than the keeper."""

from __future__ import annotations

import json
import math
import os
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rbee import __version__
from rbee.config import DEFAULT_MODEL
from rbee.keeper.chat import HELP, Conversation, chat
from rbee.keeper.common import (
    InventoryPath,
    KeepAlive,
    ModelOption,
    NodeOption,
    QueenUrl,
    Settings,
    err,
    run,
    run_sync,
    running_hives,
)
from rbee.keeper.fleet_cli import fleet_app
from rbee.keeper.keys_cli import keys_app
from rbee.keeper.models_cli import models_app, workers_app
from rbee.keeper.render import JobPrinter, remote_row
from rbee.keeper.session import start_persistent, stop_persistent
from rbee.link import events
from rbee.link.events import Event
from rbee.link.schemas import parse_job_request

app = typer.Typer(
    help="rbee: the machines you own as one LLM inference fleet.", no_args_is_help=True, add_completion=False
)
queen_app = typer.Typer(help="Run the queen (the orchestrator) by hand.", no_args_is_help=True)
app.add_typer(queen_app, name="queen")
app.add_typer(fleet_app, name="fleet")
app.add_typer(models_app, name="models")
app.add_typer(workers_app, name="workers")
app.add_typer(keys_app, name="keys")


@app.command()
def infer(
    prompt: Annotated[str, typer.Argument(help="The prompt to complete.")],
    model: ModelOption = None,
    node: NodeOption = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the K likeliest tokens; 0 is all [default: 40].")
                     ] = None,
    min_p: Annotated[float | None, typer.Option(help="Drop tokens below this share of the likeliest one "
                                                     "[default: 0.05].")] = None,
    repeat_penalty: Annotated[float | None, typer.Option(help="Penalise repeated tokens; 1 is none.")] = None,
    presence_penalty: Annotated[float | None, typer.Option(help="-2 to 2: penalise tokens already present.")
                                ] = None,
    frequency_penalty: Annotated[float | None, typer.Option(help="-2 to 2: penalise tokens by their count.")
                                 ] = None,
    logit_bias: Annotated[list[str] | None, typer.Option(help="TOKEN_ID=BIAS, -100 (ban) to 100 (repeatable).")
                          ] = None,
    logprobs: Annotated[int | None, typer.Option(help="Show each token's log-probability and this many likeliest "
                                                      "alternatives (0-20) after the answer.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop sequence (repeatable).")] = None,
    backend: Annotated[str, typer.Option(help="Engine: auto, mlx or llama-cpp.")] = "auto",
    ctx: Annotated[int | None, typer.Option(help="Context length in tokens [default: the model's trained length, "
                                                 "as far as memory allows].")] = None,
    gpu_layers: Annotated[int | None, typer.Option(help="Layers llama.cpp offloads to the GPU: -1 all, 0 none, N "
                                                        "[default: all where the build supports it].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No narration, only tokens and errors.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="Print control characters of the answer as they are "
                                                    "(on a terminal they are shown escaped).")] = False,
    no_template: Annotated[bool, typer.Option("--no-template", help="Send the prompt as a plain completion, "
                                              "even to a model with a chat template.")] = False,
    keep_alive: KeepAlive = None,
    url: QueenUrl = None,
    inventory_path: InventoryPath = None,
) -> None:
    """Stream an answer: tokens on stdout, narration on stderr. A model with a chat template
    gets the prompt as one user turn through it; a base model gets it as a plain completion."""
    fields = {
        "prompt": prompt, "model": model, "node": node, "max_tokens": max_tokens,
        "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop or [],
        "backend": None if backend == "auto" else backend, "ctx": ctx, "gpu_layers": gpu_layers,
        "template": None if no_template else "auto", "top_k": top_k, "min_p": min_p,
        "repeat_penalty": repeat_penalty, "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty, "keep_alive": keep_alive, "logprobs": logprobs,
        "logit_bias": _biases(logit_bias or []),
    }
    request = run_sync(parse_job_request, {key: value for key, value in fields.items() if value is not None})
    settings = _settings(url, inventory_path)
    printer = JobPrinter(quiet=quiet, raw=raw)
    run(_run_job(settings, request.downstream(), printer))
    if not printer.succeeded:
        raise typer.Exit(1)


@app.command()
def embed(
    texts: Annotated[list[str], typer.Argument(help="The texts to embed.")],
    model: ModelOption = None,
    node: NodeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the vectors as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No narration, only results and errors.")] = False,
    url: QueenUrl = None,
    inventory_path: InventoryPath = None,
) -> None:
    """Embed texts with a worker loaded for embeddings: each vector's dimension and norm, or
    the vectors as JSON (--json). Vectors are L2-normalised, as OpenAI's are."""
    fields = {"input": texts, "model": model, "node": node}
    request = run_sync(parse_job_request, {key: value for key, value in fields.items() if value is not None})
    settings = _settings(url, inventory_path)
    printer = JobPrinter(quiet=quiet, expect_tokens=False)
    found: dict[int, list[float]] = {}

    def keep(event: Event) -> None:
        if event.type == events.EMBEDDING:
            found[int(event["index"])] = event["embedding"]

    run(_run_job(settings, request.downstream(), printer, keep))
    vectors = [found[index] for index in sorted(found)]
    if not printer.succeeded:
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps({"model": model or DEFAULT_MODEL, "data": [
            {"index": index, "text": text, "embedding": vector} for index, (text, vector) in enumerate(
                zip(texts, vectors, strict=True))]}))
        return
    for index, vector in enumerate(vectors):
        typer.echo(f"{index}: {len(vector)} dimensions, norm {math.sqrt(sum(v * v for v in vector)):.4f}, "
                   f"[{', '.join(f'{v:.4f}' for v in vector[:4])}, …]")


@app.command("chat")
def chat_command(
    model: ModelOption = None,
    node: NodeOption = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system message that leads the "
                                                                        "conversation.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 512,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.8,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Narration for every answer, not only "
                                                                   "the first.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="Print control characters of answers as they are.")] = False,
    keep_alive: KeepAlive = None,
    url: QueenUrl = None,
    inventory_path: InventoryPath = None,
) -> None:
    """Talk with a model, turn by turn, in its own chat template. /reset forgets the conversation,
    /exit ends it (or Ctrl+D); Ctrl+C stops the answer being written."""
    fields = {"model": model, "node": node, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
              "keep_alive": keep_alive}
    run_sync(parse_job_request, {**fields, "prompt": "-"})  # bad flags stop here, before anything starts
    settings = _settings(url, inventory_path)
    answers = 0

    def printer() -> JobPrinter:
        nonlocal answers
        answers += 1
        return JobPrinter(quiet=answers > 1 and not verbose, raw=raw)

    if not run(_chat(settings, {k: v for k, v in fields.items() if v is not None}, Conversation(system), printer)):
        raise typer.Exit(1)


async def _chat(settings: Settings, fields: dict[str, Any], conversation: Conversation,
                printer: Callable[[], JobPrinter]) -> bool:
    async with settings.session() as queen:
        if queen.child is not None:
            err.print(f"[dim]keeper[/dim] started an ephemeral queen at {queen.url}; it stops with this chat")
        err.print(f"[dim]{HELP}[/dim]")
        async with settings.client(queen.url, stall_timeout=None) as client:
            return await chat(client, fields, conversation, printer, err)


def _biases(pairs: list[str]) -> dict[str, float] | None:
    biases = {}
    for pair in pairs:
        token, _, bias = pair.partition("=")
        try:
            biases[str(int(token))] = float(bias)
        except ValueError:
            raise typer.BadParameter(f"{pair!r}: give TOKEN_ID=BIAS, e.g. 1234=-100", param_hint="--logit-bias"
                                     ) from None
    return biases or None


def _settings(url: str | None, inventory_path: Path | None) -> Settings:
    settings: Settings = run_sync(Settings.load, url, inventory_path)
    if settings.inventory_path is not None:
        run_sync(settings.inventory)  # a broken inventory stops here, before anything starts
    return settings


async def _run_job(settings: Settings, body: dict[str, Any], printer: JobPrinter,
                   on_event: Callable[[Event], None] | None = None) -> None:
    """One job through the queen (an ephemeral one if none runs), shown as it streams."""
    async with settings.session() as queen:
        if queen.child is not None and not printer.quiet:
            err.print(f"[dim]keeper[/dim] started an ephemeral queen at {queen.url}")
        async with settings.client(queen.url, stall_timeout=None) as client:
            async for event in client.run(body):
                if on_event is not None:
                    on_event(event)
                printer.show(event)


@queen_app.command("start")
def queen_start(url: QueenUrl = None, inventory_path: InventoryPath = None) -> None:
    """Start a persistent queen that stays after this command."""
    settings = run_sync(Settings.load, url, inventory_path)
    run_sync(settings.inventory)
    child = run(start_persistent(settings.queen_url, settings.home, settings.heartbeat_interval,
                                 settings.inventory_path, settings.token))
    if child is None:
        err.print(f"a queen already answers at {settings.queen_url}")
    else:
        err.print(f"queen started at {child.url} (pid {child.pid}); logs: {child.log_path}")


@queen_app.command("stop")
def queen_stop(url: QueenUrl = None) -> None:
    """Stop the queen, and the hives it started on this machine."""
    settings = run_sync(Settings.load, url)
    if run(stop_persistent(settings.queen_url, token=settings.token)):
        err.print(f"queen at {settings.queen_url} stopped")
    else:
        err.print(f"no queen answers at {settings.queen_url}")


@queen_app.command("key")
def queen_key() -> None:
    """Print the owner's secret: the CLI's key, which opens the whole fleet. Keep it private;
    give clients a scoped key instead (`rbee keys add NAME`)."""
    settings = run_sync(Settings.load, None)
    typer.echo(settings.token)


@queen_app.command("status")
def queen_status(url: QueenUrl = None) -> None:
    """Show whether the queen runs and the hives it knows."""
    settings = run_sync(Settings.load, url)
    run(_queen_status(settings))


async def _queen_status(settings: Settings) -> None:
    hives = await running_hives(settings, "start one with `rbee queen start`")
    table = Table("hive", "state", "reason", "workers", title=f"queen at {settings.queen_url}")
    for hive in hives:
        workers = ", ".join(f"{w.worker_id} ({w.state})" for w in hive.workers) or "-"
        remote_row(table, hive.name, hive.state, hive.reason, workers)
    Console().print(table)


@app.command()
def dashboard(
    url: QueenUrl = None,
    inventory_path: InventoryPath = None,
    no_open: Annotated[bool, typer.Option("--no-open", help="Print the login URL only; open no browser")] = False,
) -> None:
    """Open the live fleet dashboard: starts a persistent queen if none runs, prints a login URL
    that works once for five minutes (the last line of stdout), and opens it in your browser."""
    settings = run_sync(Settings.load, url, inventory_path)
    run_sync(settings.inventory)
    login_url = run(_dashboard_login(settings))
    if not no_open and not webbrowser.open(login_url):
        err.print("no browser could be opened here; open the URL above on this machine (or through an SSH "
                  "forward: see docs/operations.md)")
    typer.echo(login_url)


async def _dashboard_login(settings: Settings) -> str:
    child = await start_persistent(settings.queen_url, settings.home, settings.heartbeat_interval,
                                   settings.inventory_path, settings.token)
    if child is not None:
        err.print(f"queen started at {child.url} (pid {child.pid}); `rbee queen stop` stops it")
    async with settings.client(settings.queen_url) as client:
        login = await client.request_json("POST", "/v1/dashboard/logins")
    err.print(f"dashboard login, valid once for {login['expires_in'] // 60} minutes:")
    return f"{settings.queen_url}{login['path']}#login={login['token']}"


@app.command()
def version() -> None:
    """Print rbee's version."""
    typer.echo(__version__)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
