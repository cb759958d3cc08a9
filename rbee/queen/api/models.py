"""Which model names the fleet answers to: ``name`` anywhere, or ``node/name`` pinned to a host,
filtered by the caller's client key; and what the hives' catalogs say of each (size, digest,
family), for the dialects that list more than names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rbee.link.schemas import CatalogModel
from rbee.queen.api.errors import ApiError
from rbee.queen.keys import ClientKey


@dataclass(frozen=True)
class Listed:
    """One id a client may name: ``name``, or ``node/name``; ``entry`` is the catalog's file for
    it on ``node`` when the hive reported one (a logical model or alias not yet pulled has none)."""

    id: str
    name: str
    node: str
    entry: CatalogModel | None


class ModelIndex:
    def __init__(self, nodes: Callable[[], dict[str, list[str]]],
                 client: Callable[[], ClientKey | None] = lambda: None,
                 catalogs: Callable[[], dict[str, list[CatalogModel]]] = dict) -> None:
        self.nodes = nodes  # node -> model names it can serve
        self.client = client  # the request's client key (None: the owner's), whose models are listed
        self.catalogs = catalogs  # node -> its catalog, from its last heartbeat

    def listed(self) -> Iterator[Listed]:
        """Each name once (from the first node that serves it), then each ``node/name``."""
        seen: set[str] = set()
        key = self.client()
        catalogs = self.catalogs()
        for node, models in self.nodes().items():
            files = {entry.name: entry for entry in catalogs.get(node, [])}
            for name in models:
                if key is not None and key.models and name not in key.models:
                    continue
                if name not in seen:
                    seen.add(name)
                    yield Listed(name, name, node, files.get(name))
                yield Listed(f"{node}/{name}", name, node, files.get(name))

    def listing(self) -> list[dict[str, object]]:
        """OpenAI's ``/v1/models`` data."""
        return [{"id": m.id, "object": "model", "created": 0, "owned_by": m.node} for m in self.listed()]

    def resolve(self, model_id: str) -> tuple[str | None, str]:
        """(node or None for any, model name) of an id; a 404 ``model_not_found`` naming the known ids."""
        nodes = self.nodes()
        node, _, name = model_id.partition("/")
        if name and node in nodes:
            if name in nodes[node] or name.startswith(("file:", "hf:")):
                return node, name
        elif any(model_id in models for models in nodes.values()) or model_id.startswith(("file:", "hf:")):
            return None, model_id
        known = ", ".join(sorted({m.id for m in self.listed()}))
        raise ApiError(404, f"the model {model_id!r} does not exist here; known models: {known}",
                       param="model", code="model_not_found")
