"""What clients ask of the fleet's models besides running them: what a model's file says of
itself, which models are loaded where, unloading and deleting by the names clients use
(a catalog name, a logical model, an alias, ``node/name``). Dialect-free: the Ollama routes
shape these answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rbee.config import DEFAULT_MODEL
from rbee.errors import ModelNotFoundError
from rbee.inventory import Inventory
from rbee.link.schemas import CatalogModel, WorkerView
from rbee.queen.scheduler import choose_hive, model_keys
from rbee.queen.service import Queen


def refs_of(inventory: Inventory, name: str) -> set[str]:
    """Every catalog key ``name`` stands for: itself, an alias's target, a logical model's forms."""
    target = inventory.resolve_alias(name) or name
    logical = inventory.models.get(target)
    return {name, target, *(logical.forms().values() if logical is not None else ())}


def serves(entry: CatalogModel, refs: set[str]) -> bool:
    return bool(model_keys(entry.name, entry.ref) & refs) or entry.path in {r.removeprefix("file:") for r in refs}


def display_name(inventory: Inventory, entry: CatalogModel) -> str:
    """The name a client knows a catalog entry by: the logical model it is a form of, else its own."""
    keys = model_keys(entry.name, entry.ref)
    return next((name for name, logical in inventory.models.items() if keys & set(logical.forms().values())),
                entry.name)


@dataclass(frozen=True)
class Loaded:
    node: str
    name: str
    worker: WorkerView
    entry: CatalogModel | None


class FleetModels:
    def __init__(self, queen: Queen) -> None:
        self.queen = queen

    async def show(self, node: str | None, name: str) -> dict[str, Any]:
        """The hive's own account of the file behind ``name`` (rbee.hive.service.Hive.show):
        on ``node``, else where the scheduler would run it."""
        inventory = self.queen.fleet.inventory
        target = inventory.resolve_alias(name) or name
        logical = inventory.models.get(target)
        body = {"model": None if target == DEFAULT_MODEL else target,
                "forms": logical.forms() if logical is not None else None}
        node = node or choose_hive(self.queen.views(), target)
        return dict(await self.queen.on_hive(node, "POST", "/v1/catalog/show", body))

    def loaded(self) -> Iterator[Loaded]:
        inventory = self.queen.fleet.inventory
        catalogs = self.queen.catalogs()
        for hive in self.queen.status():
            if hive.state not in ("up", "busy"):
                continue
            by_path = {entry.path: entry for entry in catalogs.get(hive.name, [])}
            for worker in hive.workers:
                if worker.state not in ("up", "busy", "starting"):
                    continue
                entry = by_path.get(worker.model_path)
                name = display_name(inventory, entry) if entry else worker.model_path
                yield Loaded(hive.name, name, worker, entry)

    def _matching(self, node: str | None, name: str) -> Iterator[Loaded]:
        refs = refs_of(self.queen.fleet.inventory, name)
        for loaded in self.loaded():
            if node in (None, loaded.node) and (loaded.name in refs or (loaded.entry and serves(loaded.entry, refs))
                                                 or loaded.worker.model_path in refs):
                yield loaded

    async def unload(self, node: str | None, name: str) -> int:
        """Stop every worker serving ``name`` (on ``node``, else anywhere); how many were stopped."""
        matching = list(self._matching(node, name))
        await asyncio.gather(*(self.queen.on_hive(m.node, "POST", f"/v1/workers/{m.worker.worker_id}/stop")
                               for m in matching))
        return len(matching)

    async def delete(self, node: str | None, name: str) -> list[str]:
        """Remove the catalog entries behind ``name`` (on ``node``, else on every hive holding one);
        the ``node/entry`` names removed. Its workers stop first (the hive does that)."""
        refs = refs_of(self.queen.fleet.inventory, name)
        targets = [(hive, entry.name) for hive, entries in self.queen.catalogs().items() if node in (None, hive)
                   for entry in entries if serves(entry, refs)]
        if not targets:
            raise ModelNotFoundError(f"model {name!r} is in no hive's catalog")
        await asyncio.gather(*(self.queen.on_hive(hive, "DELETE", f"/v1/catalog/{entry}") for hive, entry in targets))
        return [f"{hive}/{entry}" for hive, entry in targets]
