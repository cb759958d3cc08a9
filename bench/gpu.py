"""GPU figures: the rbee chain with every layer offloaded against the same chain on the CPU
(``gpu_layers = 0``), then the engine's hot path (bench/hot_path.py) against llama.cpp's own
``llama-batched-bench`` and ``llama-server`` at 1, 8 and 32 streams, on one card in one run. Needs
an NVIDIA GPU, llama-cpp-python built with CUDA and the two tools from the same build
(``../shared/gpu/on-device`` puts them in /tmp/llama-bin).

    python -m bench.gpu --model /tmp/m.gguf --json $OUT/benchmarks-gpu.json   (on the GPU machine)
    python -m bench.gpu --render $OUT/benchmarks-gpu.json                     (here: writes the section)

No in-process row: llama-cpp-python's ``create_completion`` re-detokenises all the text made so
far at every step, so its rate was no baseline (batched-bench is the engine's own ceiling). The
section goes into docs/benchmarks.md between GPU markers, so the CPU bench keeps it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import hot_path, systems
from bench.systems import Sample

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- gpu:start -->", "<!-- gpu:end -->"
PROMPT = "Once upon a time, in a village by the sea, there lived"


def card() -> str:
    import pynvml

    pynvml.nvmlInit()
    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    return name.decode() if isinstance(name, bytes) else str(name)


async def _measure(system: str, pieces: Any, runs: int) -> list[Sample]:
    samples = []
    for run in range(runs + 1):  # the first run warms up (loads, compiles kernels) and is dropped
        tokens, ttft, wall = await systems.timed(pieces())
        if run:
            samples.append(Sample(system, "story", "warm", tokens, ttft, wall))
    return samples


def summary(samples: list[Sample]) -> dict[str, float]:
    return {"decode_tps": statistics.median(s.decode_tps for s in samples),
            "ttft_ms": 1000 * statistics.median(s.ttft_s for s in samples),
            "tokens": statistics.median(s.tokens for s in samples)}


async def measure(model: Path, tools: Path, max_tokens: int = 128, runs: int = 3,
                  levels: tuple[int, ...] = (1, 8, 32)) -> dict[str, Any]:
    """The rbee chain with offload (the default) and with ``gpu_layers = 0``, with the workers'
    own reports of where the model went; then the hot path at ``levels`` streams."""
    results: dict[str, Any] = {"card": card(), "date": datetime.date.today().isoformat(), "model": str(model),
                               "max_tokens": max_tokens, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="rbee-gpu-") as home:
        async with systems.Rbee(Path(home)) as rbee:
            ref = f"file:{model}"
            for label, fields in (("rbee chain (default: offload)", {}), ("rbee chain gpu_layers=0",
                                                                           {"gpu_layers": 0})):
                samples = await _measure(label, lambda f=fields: rbee.pieces(PROMPT, max_tokens, model=ref, **f),
                                         runs)
                results[label] = summary(samples)
            results["workers"] = [{"gpu_layers": w["gpu_layers"], "n_ctx": w["n_ctx"], **w["engine"]}
                                  for w in await rbee.workers()]
    chain, cpu = (results[k]["decode_tps"] for k in ("rbee chain (default: offload)", "rbee chain gpu_layers=0"))
    results["offload speed-up"] = chain / cpu if cpu else 0.0
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    results["hot path"] = await hot_path.measure(model, tools, list(levels), max_tokens, gpu_layers=-1, say=say)
    return results


def render(results: dict[str, Any]) -> str:
    rows = [f"| {name} | {results[name]['decode_tps']:.0f} | {results[name]['ttft_ms']:.1f} |"
            for name in ("rbee chain (default: offload)", "rbee chain gpu_layers=0")]
    workers = [f"| {w['gpu_layers']} | {w['device']} | {w['layers_offloaded']}/{w['layers_total']} | "
               f"{(w['weights_on_device'] + w['kv_on_device']) / 1e6:.0f} MB | {w['n_ctx']} |"
               for w in results["workers"]]
    return "\n".join([
        START,
        "## GPU (scripts: `bench/gpu.py`, run by `tests/gpu/` on a lent GPU machine)",
        "",
        f"{results['date']}, {results['card']}, `{Path(results['model']).name}` (../shared/gpu/make_gguf.py, "
        f"1B F16, random weights), {results['max_tokens']} tokens, temperature 0, median of {results['runs']} "
        "warm runs; everything below in the same run.",
        "",
        "| system | decode tok/s | TTFT ms |",
        "|---|---|---|",
        *rows,
        "",
        f"Offload speed-up of the chain: **{results['offload speed-up']:.1f}×** (target ≥ 5×).",
        "",
        "What the workers reported (from llama.cpp's own load log):",
        "",
        "| gpu_layers asked | device | layers offloaded | device memory | context |",
        "|---|---|---|---|---|",
        *workers,
        "",
        "The engine's hot path against llama.cpp's own tools (bench/hot_path.py):",
        "",
        *hot_path.render(results["hot path"]),
        END,
    ])


def splice(document: str, section: str) -> str:
    """Replace the GPU section of ``document``, or append it."""
    if START in document and END in document:
        head, rest = document.split(START, 1)
        return head + section + rest.split(END, 1)[1]
    return document.rstrip() + "\n\n" + section + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu")
    parser.add_argument("--model", type=Path, default=Path("/tmp/m.gguf"))
    parser.add_argument("--tools", type=Path, default=Path("/tmp/llama-bin"), help="llama.cpp's tools, same build")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks-gpu.json")
    parser.add_argument("--render", type=Path, help="only render this JSON into docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        results = asyncio.run(measure(args.model, args.tools))
        args.json.write_text(json.dumps(results, indent=1))
    args.doc.write_text(splice(args.doc.read_text() if args.doc.exists() else "", render(results)))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
