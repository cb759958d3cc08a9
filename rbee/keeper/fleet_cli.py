"""`rbee fleet …`: the hosts of inventory.toml as one fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rbee import inventory
from rbee.keeper.common import InventoryPath, QueenUrl, Settings, err, run, run_sync, running_hives
from rbee.keeper.models_cli import offload_text
from rbee.keeper.render import JobPrinter, remote, remote_row
from rbee.keeper.session import queen_answers, start_persistent

fleet_app = typer.Typer(help="Manage the hosts listed in inventory.toml.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)


def _settings(url: str | None, inventory_path: Path | None) -> Settings:
    settings: Settings = run_sync(Settings.load, url, inventory_path)
    if settings.inventory_path is None:
        here = inventory.ignored_here()
        hint = (f" ({remote(here)} is not read unless named: a cloned repository's file must not pick your SSH "
                f"targets; pass --inventory {remote(here)})" if here else "")
        err.print("[bold red]error[/]: no inventory: pass --inventory PATH, set RBEE_INVENTORY, or write "
                  f"RBEE_HOME/inventory.toml or ~/.config/rbee/inventory.toml{hint}")
        raise typer.Exit(2)
    run_sync(settings.inventory)  # file:line errors, and nothing started
    err.print(f"[dim]inventory: {remote(settings.inventory_path)}[/dim]")
    return settings


@fleet_app.command("up")
def fleet_up(url: QueenUrl = None, inventory_path: InventoryPath = None) -> None:
    """Install and start every hive of the inventory; stop hives no longer listed.

    Starts a persistent queen when none runs (the fleet's tunnels live in it)."""
    settings = _settings(url, inventory_path)
    if not run(_fleet_job(settings, "up", start_queen=True)):
        raise typer.Exit(1)


@fleet_app.command("down")
def fleet_down(url: QueenUrl = None, inventory_path: InventoryPath = None) -> None:
    """Stop every hive the fleet started (their workers stop with them)."""
    settings = _settings(url, inventory_path)
    if not run(_fleet_job(settings, "down", start_queen=False)):
        raise typer.Exit(1)


async def _fleet_job(settings: Settings, action: str, start_queen: bool) -> bool:
    if not await queen_answers(settings.queen_url, token=settings.token):
        if not start_queen:
            err.print(f"no queen answers at {settings.queen_url}: nothing to stop through it")
            return await _fleet_job_ephemeral(settings, action)
        child = await start_persistent(
            settings.queen_url, settings.home, settings.heartbeat_interval, settings.inventory_path, settings.token
        )
        if child is not None:
            err.print(f"[dim]keeper[/dim] started a persistent queen at {child.url} (stop: `rbee queen stop`)")
    return await _stream_fleet_job(settings.queen_url, settings, action)


async def _fleet_job_ephemeral(settings: Settings, action: str) -> bool:
    async with settings.session() as queen:
        return await _stream_fleet_job(queen.url, settings, action)


async def _stream_fleet_job(url: str, settings: Settings, action: str) -> bool:
    printer = JobPrinter(expect_tokens=False)
    report: list[dict[str, Any]] = []
    async with settings.client(url, stall_timeout=None) as client:
        body = {"action": action, "inventory": str(settings.inventory_path)}
        async for event in client.run(body, path="/v1/fleet/jobs"):
            if event.type == "narration" and event["action"] == "report":
                report = event["report"]
                continue
            printer.show(event)
    if report:
        table = Table("hive", "action", "reason", title=f"fleet {action}")
        for row in report:
            remote_row(table, row["name"], row["action"], row.get("reason", ""))
        out.print(table)
    return printer.succeeded and not any(row["action"] == "failed" for row in report)


@fleet_app.command("plan")
def fleet_plan(url: QueenUrl = None, inventory_path: InventoryPath = None) -> None:
    """Show what `fleet up` would do on each host (install, upgrade, start, nothing, stop), doing nothing."""
    settings = _settings(url, inventory_path)
    result = run(_plan(settings))
    table = Table("hive", "would", "because", "install path", "CPU and engine variant", title="fleet plan")
    for step in result["plan"]:
        remote_row(table, step["name"], step["action"], step["reason"], step.get("path") or "-", step.get("cpu") or "-")
    out.print(table)
    if result.get("models"):
        models = Table("model", "where it fits now", title="models on the fleet as it runs")
        for row in result["models"]:
            models.add_row(escape(row["model"]), escape(row["placement"]) if row["fits"]
                           else f"[red]{escape(row['placement'])}[/red]")
        out.print(models)


async def _plan(settings: Settings) -> dict[str, Any]:
    async with settings.session() as queen, settings.client(queen.url) as client:
        return dict(await client.request_json("POST", "/v1/fleet/plan", {"inventory": str(settings.inventory_path)}))


@fleet_app.command("status")
def fleet_status(url: QueenUrl = None, inventory_path: InventoryPath = None) -> None:
    """Every hive: up/down (and why), last heartbeat, devices, workers, version."""
    settings = run_sync(Settings.load, url, inventory_path)
    hives = run(running_hives(settings, "the fleet is not running (`rbee fleet up`)"))
    table = Table("hive", "state", "reason", "heartbeat", "version", "devices", "engine", "workers",
                  title="fleet status")
    for hive in hives:
        age = hive.heartbeat_age_s
        remote_row(
            table, hive.name, hive.state, hive.reason, "-" if age is None else f"{age:.1f} s ago",
            hive.version or "-", describe_devices(hive.devices), hive.engine or "-",
            "; ".join([
                *(f"{w.worker_id} {w.state} {Path(w.model_path).name} on {w.backend}"
                  + (f", {w.split_role}" if w.split_role else "")
                  + (f", {w.engine.get('device', '?')} {offload_text(w.engine)}" if w.engine else "")
                  + (f" ({w.engine_reason})" if w.engine_reason else "")
                  for w in hive.workers),
                *(f"share {s.share_id} {s.state}: {s.bytes / 1e6:.0f} MB of {s.model} (RPC, for a split)"
                  for s in hive.shares),
            ]) or "-",
        )
    out.print(table)


def describe_devices(devices: dict[str, Any]) -> str:
    if not devices:
        return "-"
    cpu = devices.get("cpu", {})
    parts = [f"{cpu.get('cores', '?')} cores, {cpu.get('ram_total', 0) / 2**30:.0f} GiB RAM"]
    for gpu in devices.get("gpus", []):
        parts.append(f"{gpu.get('name', 'gpu')} {gpu.get('memory_free', 0) / 2**30:.1f}/"
                     f"{gpu.get('memory_total', 0) / 2**30:.1f} GiB free")
    return "; ".join(parts)


@fleet_app.command("logs")
def fleet_logs(
    name: Annotated[str, typer.Argument(help="Hive name")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines")] = 50,
    url: QueenUrl = None, inventory_path: InventoryPath = None,
) -> None:
    """Print the end of a hive's log (RBEE_HOME/logs/hive.log on its host)."""
    settings = _settings(url, inventory_path)
    for line in run(_logs(settings, name, lines)):
        out.print(remote(line))


async def _logs(settings: Settings, name: str, lines: int) -> list[str]:
    async with settings.session() as queen, settings.client(queen.url) as client:
        result = await client.request_json("GET", f"/v1/fleet/logs/{name}?lines={lines}")
    return list(result["lines"])


@fleet_app.command("trust")
def fleet_trust(
    name: Annotated[str, typer.Argument(help="Hive name")], inventory_path: InventoryPath = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Trust without asking (check the fingerprint first!)")]
    = False,
) -> None:
    """Show a host's SSH key fingerprint and, once you confirm, record it in known_hosts.
    Refuses a changed key."""
    from rbee.keeper.trust import trust

    def confirm(host: str, fingerprint: str) -> bool:
        err.print(f"{host} offers the host key {fingerprint}")
        return yes or typer.confirm("Is that the host's key (compare it on the host: ssh-keygen -lf "
                                    "/etc/ssh/ssh_host_*_key.pub)? Trust it", default=False, err=True)

    settings = _settings(None, inventory_path)
    fingerprint, path = run(trust(settings.inventory(), name, confirm))
    err.print(f"trusted hive {name!r}: {fingerprint} recorded in {path}")


