"""What this host computes with: CPU and RAM, NVIDIA GPUs (NVML), Apple Silicon.

Each probe is a command (or library call) plus a pure parser, so parsing is
tested on captured outputs from hosts we do not have.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from typing import Any

import psutil

SYSCTL_KEYS = ("hw.memsize", "machdep.cpu.brand_string", "hw.perflevel0.physicalcpu", "hw.optional.arm64")


def probe() -> dict[str, Any]:
    """The host now. What cannot change while the hive runs (OS, chip, whether NVML loads)
    is probed once; free memory is read on every call (each job and heartbeat asks)."""
    memory = psutil.virtual_memory()
    fixed = _fixed()
    devices: dict[str, Any] = {
        "os": fixed["os"],
        "arch": fixed["arch"],
        # load: percent busy since the previous probe (a heartbeat's interval)
        "cpu": {"cores": fixed["cores"], "ram_total": memory.total, "ram_free": memory.available,
                "load": psutil.cpu_percent(interval=None)},
        "gpus": nvidia_gpus(),
    }
    apple = fixed["apple"]
    if apple.get("apple_silicon"):
        devices["gpus"].append(
            {"kind": "metal", "name": apple.get("chip", "Apple Silicon"), "memory_total": apple.get("memory", 0),
             "memory_free": memory.available, "unified": True}
        )
    return devices


@functools.cache
def _fixed() -> dict[str, Any]:
    system = platform.system().lower()
    return {
        "os": system,
        "arch": platform.machine().lower(),
        "cores": os.cpu_count() or 1,
        "apple": parse_sysctl(_run(["sysctl", *SYSCTL_KEYS])) if system == "darwin" else {},
    }


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def parse_sysctl(output: str) -> dict[str, Any]:
    """``sysctl hw.memsize machdep.cpu.brand_string …`` on macOS → chip, memory, Apple Silicon or not."""
    values: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    chip = values.get("machdep.cpu.brand_string", "")
    return {
        "chip": chip,
        "memory": int(values.get("hw.memsize", "0") or 0),
        "apple_silicon": values.get("hw.optional.arm64") == "1" or chip.startswith("Apple"),
    }


def nvidia_gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs through NVML; none when the library or a driver is missing."""
    nvml = _nvml()
    if nvml is None:
        return []
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        gpus.append(parse_nvml(index, nvml.nvmlDeviceGetName(handle), memory.total, memory.free))
    return gpus


@functools.cache
def _nvml() -> Any:
    """pynvml, initialised once for the process (loading the driver library per call cost
    more than the rest of a job's setup), or None without library or driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def parse_nvml(index: int, name: str | bytes, total: int, free: int) -> dict[str, Any]:
    label = name.decode() if isinstance(name, bytes) else name
    return {"kind": "cuda", "index": index, "name": label, "memory_total": int(total), "memory_free": int(free),
            "unified": False}


def free_memory(devices: dict[str, Any], budget: int, reserved: int) -> tuple[int, str]:
    """Bytes a new worker may use, and where: the largest GPU pool (a CUDA build of llama.cpp
    offloads there), else RAM. A configured ``budget`` caps what rbee's workers may use in all."""
    best, where = int(devices["cpu"]["ram_free"]), "RAM"
    for gpu in devices.get("gpus", []):
        if gpu.get("kind") == "cuda" and gpu["memory_free"] > best:
            best, where = int(gpu["memory_free"]), f"VRAM of {gpu['name']}"
    if budget > 0:
        best = min(best, budget - reserved)
        where += f" (budget {budget / 1e9:.2f} GB, {reserved / 1e9:.2f} GB held by workers)"
    return max(best, 0), where
