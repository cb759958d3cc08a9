"""The GPU section of docs/benchmarks.md is made by bench/gpu.py and survives the CPU bench."""

from __future__ import annotations

from pathlib import Path

from bench.gpu import END, START, render, splice
from bench.run import write_doc

RESULTS = {
    "card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "model": "/tmp/m.gguf", "max_tokens": 128, "runs": 3,
    "in-process n_gpu_layers=-1": {"decode_tps": 660.0, "ttft_ms": 2.0, "tokens": 128},
    "rbee chain (default: offload)": {"decode_tps": 500.0, "ttft_ms": 9.0, "tokens": 128},
    "rbee chain gpu_layers=0": {"decode_tps": 40.0, "ttft_ms": 30.0, "tokens": 128},
    "offload speed-up": 12.5, "chain / in-process": 0.7576,
    "workers": [{"gpu_layers": -1, "device": "CUDA0 (NVIDIA H100 80GB HBM3)", "layers_offloaded": 17,
                 "layers_total": 17, "weights_on_device": 1_900_000_000, "kv_on_device": 100_000_000, "n_ctx": 4096}],
    "concurrency": [{"system": "rbee chain", "streams": 1, "aggregate_tps": 600.0, "ttft_p50_ms": 40.0,
                     "ttft_p95_ms": 40.0},
                    {"system": "rbee chain", "streams": 8, "aggregate_tps": 1500.0, "ttft_p50_ms": 200.0,
                     "ttft_p95_ms": 220.0}],
}


def test_render_and_splice(tmp_path: Path) -> None:
    section = render(RESULTS)
    assert section.startswith(START) and section.endswith(END)
    assert "NVIDIA H100 80GB HBM3" in section and "12.5×" in section and "| -1 | CUDA0" in section
    assert "| 8 | 1500 | 2.5 | 200 | 220 |" in section
    doc = splice("# Benchmarks\n\nCPU figures\n", section)
    assert doc.count(START) == 1 and "CPU figures" in doc
    assert splice(doc, section.replace("12.5", "13.0")).count(START) == 1
    page = tmp_path / "benchmarks.md"
    page.write_text(doc)
    write_doc(page, "# Benchmarks\n\nnew CPU figures\n")
    assert "new CPU figures" in page.read_text() and "12.5×" in page.read_text()
