"""The GPU section of docs/benchmarks.md is made by bench/gpu.py and survives the CPU bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.gpu import END, START, render, splice
from bench.hot_path import binding, targets
from bench.run import write_doc


def row(system: str, streams: int, aggregate: float, ttft: float) -> dict[str, Any]:
    return {"system": system, "round": 0, "streams": streams, "tokens": streams * 128,
            "aggregate_tok_s": aggregate, "decode_tok_s": aggregate * 1.1, "ttft_p50_ms": ttft, "ttft_p95_ms": ttft}


HOT_PATH = {
    "date": "2026-12-02 12:00 UTC", "model": "/tmp/m.gguf", "levels": [1, 8, 32], "tokens": 128, "rounds": 1,
    "threads": 16, "gpu_layers": -1, "tools": "/tmp/llama-bin",
    "batched_bench": {"1": {"t_pp_s": 0.01, "s_pp": 12800.0, "s_tg": 650.0},
                      "8": {"t_pp_s": 0.015, "s_pp": 68000.0, "s_tg": 4000.0},
                      "32": {"t_pp_s": 0.04, "s_pp": 100000.0, "s_tg": 9000.0}},
    "rows": [row("rbee", 1, 600.0, 20.0), row("rbee", 8, 3500.0, 35.0), row("rbee", 32, 7000.0, 90.0),
             row("llama-server", 1, 610.0, 18.0), row("llama-server", 8, 3600.0, 30.0),
             row("llama-server", 32, 8000.0, 80.0), row("rbee, one stream with logprobs", 8, 3300.0, 36.0)],
    "workers": [{"backend": "llama-cpp", "engine": {"device": "CUDA0"}, "n_ctx": 32768, "gpu_layers": -1,
                 "load": {"step_ms": {"steps": 900.0, "decode": 1.7, "sample": 0.3, "loop": 0.1}}}],
}

RESULTS = {
    "card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "model": "/tmp/m.gguf", "max_tokens": 128, "runs": 3,
    "rbee chain (default: offload)": {"decode_tps": 500.0, "ttft_ms": 9.0, "tokens": 128},
    "rbee chain gpu_layers=0": {"decode_tps": 40.0, "ttft_ms": 30.0, "tokens": 128},
    "offload speed-up": 12.5,
    "workers": [{"gpu_layers": -1, "device": "CUDA0 (NVIDIA H100 80GB HBM3)", "layers_offloaded": 17,
                 "layers_total": 17, "weights_on_device": 1_900_000_000, "kv_on_device": 100_000_000, "n_ctx": 4096}],
    "hot path": HOT_PATH,
}


def test_render_and_splice(tmp_path: Path) -> None:
    section = render(RESULTS)
    assert section.startswith(START) and section.endswith(END)
    assert "NVIDIA H100 80GB HBM3" in section and "12.5×" in section and "| -1 | CUDA0" in section
    assert "| rbee | 8 | 3500.0 | 3850.0 | 5.83 | 35 | 35 |" in section
    assert "decode 1.70, sampling and the rest of the step 0.30, the loop's own work 0.10" in section
    doc = splice("# Benchmarks\n\nCPU figures\n", section)
    assert doc.count(START) == 1 and "CPU figures" in doc
    assert splice(doc, section.replace("12.5", "13.0")).count(START) == 1
    page = tmp_path / "benchmarks.md"
    page.write_text(doc)
    write_doc(page, "# Benchmarks\n\nnew CPU figures\n")
    assert "new CPU figures" in page.read_text() and "12.5×" in page.read_text()


def test_the_gpu_targets_are_judged_from_the_figures() -> None:
    """Each of the issue's GPU rows, computed as the section renders it; one made to fail."""
    rows = {name: met for name, _, met in targets(HOT_PATH)}
    assert len(rows) == 6 and all(rows.values()), rows  # 5.83 ≥ 5 and ≥ 0.85 × 6.15, 0.97, 0.875, 1.02, 1.75, 0.94
    slow = {**HOT_PATH, "rows": [r if r["streams"] != 32 or r["system"] != "rbee" else row("rbee", 32, 5000.0, 90.0)
                                 for r in HOT_PATH["rows"]]}
    judged = {name: met for name, _, met in targets(slow)}
    assert [name for name, met in judged.items() if not met] == ["rbee ÷ llama-server at 32 streams, same harness, "
                                                                  "≥ 0.75"]
    cpu = {**HOT_PATH, "gpu_layers": None}  # on the CPU: no 5× floor, no 32-stream row, TTFT bound 3
    assert all(met for _, _, met in targets(cpu)) and len(targets(cpu)) == 5
    # prompts 8× as slow together as alone in the engine itself: the TTFT bound is restated to that
    slow_prompts = {**HOT_PATH, "batched_bench": {**HOT_PATH["batched_bench"], "8": {
        "t_pp_s": 0.08, "s_pp": 3200.0, "s_tg": 4000.0}}, "rows": [
        r if r["streams"] != 8 or r["system"] != "rbee" else row("rbee", 8, 3500.0, 140.0) for r in HOT_PATH["rows"]]}
    judged = targets(slow_prompts)
    assert [name[:9] for name, _, met in judged if not met] == ["TTFT p95 "]  # 7× > 2
    assert [met for name, _, met in judged if name.startswith("restated")] == [True]  # 7 ≤ 8
    assert all(met for _, _, met in binding(judged)) and len(binding(judged)) == 6
