from __future__ import annotations

from rbee.link.heartbeat import is_overdue
from rbee.queen.hives import HiveRegistry


def test_three_missed_intervals_make_a_peer_overdue() -> None:
    assert not is_overdue(last_beat=10.0, now=15.9, interval=2.0)
    assert is_overdue(last_beat=10.0, now=16.1, interval=2.0)


async def test_hive_registry_marks_down_with_reason_and_back_up() -> None:
    registry = HiveRegistry(heartbeat_interval=1.0)
    registry.heartbeat("mac", {"url": "http://h", "version": "0.1"}, now=100.0)
    assert registry.check_overdue(now=102.9) == []
    assert [h.name for h in registry.check_overdue(now=103.5)] == ["mac"]
    hive = registry.hives["mac"]
    assert hive.state == "down" and "missed heartbeats" in hive.reason
    assert registry.get_up("mac") is None
    registry.heartbeat("mac", {"url": "http://h"}, now=104.0)
    assert registry.get_up("mac") is not None and hive.reason == "heartbeats resumed"


def test_new_workers_share_the_cores() -> None:
    from rbee.hive.supervisor import worker_threads

    assert worker_threads(8, 0) == 8
    assert worker_threads(8, 1) == 4
    assert worker_threads(2, 3) == 1
