from __future__ import annotations

import pytest

from rbee.queen.scheduler import HiveView, NoHiveError, choose_hive

GB = 1024**3


def hive(
    name: str, warm: tuple[str, ...] = (), disk: tuple[str, ...] = (), free: float = 8, up: bool = True
) -> HiveView:
    return HiveView(name, up, frozenset(warm), frozenset(disk), int(free * GB))


FLEETS = [
    # (fleet, model, node, expected, why)
    ([hive("a"), hive("b", warm=("m",))], "m", None, "b", "warm wins"),
    ([hive("a", disk=("m",), free=64), hive("b", warm=("m",), free=1)], "m", None, "b", "warm beats on-disk"),
    ([hive("a", free=64), hive("b", disk=("m",), free=2)], "m", None, "b", "on disk beats strong"),
    ([hive("a", free=4), hive("b", free=16)], "m", None, "b", "strongest device with room"),
    ([hive("a", warm=("m",), free=2), hive("b", warm=("m",), free=3)], "m", None, "b", "more room breaks a tie"),
    ([hive("a", free=8), hive("b", free=8)], "m", None, "a", "then the name: stable"),
    ([hive("a", warm=("m",), up=False), hive("b")], "m", None, "b", "down hives are skipped"),
    ([hive("a"), hive("b", warm=("m",))], "m", "a", "a", "--node wins over everything"),
    ([hive("mac", warm=("x",)), hive("linux", disk=("m",))], "m", None, "linux", "other models do not count"),
]


@pytest.mark.parametrize("fleet, model, node, expected, why", FLEETS, ids=[row[-1] for row in FLEETS])
def test_choose_hive(fleet: list[HiveView], model: str, node: str | None, expected: str, why: str) -> None:
    assert choose_hive(fleet, model, node) == expected, why


def test_no_hive_up() -> None:
    with pytest.raises(NoHiveError, match="fleet up"):
        choose_hive([hive("a", up=False)], "m")
