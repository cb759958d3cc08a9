from __future__ import annotations

import pytest

from rbee.errors import NoHiveError
from rbee.queen.scheduler import HiveView, ModelLoad, choose_hive

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


def test_the_view_of_a_hive_comes_from_its_typed_report_alone() -> None:
    from rbee.link.schemas import CatalogModel, HiveReport, Load, WorkerView
    from rbee.queen.scheduler import hive_view

    report = HiveReport(
        name="mac", free_memory=8 << 30,
        models=[CatalogModel(name="gemma3-270m", ref="gemma3-270m", size=250 << 20, path="/m/g.gguf"),
                CatalogModel(name="qwen-q4", ref="hf:org/qwen:qwen-q4.gguf", size=4 << 30, path="/m/q.gguf")],
        workers=[WorkerView(worker_id="w-1", state="busy", model_path="/m/g.gguf", backend="llama-cpp",
                            load=Load(slots=4, slots_busy=3, queue=0)),
                 WorkerView(worker_id="w-2", state="down", model_path="/m/q.gguf", backend="llama-cpp")],
    )
    view = hive_view("mac", report, True, {"gemma3-270m": 6})
    assert view.warm == {"gemma3-270m"}  # the down worker's model is not warm
    assert view.on_disk == {"gemma3-270m", "qwen-q4", "hf:org/qwen:qwen-q4.gguf", "hf:org/qwen"}
    assert view.load_of("gemma3-270m") == ModelLoad(4, 4, 2)  # 6 jobs in flight on 4 slots
    assert view.sizes["hf:org/qwen"] == 4 << 30 and view.free_memory == 8 << 30
    assert hive_view("mac", None, True, {}, fallback_free=123).free_memory == 123


def test_the_hive_gets_the_inventorys_settings_unless_the_job_chose() -> None:
    from rbee.inventory import parse
    from rbee.link.schemas import JobRequest
    from rbee.queen.scheduler import hive_body

    inventory = parse('[models.coder]\ngguf = "hf:org/coder:c.gguf"\nctx = 8192\ngpu_layers = 10\n\n'
                      '[[hive]]\nname = "gpu"\nssh = "me@gpu"\nbackend = "llama-cpp"\ngpu_layers = -1\n'
                      'gpu_split = true\nkeep_alive = "10m"\n')
    body = hive_body(JobRequest(prompt="x", model="coder", node="gpu"), inventory, "gpu")
    assert body["forms"] == {"gguf": "hf:org/coder:c.gguf"} and body["ctx"] == 8192 and body["keep_alive"] == 600
    assert body["gpu_layers"] == 10 and body["gpu_split"] is True and body["backend"] == "llama-cpp"
    assert "node" not in body
    chosen = hive_body(JobRequest(prompt="x", model="coder", ctx=2048, gpu_layers=0, keep_alive=0), inventory, "gpu")
    assert chosen["ctx"] == 2048 and chosen["gpu_layers"] == 0 and chosen["keep_alive"] == 0
