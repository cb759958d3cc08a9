"""Which hive runs a job: one small pure rule, tested over tables of fleets.

1. ``--node`` given: that hive.
2. Otherwise the hive that has the model warm (a worker already loaded it),
3. else one that has it on disk,
4. else the one with the most free memory (the strongest device with room).
Ties go to the hive with more free memory, then to the name, so the choice is stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rbee.errors import StartupError


@dataclass(frozen=True)
class HiveView:
    name: str
    available: bool  # up, or startable on demand (this machine)
    warm: frozenset[str]  # model names/refs a live worker holds
    on_disk: frozenset[str]  # model names/refs in its catalog
    free_memory: int  # bytes a new worker may use (largest GPU pool or RAM)


class NoHiveError(StartupError):
    code = "no_capacity"


def choose_hive(hives: Sequence[HiveView], model: str, node: str | None = None) -> str:
    if node is not None:
        return node
    candidates = [hive for hive in hives if hive.available]
    if not candidates:
        raise NoHiveError("no hive is up: start the fleet with `rbee fleet up`")

    def best(pool: list[HiveView]) -> str:
        return sorted(pool, key=lambda hive: (-hive.free_memory, hive.name))[0].name

    for tier in (
        [h for h in candidates if model in h.warm],
        [h for h in candidates if model in h.on_disk],
        candidates,
    ):
        if tier:
            return best(tier)
    raise AssertionError("unreachable")


def model_keys(name: str, ref: str) -> set[str]:
    """Every way a request may name a catalog entry: its name, its ref, and hf:org/repo for hf:org/repo:file."""
    keys = {name, ref}
    if ref.startswith("hf:") and ref.count(":") == 2:
        keys.add(ref.rsplit(":", 1)[0])
    return keys
