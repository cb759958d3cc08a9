"""A hive's shares of split models: admitted against its memory, started behind their unix socket,
reported as they are (a SIGSTOP shows), and gone with nothing left when stopped."""

from __future__ import annotations

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
        await shares.start("gemma", 300 * MB, lambda: 200 * MB)
    assert not shares.records
    try:
        share = await shares.start("gemma", 120 * MB, lambda: 200 * MB)
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
