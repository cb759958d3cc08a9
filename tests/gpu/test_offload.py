"""On a real GPU: every layer offloaded by default, what the worker reports comes from the
engine, and offload pays (the chain with offload ≥ 5× the same chain with gpu_layers = 0,
same card, same run). The figures land in $OUT for `python -m bench.gpu --render`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.gpu import measure

pytestmark = pytest.mark.timeout(900)


async def test_offload_by_default_and_its_speed_up(gpu_model: Path) -> None:
    results = await measure(gpu_model, max_tokens=128, runs=3)
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / "benchmarks-gpu.json").write_text(json.dumps(results, indent=1))
    offloaded, on_cpu = sorted(results["workers"], key=lambda w: w["gpu_layers"] == 0)
    assert offloaded["gpu_layers"] == -1 and offloaded["device"].startswith("CUDA"), offloaded
    assert offloaded["layers_offloaded"] == offloaded["layers_total"] > 0, offloaded
    assert offloaded["weights_on_device"] > 1e9 and offloaded["gpu_offload_supported"], offloaded
    assert on_cpu["device"] == "CPU" and on_cpu["layers_offloaded"] == 0, on_cpu
    assert results["offload speed-up"] >= 5, results
    assert results["chain / in-process"] > 0, results
