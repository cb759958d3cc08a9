from __future__ import annotations

import pytest

from rbee.queen.scheduler import HiveView, ModelLoad, NoHiveError, choose_hive

GB = 1024**3


def hive(
    name: str, warm: tuple[str, ...] = (), disk: tuple[str, ...] = (), free: float = 8, up: bool = True,
    slots: tuple[int, int, int] = (8, 0, 0), size: float = 1,
) -> HiveView:
    """``slots``: (slots, busy, queued) of the warm model's workers; ``size``: GB of the model file on disk."""
    load = {m: ModelLoad(*slots) for m in warm}
    return HiveView(name, up, frozenset(warm), frozenset({*disk, *warm}), int(free * GB), load,
                    {m: int(size * GB) for m in {*disk, *warm}})


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
    # load: the hive that will answer first
    ([hive("a", warm=("m",), slots=(8, 8, 3)), hive("b", disk=("m",))], "m", None, "b",
     "a full warm worker loses to a host that can load the model from disk"),
    ([hive("a", warm=("m",), slots=(8, 8, 3)), hive("b", disk=("m",), free=0.5)], "m", None, "a",
     "on disk but no memory for it: queue at the warm one"),
    ([hive("a", warm=("m",), slots=(8, 6, 0)), hive("b", warm=("m",), slots=(8, 1, 0))], "m", None, "b",
     "the warm hive with more free slots"),
    ([hive("a", warm=("m",), slots=(8, 7, 0), free=64), hive("b", disk=("m",))], "m", None, "a",
     "one free slot beats loading a new worker"),
    ([hive("a", warm=("m",), slots=(4, 4, 8)), hive("b", warm=("m",), slots=(4, 4, 1))], "m", None, "b",
     "all busy: the shortest queue per slot"),
    ([hive("a", warm=("m",), slots=(1, 1, 0)), hive("b", warm=("m",), slots=(8, 8, 4)), hive("c")], "m", None, "a",
     "all busy, none loadable: 0 queued per slot beats 0.5"),
    ([hive("a", warm=("m",), slots=(8, 8, 0)), hive("b", free=64)], "m", None, "a",
     "a host without the model on disk does not beat a busy warm one"),
]


@pytest.mark.parametrize("fleet, model, node, expected, why", FLEETS, ids=[row[-1] for row in FLEETS])
def test_choose_hive(fleet: list[HiveView], model: str, node: str | None, expected: str, why: str) -> None:
    assert choose_hive(fleet, model, node) == expected, why


def test_no_hive_up() -> None:
    with pytest.raises(NoHiveError, match="fleet up"):
        choose_hive([hive("a", up=False)], "m")


@pytest.mark.parametrize("load, jobs, expected", [
    (ModelLoad(8, 0, 0), 3, ModelLoad(8, 3, 0)),  # the heartbeat predates the burst
    (ModelLoad(2, 0, 0), 5, ModelLoad(2, 2, 3)),
    (ModelLoad(8, 5, 0), 2, ModelLoad(8, 5, 0)),  # the heartbeat already counts them (and others')
    (ModelLoad(4, 4, 2), 1, ModelLoad(4, 4, 2)),
])
def test_jobs_in_flight_count_until_the_next_heartbeat(load: ModelLoad, jobs: int, expected: ModelLoad) -> None:
    assert load.with_in_flight(jobs) == expected


def test_a_burst_spreads_over_two_warm_hives() -> None:
    """Two slots each: the queen's own count moves the third and fourth job to the other hive."""
    picks = []
    in_flight = {"a": 0, "b": 0}
    for _ in range(4):
        fleet = [HiveView(n, True, frozenset({"m"}), frozenset({"m"}), GB,
                          {"m": ModelLoad(2, 0, 0).with_in_flight(in_flight[n])}) for n in ("a", "b")]
        pick = choose_hive(fleet, "m")
        in_flight[pick] += 1
        picks.append(pick)
    assert sorted(picks) == ["a", "a", "b", "b"]
