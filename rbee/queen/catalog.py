"""The hive catalog: every hive the queen ever installed, in SQLite (``RBEE_HOME/queen.db``).

Live state (up/down, workers) is in the in-memory registry; this keeps what must
survive a queen restart: how to reach each host, what was installed there, and
whether the fleet launched it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS hives (
    name TEXT PRIMARY KEY,
    entry TEXT NOT NULL,
    install_state TEXT NOT NULL DEFAULT 'unknown',
    version TEXT,
    digest TEXT,
    devices TEXT NOT NULL DEFAULT '{}',
    launched INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class HiveRecord:
    name: str
    entry: dict[str, Any]
    install_state: str
    version: str | None
    digest: str | None
    devices: dict[str, Any]
    launched: bool
    updated_at: float


class HiveCatalog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def upsert(self, name: str, entry: dict[str, Any], **fields: Any) -> None:
        columns = {"entry": json.dumps(entry), "updated_at": time.time()}
        for key, value in fields.items():
            columns[key] = json.dumps(value) if key == "devices" else value
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        updates = ", ".join(f"{key}=excluded.{key}" for key in columns)
        self._db.execute(
            f"INSERT INTO hives (name, {names}) VALUES (?, {marks}) ON CONFLICT(name) DO UPDATE SET {updates}",
            (name, *columns.values()),
        )

    def update(self, name: str, **fields: Any) -> None:
        if not fields:
            return
        values = [json.dumps(v) if k == "devices" else v for k, v in fields.items()]
        sets = ", ".join(f"{key}=?" for key in fields)
        self._db.execute(f"UPDATE hives SET {sets}, updated_at=? WHERE name=?", (*values, time.time(), name))

    def get(self, name: str) -> HiveRecord | None:
        row = self._db.execute("SELECT * FROM hives WHERE name=?", (name,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[HiveRecord]:
        return [_record(row) for row in self._db.execute("SELECT * FROM hives ORDER BY name")]

    def remove(self, name: str) -> None:
        self._db.execute("DELETE FROM hives WHERE name=?", (name,))


def _record(row: tuple[Any, ...]) -> HiveRecord:
    name, entry, state, version, digest, devices, launched, updated = row
    return HiveRecord(name, json.loads(entry), state, version, digest, json.loads(devices), bool(launched), updated)
