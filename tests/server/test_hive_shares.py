"""A hive's shares of split models: admitted against its memory, started behind their unix socket,
reported as they are (a SIGSTOP shows), and gone with nothing left when stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from rbee.config import HiveConfig
from rbee.errors import NoCapacityError
from rbee.hive.supervisor import Supervisor
from tests.helpers import eventually

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(sys.platform != "linux", reason="namespaces are Linux's")]
MB = 1_000_000


async def test_a_share_is_admitted_held_reported_and_stopped(tmp_path: Path) -> None:
    config = HiveConfig(name="bee-b", home=tmp_path, models_dir=tmp_path / "models")
    supervisor = Supervisor(config, "http://127.0.0.1:9")
    shares = supervisor.shares
    with pytest.raises(NoCapacityError, match=r"bee-b cannot serve a 0\.30 GB share of gemma: 0\.20 GB is free"):
        await supervisor.start_share("gemma", 300 * MB, lambda: 200 * MB)
    assert not shares.records and supervisor.reserved == 0
    try:
        share = await supervisor.start_share("gemma", 120 * MB, lambda: 200 * MB)
        assert supervisor.reserved == 120 * MB  # held like a worker's memory
        view = share.view()
        assert (view.model, view.bytes, view.state) == ("gemma", 120 * MB, "up")
        assert share.socket.is_socket() and oct(share.socket.parent.stat().st_mode & 0o777) == "0o700"
        os.kill(share.process.pid, signal.SIGSTOP)
        await eventually(lambda: share.view().state == "stopped", timeout=10)
        pid = share.process.pid
        stopped = await shares.stop(share.share_id, "the split job ended")
        assert stopped.view().state == "the split job ended"
        assert not psutil.pid_exists(pid)
        assert not share.socket.exists() and not shares.records and supervisor.reserved == 0
    finally:
        await supervisor.stop_all()
    assert not shares.records


async def test_shares_and_workers_are_admitted_one_at_a_time(tmp_path: Path) -> None:
    """Room for one of two at once, whichever kind: the second check sees the first's bytes held
    while it is still starting, so exactly one is admitted."""
    config = HiveConfig(name="bee-b", home=tmp_path, models_dir=tmp_path / "models")
    supervisor = Supervisor(config, "http://127.0.0.1:9")

    def room() -> int:
        return 200 * MB - supervisor.reserved

    async def worker_check() -> tuple[str, int]:
        await asyncio.sleep(0)  # a worker's check awaits (it may unload an idle one)
        if room() < 120 * MB:
            raise NoCapacityError("no room for the worker")
        return "worker", 120 * MB

    try:
        for other in (supervisor.start_share("b", 120 * MB, room), supervisor.admitted(worker_check)):
            results = await asyncio.gather(supervisor.start_share("a", 120 * MB, room), other,
                                           return_exceptions=True)
            refused = [r for r in results if isinstance(r, NoCapacityError)]
            assert len(refused) == 1, results
            assert supervisor.reserved == 120 * MB
            await supervisor.stop_all()
            for result in results:
                if isinstance(result, tuple):  # the worker's grant: no worker was started for it
                    supervisor.release(result[1])
            assert supervisor.reserved == 0
    finally:
        await supervisor.stop_all()
