"""rbee benchmarks: every system measured in one run, on the same model and prompts.

    scripts/bench [--quick] [--runs N] [--max-tokens N] [--out docs/benchmarks.md]

Systems (each one only when it can run here):
  in-process   llama-cpp-python called directly: the limit for this stack
  rbee-chain   keeper → queen → hive → worker through the dual-call link

Per system and prompt: time to first token (TTFT), decode tokens/s (tokens
after the first, over the time after the first), end-to-end wall time. For
rbee: CPU time per token spent in the queen and hive processes, and the
chain ÷ in-process ratio. Cold = the first request (includes loading).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PROMPTS: dict[str, str] = json.loads((ROOT / "bench" / "prompts.json").read_text())
SEED = 1234


@dataclass
class Sample:
    system: str
    prompt: str
    phase: str  # cold | warm
    tokens: int
    ttft_s: float
    wall_s: float

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.wall_s - self.ttft_s) if self.tokens > 1 and self.wall_s > self.ttft_s else 0.0


@dataclass
class Report:
    samples: list[Sample] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def of(self, system: str, phase: str = "warm") -> list[Sample]:
        return [s for s in self.samples if s.system == system and s.phase == phase]


def timed_stream(pieces: Iterator[str], started: float) -> tuple[int, float, float]:
    """Consume a token stream; return (tokens, ttft, wall) measured from ``started``."""
    first = None
    tokens = 0
    for _ in pieces:
        if first is None:
            first = time.perf_counter() - started
        tokens += 1
    return tokens, first or 0.0, time.perf_counter() - started


def bench_in_process(model: Path, prompts: dict[str, str], runs: int, max_tokens: int, report: Report) -> None:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=str(model), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    report.extras["in-process load_s"] = time.perf_counter() - started

    def pieces(prompt: str) -> Iterator[str]:
        for chunk in llm.create_completion(
            prompt, max_tokens=max_tokens, temperature=0.0, seed=SEED, stream=True
        ):
            if chunk["choices"][0]["text"]:
                yield chunk["choices"][0]["text"]

    for phase, count in (("cold", 1), ("warm", runs)):
        for name, prompt in prompts.items():
            for _ in range(count):
                t0 = time.perf_counter()
                tokens, ttft, wall = timed_stream(pieces(prompt), t0)
                report.samples.append(Sample("in-process", name, phase, tokens, ttft, wall))
            if phase == "cold":
                break
    llm.close()


async def bench_chain(home: Path, prompts: dict[str, str], runs: int, max_tokens: int, report: Report) -> None:
    from rbee.config import QueenConfig, ServeOptions
    from rbee.keeper.session import start_queen
    from rbee.link.client import LinkClient

    config = QueenConfig(home=home, ephemeral=True, serve=ServeOptions())
    started = time.perf_counter()
    queen = await start_queen(config, ephemeral=True)
    report.extras["rbee queen start_s"] = time.perf_counter() - started
    try:
        async with LinkClient(queen.url, "queen", stall_timeout=None) as client:

            async def one(prompt: str) -> tuple[int, float, float]:
                t0 = time.perf_counter()
                first = None
                tokens = 0
                async for event in client.run(
                    {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED}
                ):
                    if event.type == "token":
                        tokens += 1
                        if first is None:
                            first = time.perf_counter() - t0
                    elif event.type == "error":
                        raise RuntimeError(event["message"])
                return tokens, first or 0.0, time.perf_counter() - t0

            names = list(prompts)
            tokens, ttft, wall = await one(prompts[names[0]])
            report.samples.append(Sample("rbee-chain", names[0], "cold", tokens, ttft, wall))
            async with httpx.AsyncClient(base_url=queen.url) as http:
                hive = (await http.get("/v1/hives")).json()["hives"][0]
            roles = {"queen": psutil.Process(queen.pid), "hive": psutil.Process(hive_pid(hive))}
            cpu_before = {name: cpu_seconds(p) for name, p in roles.items()}
            warm_tokens = 0
            for name in names:
                for _ in range(runs):
                    tokens, ttft, wall = await one(prompts[name])
                    warm_tokens += tokens
                    report.samples.append(Sample("rbee-chain", name, "warm", tokens, ttft, wall))
            for role, process in roles.items():
                spent = cpu_seconds(process) - cpu_before[role]
                report.extras[f"rbee {role} CPU per token (µs)"] = spent / max(warm_tokens, 1) * 1e6
    finally:
        await queen.stop(grace=20.0)


def hive_pid(hive: dict[str, Any]) -> int:
    pid = hive.get("pid")
    if not isinstance(pid, int):
        raise RuntimeError("the hive's heartbeat carries no pid")
    return pid


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    return f"{min(values):.3g}–{max(values):.3g}" if values else "-"


def render(report: Report, args: argparse.Namespace) -> str:
    import llama_cpp

    from rbee import __version__

    lines = [
        "# Benchmarks",
        "",
        "Generated by `scripts/bench" + (" --quick" if args.quick else "") + "`; do not edit by hand.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}",
        f"- versions: rbee {__version__}, llama-cpp-python {llama_cpp.__version__}, Python {platform.python_version()}",
        f"- model: built-in default (gemma3-270m Q4_K_M); temperature 0, seed {SEED}, max_tokens {args.max_tokens}",
        f"- warm runs per prompt: {args.runs}; prompts: {', '.join(PROMPTS)} (bench/prompts.json)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "## Per system (warm; median and min–max over runs)",
        "",
        "| system | prompt | TTFT ms | decode tok/s | wall s | tokens |",
        "|---|---|---|---|---|---|",
    ]
    systems = sorted({s.system for s in report.samples}, key=lambda name: SYSTEM_ORDER.index(name))
    for system in systems:
        for prompt in PROMPTS:
            warm = [s for s in report.of(system) if s.prompt == prompt]
            if not warm:
                continue
            ttft = [s.ttft_s * 1000 for s in warm]
            tps = [s.decode_tps for s in warm]
            wall = [s.wall_s for s in warm]
            lines.append(
                f"| {system} | {prompt} | {median(ttft):.1f} ({spread(ttft)}) | {median(tps):.1f} ({spread(tps)}) "
                f"| {median(wall):.2f} | {median([float(s.tokens) for s in warm]):.0f} |"
            )
    lines += ["", "## Chain ÷ in-process (warm medians over all prompts)", ""]
    base = report.of("in-process")
    for system in systems:
        if system == "in-process" or not base:
            continue
        mine = report.of(system)
        ratio = median([s.decode_tps for s in mine]) / median([s.decode_tps for s in base])
        added = median([s.ttft_s for s in mine]) - median([s.ttft_s for s in base])
        lines.append(f"- {system}: decode tokens/s ratio **{ratio:.3f}**; added TTFT **{added * 1000:+.1f} ms**")
    lines += ["", "## Cold (first request, includes starting and loading)", ""]
    for system in systems:
        for s in report.of(system, "cold"):
            lines.append(f"- {system} ({s.prompt}): TTFT {s.ttft_s * 1000:.0f} ms, wall {s.wall_s:.2f} s")
    lines += ["", "## Other figures", ""]
    for key, value in report.extras.items():
        lines.append(f"- {key}: {value:.3g}")
    return "\n".join(lines) + "\n"


SYSTEM_ORDER = ["in-process", "rbee-chain"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and tokens (a few minutes)")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.max_tokens = args.max_tokens or (64 if args.quick else 128)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from rbee.config import models_dir
    from rbee.hive.models import ModelCatalog

    model = ModelCatalog(models_dir()).resolve(None, lambda action, message: print(message, file=sys.stderr))
    report = Report()
    print("in-process llama-cpp-python …", file=sys.stderr)
    bench_in_process(model, PROMPTS, args.runs, args.max_tokens, report)
    print("rbee chain …", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as home:
        asyncio.run(bench_chain(Path(home), PROMPTS, args.runs, args.max_tokens, report))
    text = render(report, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps([asdict(s) for s in report.samples], indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
