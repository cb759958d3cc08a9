"""Device probing: the parsers on captured outputs, and the probe on this host."""

from __future__ import annotations

from rbee.hive import devices
from rbee.hive.devices import free_memory, parse_nvml, parse_sysctl

SYSCTL_M2 = """hw.memsize: 68719476736
machdep.cpu.brand_string: Apple M2 Max
hw.perflevel0.physicalcpu: 8
hw.optional.arm64: 1
"""
SYSCTL_INTEL = """hw.memsize: 17179869184
machdep.cpu.brand_string: Intel(R) Core(TM) i7-8850H CPU @ 2.60GHz
hw.perflevel0.physicalcpu: 6
"""


def test_sysctl_on_apple_silicon_and_intel() -> None:
    assert parse_sysctl(SYSCTL_M2) == {"chip": "Apple M2 Max", "memory": 68719476736, "apple_silicon": True}
    assert parse_sysctl(SYSCTL_INTEL)["apple_silicon"] is False
    assert parse_sysctl("") == {"chip": "", "memory": 0, "apple_silicon": False}


def test_nvml_names_may_be_bytes() -> None:
    gpu = parse_nvml(0, b"NVIDIA GeForce RTX 4090", 24 * 2**30, 20 * 2**30)
    assert gpu["name"] == "NVIDIA GeForce RTX 4090" and gpu["kind"] == "cuda" and not gpu["unified"]


def test_free_memory_takes_the_largest_pool_and_the_budget() -> None:
    host = {"cpu": {"ram_free": 8 * 10**9}, "gpus": [parse_nvml(0, "RTX", 24 * 10**9, 20 * 10**9)]}
    assert free_memory(host, 0, 0) == (20 * 10**9, "VRAM of RTX")
    free, where = free_memory(host, 5 * 10**9, 2 * 10**9)
    assert free == 3 * 10**9 and "budget 5.00 GB" in where
    assert free_memory(host, 1 * 10**9, 2 * 10**9)[0] == 0


def test_probe_reads_free_memory_every_time_and_the_rest_once() -> None:
    first, second = devices.probe(), devices.probe()
    assert first["cpu"]["cores"] >= 1 and first["cpu"]["ram_total"] > first["cpu"]["ram_free"] > 0
    assert first["os"] == second["os"] and first["arch"] == second["arch"]
    assert devices._fixed.cache_info().hits >= 1
