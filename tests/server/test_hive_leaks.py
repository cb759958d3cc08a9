"""A long-running hive does not leak: workers that come and go leave no records, connection
pools, open files or heartbeat bloat behind (real child processes, a light stand-in worker)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import psutil
import pytest

from rbee.config import HiveConfig
from rbee.hive.models import ModelCatalog
from rbee.hive.placement import Demand
from rbee.hive.service import Hive
from rbee.hive.supervisor import Supervisor, WorkerSpec
from tests.helpers import eventually

CYCLES = 200


#: a 1 MB stand-in model: it fits on any host
DEMAND = Demand(weights=1 << 20, kv_per_token=1024, layers=2, trained_ctx=2048, requested_ctx=None,
                engine="llama-cpp", gpu_layers=0, offload=False)


@pytest.mark.timeout(300)
async def test_a_hive_is_flat_after_200_worker_start_kill_cycles(tmp_path: Path) -> None:
    config = HiveConfig(name="long-running", home=tmp_path, models_dir=tmp_path / "models", heartbeat_interval=0.2,
                        peer_retention=0.0, worker_ready_timeout=20)
    supervisor = Supervisor(config, "http://127.0.0.1:9")
    supervisor.worker_module = "tests.stand_in_worker"
    hive = Hive(config, supervisor, ModelCatalog(tmp_path / "models"))
    watcher = asyncio.create_task(supervisor.watch_heartbeats())
    spec = WorkerSpec(tmp_path / "model.gguf", "llama-cpp")

    def narrate(*args: Any, **kwargs: Any) -> None:
        pass

    async def cycle() -> None:
        record = await supervisor.worker_for(spec, narrate, DEMAND)
        record.active_jobs -= 1
        supervisor.client(record)  # a connection pool, as a job's relay makes
        record.child.process.kill()
        await record.child.process.wait()
        await eventually(lambda: record.worker_id not in supervisor.workers, timeout=5)
        assert record.client is None and not record.child.log_path.exists()
        assert not supervisor.secret_path(record.worker_id).exists()

    me = psutil.Process()
    try:
        for _ in range(20):
            await cycle()
        gc.collect()
        fds, rss, beat = me.num_fds(), me.memory_info().rss, len(hive.status().model_dump_json())
        for _ in range(CYCLES):
            await cycle()
        gc.collect()
        grown = me.memory_info().rss - rss
        print(f"\n{CYCLES} cycles: fds {fds} → {me.num_fds()}, RSS +{grown / 1e6:.1f} MB, "
              f"heartbeat {beat} → {len(hive.status().model_dump_json())} bytes")
        assert me.num_fds() <= fds + 2
        assert not supervisor.workers and not hive.status().workers
        assert abs(len(hive.status().model_dump_json()) - beat) < 64  # free-RAM digits may change
        assert grown < 32e6
        assert len(supervisor._watchers) <= 1 and len(supervisor.peers._closing) == 0
    finally:
        watcher.cancel()
        await supervisor.stop_all()
        await hive.close()
