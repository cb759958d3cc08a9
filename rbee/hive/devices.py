"""What this host can compute with. Issue-5 work extends this with GPUs; for now CPU and RAM."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil


def probe() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "os": platform.system().lower(),
        "arch": platform.machine().lower(),
        "cpu": {"cores": os.cpu_count() or 1, "ram_total": memory.total, "ram_free": memory.available},
        "gpus": [],
    }
