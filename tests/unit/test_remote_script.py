"""The host-side script, run here as the queen runs it on a host (``python3 - CMD ARGS``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rbee.queen.fleet.remote_script import SCRIPT


def script(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-", *args], input=SCRIPT, capture_output=True, text=True, timeout=60,
                          check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    """hive.json outlives a reboot or a crash; its pid may now belong to anything. `fleet down`
    must not kill that process."""
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run").mkdir()
        record = {"pid": unrelated.pid, "url": "http://127.0.0.1:9", "name": "h1", "started": time.time() - 3600}
        (tmp_path / "run" / "hive.json").write_text(json.dumps(record))
        probe = script("probe", str(tmp_path))
        assert probe["hive"]["alive"] is False  # type: ignore[index]
        assert script("stop", str(tmp_path), "1") == {"was_running": False}
        assert unrelated.poll() is None, "the unrelated process was killed"
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_process_started_after_the_record_is_not_the_hive(tmp_path: Path) -> None:
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "rbee.hive"])
    try:
        (tmp_path / "run").mkdir()
        record = {"pid": impostor.pid, "url": "http://127.0.0.1:9", "name": "h1", "started": time.time() - 3600}
        (tmp_path / "run" / "hive.json").write_text(json.dumps(record))
        assert script("stop", str(tmp_path), "1") == {"was_running": False}
        assert impostor.poll() is None, "a process that merely mentions rbee.hive was killed"
    finally:
        impostor.kill()
        impostor.wait()
