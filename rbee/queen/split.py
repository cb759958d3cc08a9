"""When no hive holds a model alone: which hives hold it together, and how many of its layers
each one takes. Pure, table-tested; the figures come from the hives' heartbeats (the memory a new
worker may take there, within the host's `memory` cap) and the model's GGUF header as a hive that
has it reports it.

llama.cpp's RPC backend does the splitting (decision 85): the main worker keeps the token
embeddings, the output and the first layers; each helper's RPC server holds a run of layers and
their KV cache. So a share is counted in layers, each layer costing the same (its weights and its
KV cache for the context), plus the fixed part of the process that holds it.

The fewest hives that hold the model take part (every hive in the split is a round trip per
token), the one with the most room running the main worker; the layers are then dealt out in
proportion to each one's room, so all keep the same share of headroom.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rbee.engine.rpc import SPLIT_UBATCH
from rbee.engine.sizing import FALLBACK_CTX, MIN_AUTO_CTX, RUNTIME_OVERHEAD
from rbee.errors import NoCapacityError
from rbee.inventory import Inventory, LogicalModel
from rbee.link.schemas import CatalogModel
from rbee.queen.scheduler import HiveView, model_keys

#: an RPC server's own compute buffers and process, beyond the layers it holds
RPC_OVERHEAD = 48 * 1024 * 1024


def size_text(value: int) -> str:
    return f"{value / 1e9:.1f} GB" if value >= 10**10 else f"{value / 1e6:.0f} MB"


@dataclass(frozen=True)
class Room:
    """One hive as a split sees it: what a new worker may take there, or why it cannot take part."""

    name: str
    free: int
    excluded: str = ""  # why it takes no share ("mlx-lm only", "not running")


@dataclass(frozen=True)
class Shape:
    """What a model costs, from its GGUF header as a hive reports it."""

    name: str
    weights: int
    layers: int
    kv_per_token: int
    trained_ctx: int = 0
    output_bytes: int = 0
    vocab: int = 0

    @property
    def output_cost(self) -> int:
        """What the helper holding the output projection takes beyond its layers: the projection
        (a copy, where it is tied to the token embeddings the main worker keeps) and the logits'
        compute buffer, one row of the vocabulary per token of a micro-batch."""
        return self.output_bytes + self.vocab * SPLIT_UBATCH * 4

    def per_layer(self, n_ctx: int) -> int:
        """One layer's weights and KV cache (rounded up)."""
        return -(-(self.weights + self.kv_per_token * n_ctx) // max(self.layers, 1))

    def total(self, n_ctx: int) -> int:
        return self.weights + self.kv_per_token * n_ctx + RUNTIME_OVERHEAD


@dataclass(frozen=True)
class Share:
    hive: str
    role: str  # main | rpc
    layers: int
    bytes: int
    output: bool = False  # holds the output projection (the last device llama.cpp offloads to)

    def describe(self) -> str:
        extra = " and the output layer" if self.output else ""
        return f"{self.hive}: {self.layers} layers{extra}, {size_text(self.bytes)}"


@dataclass(frozen=True)
class Split:
    model: str
    n_ctx: int
    shares: tuple[Share, ...]
    why_ctx: str = ""

    @property
    def main(self) -> Share:
        return self.shares[0]

    @property
    def helpers(self) -> tuple[Share, ...]:
        return self.shares[1:]

    @property
    def split(self) -> bool:
        return len(self.shares) > 1

    def describe(self) -> str:
        """For the narration and `fleet plan`, hives named as in the inventory."""
        if not self.split:
            return f"on {self.main.hive} alone ({size_text(self.main.bytes)})"
        return "split across " + "; ".join(share.describe() for share in self.shares) + ", over RPC"


def plan_split(rooms: Sequence[Room], shape: Shape, *, requested_ctx: int | None = None,
               forced: Sequence[str] = ()) -> Split:
    """The hives that hold ``shape`` together, or NoCapacityError saying what each one lacked.

    ``forced``: the hives to split across, in order, the first running the main worker
    (``--node a,b`` or a logical model's ``split``). Without it the fewest hives that hold the
    model take part. An asked-for context is granted or refused; otherwise the trained length is
    halved while the fleet does not hold it, as for one host.
    """
    by_name = {room.name: room for room in rooms}
    unknown = [name for name in forced if name not in by_name]
    if unknown:
        raise NoCapacityError(f"cannot split {shape.name} across {', '.join(unknown)}: no such hive in the fleet. "
                              f"Hives: {', '.join(sorted(by_name)) or 'none'}")
    if shape.layers <= 0:
        raise NoCapacityError(f"cannot split {shape.name}: its file does not say how many layers it has, so rbee "
                              "cannot share them out. Use a model that fits on one host")
    pool = [by_name[name] for name in forced] if forced else sorted(
        (room for room in rooms if not room.excluded), key=lambda room: (-room.free, room.name))
    barred = [room for room in pool if room.excluded]
    if barred:
        raise NoCapacityError(f"cannot split {shape.name} across {', '.join(forced)}: "
                              + "; ".join(f"{room.name} cannot take part ({room.excluded})" for room in barred))
    if requested_ctx is not None:
        plan = _deal(pool, shape, requested_ctx, forced=bool(forced), why="asked for")
        if plan is None:
            raise NoCapacityError(_refusal(rooms, shape, requested_ctx))
        return plan
    trained = shape.trained_ctx if shape.trained_ctx > 0 else FALLBACK_CTX
    floor = min(MIN_AUTO_CTX, trained)
    n_ctx = trained
    while (plan := _deal(pool, shape, n_ctx, forced=bool(forced), why=(
            "the model's trained length" if n_ctx == trained
            else f"capped by the fleet's free memory; the model was trained for {trained}"))) is None:
        if n_ctx <= floor:
            raise NoCapacityError(_refusal(rooms, shape, floor))
        n_ctx = max(n_ctx // 2, floor)
    return plan


def _deal(pool: Sequence[Room], shape: Shape, n_ctx: int, *, forced: bool, why: str) -> Split | None:
    """The layers dealt out at this context, or None where the pool cannot hold them.

    The first hive runs the main worker; one helper holds the output projection and the logits'
    compute buffer with its layers (llama.cpp puts them with the last offloaded layer): the
    roomiest helper, or the last one named in a forced split."""
    per_layer = shape.per_layer(n_ctx)
    holder = len(pool) - 1 if forced else 1  # position, in ``chosen``, of the helper with the output
    chosen: list[tuple[Room, int]] = []
    for room in pool:
        position = len(chosen)
        fixed = RUNTIME_OVERHEAD if position == 0 else RPC_OVERHEAD + (shape.output_cost if position == holder else 0)
        capacity = max((room.free - fixed) // per_layer, 0)
        if capacity == 0 and not forced:
            continue  # a hive too small for any share takes none
        chosen.append((room, capacity))
        if not forced and sum(c for _, c in chosen) >= shape.layers:
            break
    total = sum(c for _, c in chosen)
    if total < shape.layers or (forced and any(c == 0 for _, c in chosen)):
        return None
    layers = [shape.layers * c // total for _, c in chosen]
    left = shape.layers - sum(layers)
    while left:  # the rounding's remainder, to those with room for it, the roomiest first
        for i, (_, capacity) in enumerate(chosen):
            if left and layers[i] < capacity:
                layers[i] += 1
                left -= 1
    for i, n in enumerate(layers):  # a hive the rounding left out gets one of the largest share's
        if n == 0 and (forced or i == holder):
            largest = layers.index(max(layers))
            layers[largest] -= 1
            layers[i] = 1
    shares = [Share(room.name, "main" if i == 0 else "rpc", n,
                    n * per_layer + (RUNTIME_OVERHEAD if i == 0 else RPC_OVERHEAD), output=i == holder)
              for i, ((room, _), n) in enumerate(zip(chosen, layers, strict=True)) if n]
    shares = [share for share in shares if not share.output] + [share for share in shares if share.output]
    shares = [dataclasses.replace(share, bytes=share.bytes + shape.output_cost) if share.output else share
              for share in shares]
    return Split(shape.name, n_ctx, tuple(shares), why)


def _refusal(rooms: Sequence[Room], shape: Shape, n_ctx: int) -> str:
    usable = sum(room.free for room in rooms if not room.excluded)
    each = "; ".join(f"{room.name} cannot take part ({room.excluded})" if room.excluded
                     else f"{room.name} {room.free / 1e9:.2f} GB free" for room in rooms) or "no hive is up"
    split = shape.total(n_ctx) + RPC_OVERHEAD + shape.output_cost
    return (f"cannot load {shape.name}: with {n_ctx} tokens of context it needs {shape.total(n_ctx) / 1e9:.2f} GB "
            f"on one host, or at least {split / 1e9:.2f} GB split across hosts (one helper also holds the output "
            f"projection and its logits, {shape.output_cost / 1e9:.2f} GB), and the fleet together has "
            f"{usable / 1e9:.2f} GB ({each}). Add a host to inventory.toml, raise a host's `memory`, stop a worker "
            "(`rbee workers stop`), or use a smaller model or context")


@dataclass(frozen=True)
class ModelPlan:
    """Where one model would run, for `fleet plan`: alone, split, or nowhere (and why)."""

    model: str
    placement: str
    fits: bool
    split: Split | None = None


def fleet_rooms(views: Sequence[HiveView], inventory: Inventory) -> list[Room]:
    """Every hive as a split sees it, from the scheduler's views of the last heartbeats."""
    rooms = []
    for view in views:
        entry = inventory.get(view.name)
        if not view.available:
            rooms.append(Room(view.name, 0, "not running"))
        elif view.system and view.system != "linux":
            rooms.append(Room(view.name, view.free_memory, f"its host runs {view.system}; a split's share and main "
                                                            "worker are fenced with Linux's network namespaces"))
        elif entry is not None and entry.backend == "mlx":
            rooms.append(Room(view.name, view.free_memory, "its hive runs mlx-lm only, which cannot serve a share; "
                                                           'set backend = "auto" to let it join through llama.cpp'))
        else:
            rooms.append(Room(view.name, view.free_memory))
    return rooms


def shape_of(name: str, ref: str, catalogs: Mapping[str, Sequence[CatalogModel]]) -> Shape | None:
    """The GGUF model ``ref`` as the first hive that has it on disk reports it (None: none has it)."""
    for models in catalogs.values():
        for model in models:
            if model.format == "gguf" and model.layers > 0 and ref in model_keys(model.name, model.ref) | {model.path}:
                return Shape(name, model.size, model.layers, model.kv_per_token, model.context_length,
                             model.output_bytes, model.vocab)
    return None


def model_plans(views: Sequence[HiveView], inventory: Inventory,
                catalogs: Mapping[str, Sequence[CatalogModel]]) -> list[ModelPlan]:
    """Each logical model and each GGUF model on some hive's disk, planned on the fleet as it is now."""
    wanted: dict[str, tuple[str, LogicalModel | None]] = {
        name: (logical.gguf, logical) for name, logical in inventory.models.items() if logical.gguf is not None}
    for models in catalogs.values():
        for model in models:
            if model.format == "gguf":
                wanted.setdefault(model.name, (model.ref, None))
    rooms = fleet_rooms(views, inventory)
    plans = []
    for name, (ref, logical) in wanted.items():
        shape = shape_of(name, ref, catalogs)
        if shape is None:
            plans.append(ModelPlan(name, f"not on any hive's disk yet: its size is known once a hive has it "
                                         f"(`rbee models pull {ref}`)", False))
            continue
        try:
            split = plan_split(rooms, shape, requested_ctx=logical.ctx if logical else None,
                               forced=logical.split or () if logical else ())
        except NoCapacityError as exc:
            plans.append(ModelPlan(name, exc.message, False))
            continue
        plans.append(ModelPlan(name, f"{split.describe()}, {split.n_ctx} tokens of context", True, split))
    return plans
