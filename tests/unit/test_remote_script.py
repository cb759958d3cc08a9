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


def test_the_host_hashes_what_the_queen_pushed_and_drops_what_it_did_not(tmp_path: Path) -> None:
    """Issue 23.16: a wheel already on a host was reused when its size matched. Now the host
    reports each named file's sha256 (the queen re-pushes any that differ and checks again
    before pip runs), and removes package files the queen did not name."""
    import hashlib

    from rbee.queen.fleet.wheelhouse import sha256_file

    good = tmp_path / "rbee-1.0-py3-none-any.whl"
    good.write_bytes(b"the queen's wheel")
    same_size = tmp_path / "httpx-0.28.1-py3-none-any.whl"
    same_size.write_bytes(b"a planted wheel!!")  # as long as the real one
    stray = tmp_path / "httpx-0.28.1-py3-none-any.build1.whl"
    stray.write_bytes(b"planted")
    (tmp_path / "notes.txt").write_text("kept")
    found = script("verify", str(tmp_path), json.dumps([good.name, same_size.name, "missing.whl"]))
    assert found == {good.name: hashlib.sha256(b"the queen's wheel").hexdigest(),
                     same_size.name: hashlib.sha256(b"a planted wheel!!").hexdigest()}
    assert not stray.exists() and (tmp_path / "notes.txt").exists()
    assert sha256_file(good) == found[good.name] == sha256_file(good)  # the second from its memo
