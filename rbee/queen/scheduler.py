"""Which hive runs a job: one small pure rule, tested over tables of fleets.

The aim is the hive that will answer first:

1. ``--node`` given: that hive.
2. A hive with the model warm and a slot free (the most free slots first).
3. Else a hive that has the model on disk and the memory to load it, rather than
   queueing behind a busy worker elsewhere.
4. Else a hive with the model warm but busy: the shortest queue per slot.
5. Else a hive with the model on disk, then the one with the most free memory.

Ties go to the hive with more free memory, then to the name, so the choice is stable.

Its input, ``hive_view``, is a pure function of a hive's last typed heartbeat; ``hive_body``
is what the chosen hive is sent (the inventory's settings applied). Both are tested
without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rbee.errors import NoHiveError
from rbee.inventory import Inventory
from rbee.link.schemas import HiveReport, JobRequest


@dataclass(frozen=True)
class ModelLoad:
    """A model's warm workers on one hive, from its last heartbeat."""

    slots: int = 0
    busy: int = 0
    queue: int = 0

    @property
    def free(self) -> int:
        return max(self.slots - self.busy, 0)

    def __add__(self, other: ModelLoad) -> ModelLoad:
        return ModelLoad(self.slots + other.slots, self.busy + other.busy, self.queue + other.queue)

    def with_in_flight(self, jobs: int) -> ModelLoad:
        """This load, knowing the queen has ``jobs`` running there: a heartbeat is up to an interval
        old, so a burst of jobs would otherwise all go to the hive that looked free."""
        busy = max(self.busy, min(jobs, self.slots))
        return ModelLoad(self.slots, busy, max(self.queue, jobs - self.slots))


@dataclass(frozen=True)
class HiveView:
    name: str
    available: bool  # up, or startable on demand (this machine)
    warm: frozenset[str]  # model names/refs a live worker holds
    on_disk: frozenset[str]  # model names/refs in its catalog
    free_memory: int  # bytes a new worker may use (largest GPU pool or RAM)
    load: Mapping[str, ModelLoad] = field(default_factory=dict)  # per model name/ref, of its warm workers
    sizes: Mapping[str, int] = field(default_factory=dict)  # per model name/ref on disk: bytes of the file
    system: str = ""  # the host's OS as its hive reports it ("linux", "darwin"); "" before a report

    def load_of(self, model: str) -> ModelLoad:
        return self.load.get(model, ModelLoad())

    def fits(self, model: str) -> bool:
        size = self.sizes.get(model)
        return size is not None and self.free_memory >= size


def choose_hive(hives: Sequence[HiveView], model: str, node: str | None = None) -> str:
    if node is not None:
        return node
    candidates = [hive for hive in hives if hive.available]
    if not candidates:
        raise NoHiveError("no hive is up: start the fleet with `rbee fleet up`")

    def roomy(hive: HiveView) -> tuple[int, str]:
        return -hive.free_memory, hive.name

    warm = [h for h in candidates if model in h.warm]
    free = [h for h in warm if h.load_of(model).free > 0]
    if free:
        return min(free, key=lambda h: (-h.load_of(model).free, *roomy(h))).name
    loadable = [h for h in candidates if model in h.on_disk and model not in h.warm and h.fits(model)]
    if loadable:
        return min(loadable, key=roomy).name
    if warm:
        return min(warm, key=lambda h: (h.load_of(model).queue / max(h.load_of(model).slots, 1), *roomy(h))).name
    for tier in ([h for h in candidates if model in h.on_disk], candidates):
        if tier:
            return min(tier, key=roomy).name
    raise AssertionError("unreachable")


def model_keys(name: str, ref: str) -> set[str]:
    """Every way a request may name a catalog entry: its name, its ref, and hf:org/repo for hf:org/repo:file."""
    keys = {name, ref}
    if ref.startswith("hf:") and ref.count(":") == 2:
        keys.add(ref.rsplit(":", 1)[0])
    return keys


def hive_view(name: str, report: HiveReport | None, available: bool, in_flight: Mapping[str, int],
              fallback_free: int = 0) -> HiveView:
    """What the scheduler needs of one hive, from its last typed heartbeat (None: no live
    report) and the jobs the queen is relaying there per model. ``fallback_free``: the
    memory to assume for a hive that has not reported (this machine, before its hive runs)."""
    if report is None:
        return HiveView(name, available, frozenset(), frozenset(), fallback_free)
    keys_of = {m.path: model_keys(m.name, m.ref) for m in report.models}
    sizes = {key: m.size for m in report.models for key in model_keys(m.name, m.ref)}
    warm: set[str] = set()
    load: dict[str, ModelLoad] = {}
    for worker in report.workers:
        if worker.state in ("up", "busy"):
            keys = keys_of.get(worker.model_path, set())
            warm |= keys
            this = ModelLoad(worker.load.slots or 1, worker.load.slots_busy, worker.load.queue)
            for key in keys:
                load[key] = load.get(key, ModelLoad()) + this
    for model, jobs in in_flight.items():
        if model in load:
            load[model] = load[model].with_in_flight(jobs)
    on_disk = frozenset(key for keys in keys_of.values() for key in keys)
    return HiveView(name, available, frozenset(warm), on_disk, report.free_memory, load, sizes,
                    str(report.devices.get("os", "")))


def hive_body(request: JobRequest, inventory: Inventory, node: str) -> dict[str, Any]:
    """What the hive gets: a logical model's forms and settings, and the hive's own settings,
    each unless the job chose (job > model > hive > the hive's defaults)."""
    changes: dict[str, Any] = {}
    logical = inventory.models.get(request.model) if request.model else None
    entry = inventory.get(node)
    if logical is not None:
        changes["forms"] = logical.forms()
        for key in ("ctx", "parallel", "queue"):
            if getattr(request, key) is None and getattr(logical, key) is not None:
                changes[key] = getattr(logical, key)
    if entry is not None and entry.backend != "auto" and request.backend in (None, "auto"):
        changes["backend"] = entry.backend
    if request.gpu_layers is None:
        for source in (logical, entry):
            if source is not None and source.gpu_layers is not None:
                changes["gpu_layers"] = source.gpu_layers
                break
    if request.gpu_split is None and entry is not None and entry.gpu_split:
        changes["gpu_split"] = True
    if request.keep_alive is None and entry is not None and entry.keep_alive is not None:
        changes["keep_alive"] = entry.keep_alive
    return request.for_tier("hive", **changes)
