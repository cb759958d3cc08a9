"""The batching engine's slot bookkeeping: which slot, what prefix is reused, and when a
request must wait for room in the shared context."""

from __future__ import annotations

from rbee.worker.slots import Assignment, SlotTable, common_prefix


def run(table: SlotTable, prompt: list[int], max_new: int) -> Assignment:
    assignment = table.assign(prompt, max_new)
    assert assignment is not None
    table.start(assignment, prompt, max_new)
    return assignment


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0 and common_prefix([1], [1]) == 1


def test_a_fresh_table_gives_the_first_slot_and_reuses_nothing() -> None:
    assert run(SlotTable(4, 1000), [1, 2, 3], 10) == Assignment(0, None, 0, ())


def test_an_idle_cache_with_the_same_prefix_is_reused_in_place() -> None:
    table = SlotTable(2, 1000)
    run(table, [1, 2, 3, 4], 10)
    table.finish(0, [1, 2, 3, 4, 50, 51])
    assert table.assign([1, 2, 3, 9, 9], 10) == Assignment(0, 0, 3, ())
    # the same prompt again: everything but its last token comes from the cache
    assert table.assign([1, 2, 3, 4], 10) == Assignment(0, 0, 3, ())


def test_a_running_sequence_lends_its_prefix_by_copy() -> None:
    table = SlotTable(2, 1000)
    run(table, [1, 2, 3, 4, 5], 10)
    table.slots[0].tokens = [1, 2, 3, 4, 5]  # the engine marks the prompt resident once prefilled
    assert table.assign([1, 2, 3, 7], 10) == Assignment(1, 0, 3, ())


def test_the_emptiest_idle_slot_is_taken_when_no_prefix_matches() -> None:
    table = SlotTable(3, 1000)
    run(table, [5, 5, 5], 1)
    table.finish(0, [5, 5, 5])
    assert table.assign([9, 9], 1) == Assignment(1, None, 0, ())


def test_full_slots_or_no_room_make_a_request_wait() -> None:
    table = SlotTable(1, 1000)
    run(table, [1], 10)
    assert table.assign([2], 10) is None  # the only slot runs
    table = SlotTable(4, 100)
    run(table, [1] * 20, 40)  # reserves 60 cells
    assert table.assign([2] * 10, 40) is None  # 60 + 50 > 100: waits
    assert table.assign([2] * 10, 30) is not None


def test_idle_caches_are_evicted_oldest_first_to_make_room() -> None:
    table = SlotTable(3, 100)
    run(table, [7] * 30, 0)
    table.finish(0, [7] * 30)
    run(table, [8] * 30, 0)
    table.finish(1, [8] * 30)
    assignment = table.assign([9] * 20, 30)  # 30 + 30 + 50 > 100: drop the oldest cache
    assert assignment is not None and assignment.slot == 2 and assignment.evict == (0,)
    table.start(assignment, [9] * 20, 30)
    assert table.slots[0].tokens == [] and table.slots[1].tokens == [8] * 30
