"""The split planner over tables of fleets: who takes part, how many layers each, what a refusal says."""

from __future__ import annotations

import pytest

from rbee.errors import NoCapacityError
from rbee.inventory import Inventory
from rbee.link.schemas import CatalogModel, HiveReport, ShareView
from rbee.queen.scheduler import HiveView
from rbee.queen.split import RPC_OVERHEAD, Room, Shape, Split, model_plans, plan_split
from rbee.queen.split_job import ShareLedger

MB = 1_000_000
#: the default model as its GGUF header says: 18 layers, 1 KV head of 256 (18,432 bytes of KV cache per
#: token), a 262k vocabulary whose 178 MB embeddings are also its output projection
GEMMA = Shape("gemma3-270m", weights=253 * MB, layers=18, kv_per_token=18_432, trained_ctx=32_768,
              output_bytes=178_257_920, vocab=262_144)
CTX = 4096


def within(room: Room, share_bytes: int) -> bool:
    return share_bytes <= room.free


def well_formed(plan: Split, rooms: list[Room]) -> None:
    """Every layer placed once, every share within its hive's room, the output with the last helper."""
    by_name = {room.name: room for room in rooms}
    assert sum(s.layers for s in plan.shares) == GEMMA.layers and all(s.layers > 0 for s in plan.shares)
    assert all(within(by_name[s.hive], s.bytes) for s in plan.shares), plan
    assert [s.output for s in plan.shares] == [False] * (len(plan.shares) - 1) + [plan.split]
    assert [s.role for s in plan.shares] == ["main"] + ["rpc"] * (len(plan.shares) - 1)


def test_two_hosts_that_each_miss_a_little_split_with_the_output_on_the_helper() -> None:
    each = int(GEMMA.total(CTX) * 0.95)
    rooms = [Room("bee-a", each), Room("bee-b", each + 1)]
    plan = plan_split(rooms, GEMMA, requested_ctx=CTX)
    assert plan.split and plan.n_ctx == CTX
    assert plan.main.hive == "bee-b"  # the roomier one runs the main worker
    assert [s.hive for s in plan.helpers] == ["bee-a"]
    well_formed(plan, rooms)
    helper = plan.helpers[0]
    assert helper.bytes >= RPC_OVERHEAD + GEMMA.output_cost + helper.layers * GEMMA.per_layer(CTX)
    text = plan.describe()
    assert text.startswith("split across bee-b: ") and text.endswith(", over RPC")
    assert f"; bee-a: {helper.layers} layers and the output layer, {helper.bytes / 1e6:.0f} MB" in text


def test_the_output_projection_is_what_a_helper_cannot_do_without() -> None:
    """Two hosts with 60 % each hold the layers, but the helper that takes the output projection (a
    copy of the tied 178 MB embeddings and a 64 MB logits buffer) needs more: refused."""
    each = int(GEMMA.total(CTX) * 0.6)
    assert each * 2 > GEMMA.total(CTX)
    with pytest.raises(NoCapacityError, match="the fleet together has"):
        plan_split([Room("bee-a", each), Room("bee-b", each)], GEMMA, requested_ctx=CTX)


def test_a_model_that_fits_on_one_hive_is_not_split() -> None:
    plan = plan_split([Room("bee-a", 2 * GEMMA.total(CTX)), Room("bee-b", GEMMA.total(CTX))], GEMMA,
                      requested_ctx=CTX)
    assert not plan.split and plan.main.hive == "bee-a" and plan.main.layers == GEMMA.layers
    assert plan.describe().startswith("on bee-a alone")


def test_the_fewest_hives_take_part_and_one_too_small_for_a_layer_takes_none() -> None:
    total = GEMMA.total(CTX)
    rooms = [Room("big", int(total * 0.95)), Room("mid", int(total * 0.85)), Room("small", int(total * 0.45)),
             Room("tiny", RPC_OVERHEAD + 1)]
    plan = plan_split(rooms, GEMMA, requested_ctx=CTX)
    assert [s.hive for s in plan.shares] == ["big", "mid"]
    well_formed(plan, rooms)
    forced_tiny = plan_split([Room("tiny", RPC_OVERHEAD + 1), *rooms[:3]], GEMMA, requested_ctx=CTX)
    assert "tiny" not in {s.hive for s in forced_tiny.shares}


def test_layers_follow_room_so_every_hive_keeps_the_same_headroom() -> None:
    total = GEMMA.total(CTX)
    rooms = [Room("a", int(total * 0.9)), Room("b", int(total * 0.9))]
    plan = plan_split(rooms, GEMMA, requested_ctx=CTX)
    well_formed(plan, rooms)
    assert plan.main.layers > 2 * plan.helpers[0].layers  # the helper's room goes to the output first


def test_refusal_names_what_each_hive_has_and_who_cannot_take_part() -> None:
    rooms = [Room("bee-a", 100 * MB), Room("bee-b", 90 * MB), Room("mac", 10_000 * MB, excluded="mlx-lm only")]
    with pytest.raises(NoCapacityError) as caught:
        plan_split(rooms, GEMMA, requested_ctx=CTX)
    message = caught.value.message
    assert "the fleet together has 0.19 GB" in message
    assert "needs 0.40 GB on one host, or at least 0.69 GB split across hosts" in message
    assert "bee-a 0.10 GB free" in message and "bee-b 0.09 GB free" in message
    assert "mac cannot take part (mlx-lm only)" in message
    assert "raise a host's `memory`" in message


