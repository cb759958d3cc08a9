from __future__ import annotations

import asyncio

import pytest

from rbee.errors import RequestError, UnknownNodeError
from rbee.link.client import LinkClient
from rbee.link.heartbeat import is_overdue
from rbee.link.jobs import Job, JobRegistry
from rbee.link.peers import PeerState
from rbee.queen.hives import HivePeer, HiveRegistry

BEAT = {"name": "mac", "version": "0.1"}


def connect(peer: HivePeer) -> LinkClient:
    return LinkClient(peer.url or "http://127.0.0.1:9", peer.actor)


def test_three_missed_intervals_make_a_peer_overdue() -> None:
    assert not is_overdue(last_beat=10.0, now=15.9, interval=2.0)
    assert is_overdue(last_beat=10.0, now=16.1, interval=2.0)


async def test_a_silent_hive_goes_down_and_its_jobs_end_naming_it() -> None:
    registry = HiveRegistry(1.0, connect)
    jobs = JobRegistry("queen")

    async def forever(job: Job) -> None:
        await asyncio.Event().wait()

    job = jobs.create(forever)
    registry.launched("mac", "http://127.0.0.1:1001")
    hive = registry.heartbeat("mac", BEAT, now=100.0)
    assert hive.state == PeerState.UP
    with registry.relaying(hive, job):
        assert registry.check(now=102.9) == []
        assert [h.name for h in registry.check(now=103.5)] == ["mac"]
    assert hive.state == PeerState.DOWN and "missed 3 heartbeats" in hive.reason
    last = job.history[-1]
    assert last.type == "error" and last["code"] == "peer_down"
    assert "hive:mac missed 3 heartbeats" in last["message"]
    await asyncio.sleep(0)  # the cancelled producer ends
    assert job.task is not None and job.task.done()
    assert registry.serving("mac") is None
    registry.heartbeat("mac", BEAT, now=104.0)
    assert registry.serving("mac") is not None and hive.reason == "heartbeats resumed"
    assert [c.state for c in hive.changes] == ["starting", "starting", "up", "down", "up"]
    await jobs.close()
    await registry.close()


@pytest.mark.parametrize("body", [{"models": [{}]}, {"name": "mac", "workers": [{"state": "?"}]}, [], {"name": ""}])
def test_a_malformed_heartbeat_is_a_bad_request_not_a_crash(body: object) -> None:
    registry = HiveRegistry(1.0, connect)
    registry.launched("mac", "http://127.0.0.1:1001")
    with pytest.raises(RequestError, match="malformed heartbeat of hive:mac"):
        registry.heartbeat("mac", body)


async def test_gone_peers_are_dropped_after_the_retention_and_their_clients_closed() -> None:
    registry = HiveRegistry(1.0, connect, retention=60.0)
    registry.launched("mac", "http://127.0.0.1:1001")
    hive = registry.heartbeat("mac", BEAT, now=100.0)
    client = registry.client(hive)
    hive.set_state(PeerState.STOPPED, "stopped by `fleet down`", now=110.0)
    assert await registry.prune(now=169.0) == []
    assert [p.name for p in await registry.prune(now=171.0)] == ["mac"]
    assert "mac" not in registry and hive.client is None
    assert client._http.is_closed


async def test_a_new_address_gets_a_new_client_and_the_old_one_is_closed() -> None:
    registry = HiveRegistry(1.0, connect)
    hive = registry.launched("mac", "http://127.0.0.1:1001")
    old = registry.client(hive)
    registry.launched("mac", "http://127.0.0.1:1002")
    new = registry.client(hive)
    assert new is not old and new.base_url.endswith(":1002")
    await registry.close()
    assert old._http.is_closed and new._http.is_closed


def test_a_heartbeat_from_a_hive_this_queen_did_not_launch_is_refused() -> None:
    registry = HiveRegistry(1.0, connect)
    with pytest.raises(UnknownNodeError, match="not launched by this queen"):
        registry.heartbeat("intruder", {"name": "intruder"})
    assert "intruder" not in registry


def test_new_workers_share_the_cores() -> None:
    from rbee.hive.supervisor import worker_threads

    assert worker_threads(8, 0) == 8
    assert worker_threads(8, 1) == 4
    assert worker_threads(2, 3) == 1
