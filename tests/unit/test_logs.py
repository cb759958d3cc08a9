"""A role's log rotates by size, and what the process writes to stderr after a rollover
(engine output, a traceback) lands in the current file, not a rotated one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, os
from rbee.link.serving import setup_logging
setup_logging("worker:w-test")
for i in range(300):
    logging.getLogger("rbee.test").info("line %d of a long-running role", i)
os.write(2, b"RAW-STDERR-AFTER-ROLLOVER\\n")
"""


def test_logs_rotate_and_stderr_follows_the_current_file(tmp_path: Path) -> None:
    log = tmp_path / "worker-w-test.log"
    env = {**os.environ, "RBEE_LOG_FILE": str(log), "RBEE_LOG_MAX_BYTES": "4000"}
    with open(log, "ab") as handle:  # as the spawner does: stdout and stderr into the log
        subprocess.run([sys.executable, "-c", SCRIPT], env=env, stdout=handle, stderr=handle, check=True,
                       timeout=60)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["worker-w-test.log", "worker-w-test.log.1", "worker-w-test.log.2"], files
    assert all((tmp_path / name).stat().st_size <= 4000 + 200 for name in files)
    assert "RAW-STDERR-AFTER-ROLLOVER" in log.read_text()
    assert "line 299 of a long-running role" in log.read_text()
