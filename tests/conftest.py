"""Fixtures shared by every test tier: an isolated RBEE_HOME per test and the check
that nothing a test started is left running."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rbee.hive.models import ModelCatalog

REPO = Path(__file__).resolve().parent.parent


def processes_of(home: Path) -> list[psutil.Process]:
    """Every live process whose environment names ``home`` as RBEE_HOME (what a test started)."""
    found = []
    for process in psutil.process_iter(["pid"]):
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get("RBEE_HOME") == str(home) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The catalog with the default model assembled once for the whole run."""
    root = Path(os.environ.get("RBEE_TEST_MODELS_DIR") or tmp_path_factory.mktemp("models"))
    ModelCatalog(root).resolve(None, lambda action, message: None)
    return root


@pytest.fixture
def rbee_env(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Environment for rbee processes of one test; at teardown, none of them may be left."""
    home = tmp_path / "rbee-home"
    settings = {
        "RBEE_HOME": str(home),
        "RBEE_MODELS_DIR": str(models_dir),
        "RBEE_HEARTBEAT_INTERVAL": "0.5",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)  # for children this test process starts itself
    env = {
        **os.environ,
        "RBEE_QUEEN_URL": "http://127.0.0.1:9",  # nothing listens: each test gets its own queen
        "PYTHONUNBUFFERED": "1",
    }
    yield env
    assert_no_orphans(home)


def assert_no_orphans(home: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    left = processes_of(home)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = processes_of(home)
    if left:
        described = [f"{p.pid}: {' '.join(p.cmdline())}" for p in left]
        for process in left:
            process.kill()
        pytest.fail("processes left running after the test:\n" + "\n".join(described))
