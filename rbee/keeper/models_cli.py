"""`rbee models …` and `rbee workers …`: what each host has on disk and in memory."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rbee.keeper.common import InventoryPath, QueenUrl, Settings, err, run, run_sync
from rbee.keeper.render import JobPrinter, remote_row
from rbee.link.schemas import FleetShare, FleetWorker, parse_wire

models_app = typer.Typer(help="Models in each hive's catalog.", no_args_is_help=True)
workers_app = typer.Typer(help="Workers: one process per loaded model.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)
Node = Annotated[str | None, typer.Option("--node", "-n", help="Hive name [default: every hive that is up]")]
OneNode = Annotated[str, typer.Option("--node", "-n", help="Hive name")]


async def _call(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    async with settings.session() as queen, settings.client(queen.url) as client:
        return await client.request_json(method, path, body)


@models_app.command("list")
def models_list(node: Node = None, url: QueenUrl = None, inventory_path: InventoryPath = None) -> None:
    """Name, size, format, quantization and path of every model on each host."""
    settings = run_sync(Settings.load, url, inventory_path)
    result = run(_call(settings, "GET", "/v1/catalog" + (f"?node={node}" if node else "")))
    table = Table("hive", "name", "size", "format", "quant", "params", "path", title="models")
    for hive, models in result["nodes"].items():
        for m in models:
            remote_row(table, hive, m["name"], f"{m['size'] / 1e6:.0f} MB", m["format"], m["quantization"],
                          f"{m['parameters'] / 1e6:.0f} M", m["path"])
    out.print(table)


@models_app.command("pull")
def models_pull(
    ref: Annotated[str, typer.Argument(help="hf:org/repo[:file.gguf] or gemma3-270m")],
    node: OneNode = "localhost", url: QueenUrl = None, inventory_path: InventoryPath = None,
) -> None:
    """Download a model into a hive's catalog, with progress."""
    settings = run_sync(Settings.load, url, inventory_path)
    printer = JobPrinter(expect_tokens=False)
    run(_pull(settings, ref, node, printer))
    if not printer.succeeded:
        raise typer.Exit(1)


async def _pull(settings: Settings, ref: str, node: str, printer: JobPrinter) -> None:
    async with settings.session() as queen, settings.client(queen.url, stall_timeout=None) as c:
        async for event in c.run({"ref": ref, "node": node}, path="/v1/catalog/jobs"):
            printer.show(event)


@models_app.command("rm")
def models_rm(
    name: Annotated[str, typer.Argument(help="Catalog name (see `rbee models list`)")],
    node: OneNode = "localhost", url: QueenUrl = None, inventory_path: InventoryPath = None,
) -> None:
    """Remove a model from a hive (its workers are stopped first)."""
    settings = run_sync(Settings.load, url, inventory_path)
    result = run(_call(settings, "DELETE", f"/v1/catalog/{node}/{name}"))
    err.print(f"removed {result['removed']['name']} ({result['removed']['path']}) from hive:{node}")


@workers_app.command("list")
def workers_list(url: QueenUrl = None, inventory_path: InventoryPath = None) -> None:
    """Every worker of every live hive (state, role, model, memory, idle time), and the shares of
    split models the hives serve."""
    settings = run_sync(Settings.load, url, inventory_path)
    result = run(_call(settings, "GET", "/v1/workers"))
    table = Table("hive", "worker", "state", "reason", "backend", "model", "device", "offload", "ctx", "memory",
                  "idle", title="workers")
    for row in result["workers"]:
        w = parse_wire(FleetWorker, row, "worker row from the queen")
        engine = w.engine
        # a split's part says its role in the worker's cell: a column more squeezes every row on 80 columns
        name = f"{w.worker_id} ({w.split_role})" if w.split_role else w.worker_id
        remote_row(table, w.node, name, w.state, w.reason, w.backend, w.model_path.rsplit("/", 1)[-1],
                   device_text(engine, w.placement), offload_text(engine), str(w.n_ctx or "-"),
                   memory_text(w.memory, engine), f"{w.idle_s:.0f} s")
    for row in result.get("shares", []):
        s = parse_wire(FleetShare, row, "share row from the queen")
        remote_row(table, s.node, f"share {s.share_id} (split helper)", s.state, "", "llama.cpp RPC", s.model, "-",
                   "-", "-", f"{s.bytes / 1e6:.0f} MB", "-")
    out.print(table)


@workers_app.command("stop")
def workers_stop(
    worker_id: Annotated[str, typer.Argument(help="Worker id, e.g. w-3f9c2a")],
    node: OneNode = "localhost", url: QueenUrl = None, inventory_path: InventoryPath = None,
) -> None:
    """Stop one worker; its model is freed."""
    settings = run_sync(Settings.load, url, inventory_path)
    run(_call(settings, "POST", f"/v1/workers/{node}/{worker_id}/stop"))
    err.print(f"stopped worker {worker_id} on hive:{node}")


def device_text(engine: dict[str, Any], placement: str) -> str:
    """Where the engine put the model, and which of llama.cpp's CPU kernels it runs (a portable build)."""
    device = engine.get("device") or placement or "-"
    return f"{device}, {engine['cpu_variant']} CPU kernels" if engine.get("cpu_variant") else device


def offload_text(engine: dict[str, Any]) -> str:
    """``19/19 layers`` as the engine reported it; ``-`` before its first report."""
    if "layers_total" not in engine:
        return "-"
    return f"{engine['layers_offloaded']}/{engine['layers_total']} layers"


def memory_text(reserved: int, engine: dict[str, Any]) -> str:
    """Device memory the engine says it took (weights + KV cache), else what admission reserved."""
    on_device = int(engine.get("weights_on_device", 0)) + int(engine.get("kv_on_device", 0))
    if on_device:
        return f"{on_device / 1e6:.0f} MB VRAM"
    in_ram = int(engine.get("weights_in_ram", 0)) + int(engine.get("kv_in_ram", 0))
    return f"{(in_ram or reserved) / 1e6:.0f} MB RAM"
