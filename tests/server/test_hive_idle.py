"""The hive's idle watch stops idle workers, never one still loading for its job (real child
processes, the light stand-in worker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from rbee.config import HiveConfig
from rbee.hive.supervisor import Supervisor, WorkerSpec
from rbee.link.peers import PeerState
from tests.helpers import eventually
from tests.server.test_hive_leaks import DEMAND


def narrate(*args: Any, **kwargs: Any) -> None:
    pass


@pytest.mark.timeout(60)
async def test_a_load_slower_than_the_keep_alive_is_not_taken_for_idleness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its first heartbeat marks it up before /ready answers: that once got it stopped as idle."""
    monkeypatch.setenv("STAND_IN_LOAD_S", "2.5")
    config = HiveConfig(name="idle", home=tmp_path, models_dir=tmp_path / "models", heartbeat_interval=10.0,
                        worker_idle_timeout=0.2, worker_ready_timeout=20)
    supervisor = Supervisor(config, "http://127.0.0.1:9")
    supervisor.worker_module = "tests.stand_in_worker"
    watcher = asyncio.create_task(supervisor.watch_heartbeats())
    spec = WorkerSpec(tmp_path / "model.gguf", "llama-cpp")
    try:
        starting = asyncio.create_task(supervisor.worker_for(spec, narrate, DEMAND))
        worker_id = await eventually(lambda: next(iter(supervisor.workers), None))
        report = {"worker_id": worker_id, "state": "ready", "model_path": str(spec.model_path),
                  "backend": "llama-cpp", "n_ctx": 2048}
        assert supervisor.heartbeat(worker_id, report)
        assert supervisor.workers[worker_id].state == PeerState.UP
        record = await starting  # the watch ran twice meanwhile (every second)
        assert record.state == PeerState.UP and record.active_jobs == 1
        record.active_jobs -= 1  # the job ended: now it is idle, and stopped after its keep-alive
        await eventually(lambda: record.state == PeerState.STOPPED, timeout=5)
        assert "idle for more than" in record.reason
    finally:
        watcher.cancel()
        await supervisor.stop_all()
