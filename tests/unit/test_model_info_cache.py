"""Issue 24.3: no per-job work proportional to the model: a ``file:`` model's GGUF header is
read once per (size, mtime), and a model in place is found without waiting on another job's
provisioning lock."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from rbee.hive import models
from rbee.hive.models import ModelCatalog
from tests.tiny_gguf import write_tiny_model


def test_a_file_model_is_read_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiny_model(tmp_path / "tiny.gguf")
    reads: list[Path] = []
    real = models.read_info
    monkeypatch.setattr(models, "read_info", lambda p: reads.append(p) or real(p))
    catalog = ModelCatalog(tmp_path / "catalog")
    first = catalog.find(f"file:{path}")
    assert first is not None and first.info.layers == 2
    for _ in range(5):
        assert catalog.find(f"file:{path}") is first
    assert reads == [path]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten in place
    assert catalog.find(f"file:{path}") is not first and reads == [path, path]


def test_a_model_in_place_does_not_wait_for_another_provisioning(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "tiny.gguf")
    catalog = ModelCatalog(tmp_path / "catalog")
    ref = f"file:{path}"
    catalog.find(ref)
    held = catalog._provisioning[f"{ref}|None"]
    with held:  # another job is setting this reference up
        found: list[object] = []
        worker = threading.Thread(target=lambda: found.append(catalog.resolve(ref, lambda *a, **k: None)))
        worker.start()
        worker.join(5)
    assert found and not worker.is_alive()