def test_without_an_asked_context_the_trained_length_is_halved_until_the_fleet_holds_it() -> None:
    each = int(GEMMA.total(CTX) * 0.95)
    plan = plan_split([Room("bee-a", each), Room("bee-b", each)], GEMMA)
    assert CTX <= plan.n_ctx < GEMMA.trained_ctx and "capped by the fleet's free memory" in plan.why_ctx
    assert sum(s.layers for s in plan.shares) == GEMMA.layers


def test_a_forced_split_keeps_its_order_and_refuses_unknown_or_barred_hives() -> None:
    total = GEMMA.total(CTX)
    rooms = [Room("bee-a", 2 * total), Room("bee-b", total), Room("mac", 2 * total, excluded="mlx-lm only")]
    plan = plan_split(rooms, GEMMA, requested_ctx=CTX, forced=["bee-b", "bee-a"])
    assert [s.hive for s in plan.shares] == ["bee-b", "bee-a"]
    well_formed(plan, rooms)
    with pytest.raises(NoCapacityError, match="bee-z: no such hive"):
        plan_split(rooms, GEMMA, requested_ctx=CTX, forced=["bee-a", "bee-z"])
    with pytest.raises(NoCapacityError, match=r"mac cannot take part \(mlx-lm only\)"):
        plan_split(rooms, GEMMA, requested_ctx=CTX, forced=["bee-a", "mac"])


def test_a_model_without_layer_count_is_not_split() -> None:
    with pytest.raises(NoCapacityError, match="does not say how many layers"):
        plan_split([Room("a", 10**12)], Shape("odd", 10 * MB, 0, 0))


def catalog_model(name: str, ref: str, size: int, layers: int = 18, fmt: str = "gguf") -> CatalogModel:
    return CatalogModel(name=name, ref=ref, size=size, path=f"/m/{name}.gguf", format=fmt, layers=layers,
                        kv_per_token=18_432, context_length=32_768, output_bytes=GEMMA.output_bytes,
                        vocab=GEMMA.vocab)


def test_fleet_plan_rows_split_what_fits_nowhere_alone_and_refuse_what_fits_nowhere() -> None:
    inventory = Inventory.model_validate({
        "hive": [{"name": "bee-a", "ssh": "a@a"}, {"name": "bee-b", "ssh": "b@b"},
                 {"name": "mac", "ssh": "m@m", "backend": "mlx"}, {"name": "off", "ssh": "o@o"}],
        "models": {"gemma": {"gguf": "hf:org/gemma:g.gguf", "ctx": CTX},
                   "forced": {"gguf": "hf:org/gemma:g.gguf", "ctx": CTX, "split": ["bee-a", "bee-b"]},
                   "huge": {"gguf": "hf:org/huge:h.gguf"}, "unpulled": {"gguf": "hf:org/new:n.gguf"}},
    })
    each = int(GEMMA.total(CTX) * 0.95)
    views = [HiveView("bee-a", True, frozenset(), frozenset(), each),
             HiveView("bee-b", True, frozenset(), frozenset(), each),
             HiveView("mac", True, frozenset(), frozenset(), 10**12),
             HiveView("air", True, frozenset(), frozenset(), 10**12, system="darwin"),
             HiveView("off", False, frozenset(), frozenset(), 0)]
    catalogs = {"bee-a": [catalog_model("g", "hf:org/gemma:g.gguf", GEMMA.weights),
                          catalog_model("h", "hf:org/huge:h.gguf", 5 * GEMMA.weights)],
                "mac": [catalog_model("other", "hf:org/mlx", 10, layers=0, fmt="mlx")]}
    rows = {row.model: row for row in model_plans(views, inventory, catalogs)}
    # by the names a job may use: logical models, and each GGUF of a catalog (an MLX one is not planned)
    assert set(rows) == {"gemma", "forced", "huge", "unpulled", "g", "h"}
    assert rows["g"].fits and rows["g"].split is not None and rows["g"].split.n_ctx < GEMMA.trained_ctx
    gemma = rows["gemma"]
    assert gemma.fits and gemma.split is not None and {s.hive for s in gemma.split.shares} == {"bee-a", "bee-b"}
    assert gemma.placement.startswith("split across bee-a: ") and f"{CTX} tokens of context" in gemma.placement
    assert rows["forced"].fits and rows["forced"].split is not None
    assert [s.hive for s in rows["forced"].split.shares] == ["bee-a", "bee-b"]
    huge = rows["huge"]
    assert not huge.fits and "the fleet together has" in huge.placement
    assert "mac cannot take part (its hive runs mlx-lm only" in huge.placement
    assert "off cannot take part (not running)" in huge.placement
    assert "air cannot take part (its host runs darwin;" in huge.placement
    assert not rows["unpulled"].fits and "rbee models pull hf:org/new:n.gguf" in rows["unpulled"].placement


def test_a_share_no_job_holds_is_a_stray_after_the_grace_only() -> None:
    ledger = ShareLedger(grace=10)
    report = HiveReport(name="h2", shares=[ShareView(share_id=share, model="m") for share in ("held", "left")])
    ledger.hold("held")
    assert ledger.strays("h2", report, now=100) == []
    assert ledger.strays("h1", HiveReport(name="h1"), now=105) == []  # another hive's beat forgets nothing of h2's
    assert ledger.strays("h2", report, now=109) == []
    assert ledger.strays("h2", report, now=110) == ["left"]
    ledger.release("held")  # its job's teardown could not reach the hive: it becomes a stray in turn
    assert ledger.strays("h2", report, now=111) == ["left"]
    assert ledger.strays("h2", report, now=121) == ["held", "left"]
    assert ledger.strays("h2", HiveReport(name="h2"), now=122) == []  # gone from the report: forgotten
    assert ledger.strays("h2", report, now=123) == []  # listed again: a new grace
