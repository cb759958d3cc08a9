"""rbee benchmarks: every system measured in one run, on the same model and prompts.

    scripts/bench [--quick] [--runs N] [--max-tokens N] [--out docs/benchmarks.md]
    scripts/bench --only hot-path     measure that section again, keep the rest from benchmarks.json
    scripts/bench --only split        the same for the split section
    scripts/bench --setup             build llama.cpp's own tools (bench/llama_tools.py) and stop

Systems (same model — the built-in default —, prompts, temperature 0, seed, max_tokens):
  in-process          llama-cpp-python called directly, token by token: the limit for this stack
  llama_cpp.server    llama-cpp-python's own OpenAI server over HTTP
  rbee chain          keeper → queen → hive → worker through the dual-call link
  queen OpenAI API    /v1/completions on the queen (the same chain underneath)
  rbee over SSH       the hive on a loopback sshd host, reached through the SSH tunnel
Plus concurrency (1/2/4/8 streams at once to rbee's batching worker and to llama_cpp.server),
`fleet up` timings, the portable llama.cpp build rbee installs against a native one on this
CPU (bench/cpu_builds.py), and the engine's hot path against llama.cpp's own batched-bench and
llama-server at 1 and 8 streams (bench/hot_path.py), and a model split with llama.cpp's RPC
backend against the same engine unsplit (bench/split.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import cpu_builds, dialects, gpu, hot_path, link_chain, split, systems
from bench.systems import Sample

ROOT = Path(__file__).resolve().parent.parent
PROMPTS: dict[str, str] = json.loads((ROOT / "bench" / "prompts.json").read_text())
ORDER = ["in-process", "llama_cpp.server", "rbee chain", "queen OpenAI API", "rbee over SSH"]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    return f"{min(values):.3g}–{max(values):.3g}" if values else "-"


def warm(samples: list[Sample], system: str) -> list[Sample]:
    return [s for s in samples if s.system == system and s.phase == "warm"]


async def collect(args: argparse.Namespace, model: Path, workdir: Path) -> tuple[list[Sample], dict[str, Any]]:
    samples: list[Sample] = []
    extras: dict[str, Any] = {}
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say("1-4/5 in-process, llama_cpp.server, rbee chain, queen OpenAI API: interleaved, round by round")
    in_process = systems.InProcess(model, args.max_tokens, extras)
    try:
        async with contextlib.AsyncExitStack() as stack:
            contenders: dict[str, systems.Pieces] = {"in-process": in_process.pieces}
            try:
                server = await stack.enter_async_context(systems.LlamaServer(model, args.max_tokens, extras))
                contenders["llama_cpp.server"] = server.pieces
            except RuntimeError as exc:
                extras["llama_cpp.server"] = f"not measured: {exc}"
            started = time.perf_counter()
            rbee = await stack.enter_async_context(systems.Rbee(workdir / "queen"))
            extras["rbee queen start (s)"] = time.perf_counter() - started
            queen_http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=rbee.url, timeout=None, headers={"Authorization": f"Bearer {rbee.token}"}))
            contenders["rbee chain"] = lambda prompt: rbee.pieces(prompt, args.max_tokens)
            contenders["queen OpenAI API"] = lambda prompt: systems.openai_pieces(
                queen_http, prompt, args.max_tokens, "gemma3-270m")

            async def rbee_processes() -> dict[str, dict[str, int]]:
                return {"rbee chain": await systems.rbee_pids(rbee, "localhost")}

            samples += await systems.measure(contenders, PROMPTS, args.runs, extras, rbee_processes)
            say("concurrency: 1 to 8 streams at once")
            at_once: dict[str, Callable[[str, int], AsyncIterator[str]]] = {
                "rbee chain": lambda prompt, n: rbee.pieces(prompt, n)}
            if "llama_cpp.server" in contenders:
                at_once["llama_cpp.server"] = lambda prompt, n: systems.openai_pieces(
                    server.http, prompt, n, str(model))
            extras["concurrency"] = await systems.concurrency(at_once, PROMPTS["short"], args.max_tokens, args.levels)
    finally:
        in_process.close()
    say("the link alone: fake worker → relay → client, at the engine's rate and flat out")
    engine_rate = median([s.decode_tps for s in warm(samples, "in-process")])
    extras["link"] = await link_chain.link_costs(engine_rate)
    say("models: first vs warm infer, download speed")
    extras["models"] = await systems.first_vs_warm(workdir / "queen-first", PROMPTS["short"], args.max_tokens)
    extras["models"].update(await asyncio.to_thread(systems.download_speeds, model, workdir / "downloads"))
    say("dialects: time to first token of /api/chat against /v1/chat/completions, taking turns")
    (workdir / "dialects").mkdir()
    extras["dialects"] = await dialects.measure(args.runs * 10, workdir / "dialects")
    reason = systems.sshd_available()
    if reason is None:
        say("5/5 rbee over SSH and fleet up timings")

        async def over_ssh(rbee: systems.Rbee) -> None:
            async def queen_pid() -> dict[str, dict[str, int]]:
                return {"rbee over SSH": await systems.rbee_pids(rbee, "h1")}

            ssh = {"rbee over SSH": lambda prompt: rbee.pieces(prompt, args.max_tokens, node="h1")}
            samples.extend(await systems.measure(ssh, PROMPTS, args.runs, extras, queen_pid))

        extras["fleet"] = await systems.fleet_timings(workdir / "fleet", args.hosts, over_ssh)
    else:
        extras["rbee over SSH"] = f"not measured: {reason}"
    return samples, extras


def measure_hot_path(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    return asyncio.run(hot_path.measure(model, hot_path.default_tools(), [1, 4] if args.quick else [1, 8],
                                        args.max_tokens, rounds=1 if args.quick else 5, say=say))


def measure_split(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    from rbee.hive.gguf_meta import read_info

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    return split.measure(model, read_info(model).layers, args.max_tokens, 2 if args.quick else 3, say,
                         tools=hot_path.default_tools())


def render(samples: list[Sample], extras: dict[str, Any], args: argparse.Namespace, plot: Path | None) -> str:
    import llama_cpp

    from rbee import __version__

    lines = [
        "# Benchmarks",
        "",
        f"Generated by `scripts/bench{' --quick' if args.quick else ''}` — do not edit by hand; "
        f"raw samples in [{args.out.with_suffix('.json').name}]({args.out.with_suffix('.json').name}).",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB "
        f"RAM, {platform.system()} {platform.release()}",
        f"- versions: rbee {__version__}, llama-cpp-python {llama_cpp.__version__}, Python {platform.python_version()}",
        f"- model: the built-in default (gemma3-270m Q4_K_M); temperature 0, seed {systems.SEED}, "
        f"max_tokens {args.max_tokens}; prompts short/medium/long from bench/prompts.json",
        f"- warm runs per prompt and system: {args.runs}; medians with min–max; date "
        f"{extras.get('date') or now()} (a section remeasured with `--only` gives its own)",
        "- TTFT: request sent → first non-empty text at the client; decode tok/s: tokens after the first "
        "÷ time after the first; wall: request → end of stream",
        "- order: in-process, llama_cpp.server, rbee chain and the queen's OpenAI API take turns, round by "
        "round, so drift of this shared VM's speed moves them alike; rbee over SSH runs later, with the "
        "fleet timings",
        "",
    ]
    if plot is not None:
        lines += [f"![tokens/s and TTFT per system]({plot.name})", ""]
    lines += ["## Per system, warm", "", "| system | prompt | TTFT ms | decode tok/s | wall s | tokens |",
              "|---|---|---|---|---|---|"]
    present = [name for name in ORDER if warm(samples, name)]
    for system in present:
        for prompt in PROMPTS:
            rows = [s for s in warm(samples, system) if s.prompt == prompt]
            if rows:
                ttft = [s.ttft_s * 1000 for s in rows]
                tps = [s.decode_tps for s in rows]
                lines.append(
                    f"| {system} | {prompt} | {median(ttft):.1f} ({spread(ttft)}) | {median(tps):.1f} ({spread(tps)}) "
                    f"| {median([s.wall_s for s in rows]):.2f} | {median([float(s.tokens) for s in rows]):.0f} |"
                )
    base = warm(samples, "in-process")
    lines += ["", "## Against in-process (warm medians over all prompts)", "",
              "| system | decode tok/s ratio | added TTFT ms |", "|---|---|---|"]
    for system in present[1:]:
        mine = warm(samples, system)
        ratio = median([s.decode_tps for s in mine]) / median([s.decode_tps for s in base])
        added = (median([s.ttft_s for s in mine]) - median([s.ttft_s for s in base])) * 1000
        lines.append(f"| {system} | {ratio:.3f} | {added:+.1f} |")
    lines += ["", "## Targets (from the issue; what these numbers show)", "", "| target | measured | met |",
              "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if met else 'no'} |" for name, value, met in targets(samples, extras)]
    lines += ["", "## Cold (first request: starting, loading)", ""]
    for system in present:
        for s in (s for s in samples if s.system == system and s.phase == "cold"):
            lines.append(f"- {system} ({s.prompt}): TTFT {s.ttft_s * 1000:.0f} ms, wall {s.wall_s:.2f} s")
    if extras.get("concurrency"):
        lines += ["", "## Concurrency (short prompt, N streams at once to one worker; llama_cpp.server has one slot)",
                  "", "| system | streams | aggregate tok/s | × 1 stream | TTFT p50 ms | TTFT p95 ms |",
                  "|---|---|---|---|---|---|"]
        for row in extras["concurrency"]:
            one = next(r for r in extras["concurrency"] if r["system"] == row["system"] and r["streams"] == 1)
            lines.append(f"| {row['system']} | {row['streams']} | {row['aggregate_tps']:.1f} | "
                         f"{row['aggregate_tps'] / one['aggregate_tps']:.2f} | {row['ttft_p50_ms']:.0f} | "
                         f"{row['ttft_p95_ms']:.0f} |")
    builds = extras.get("cpu builds")
    if isinstance(builds, dict) and "portable / native" in builds:
        lines += ["", "## CPU builds: the portable engine rbee installs against a native build, on this CPU", "",
                  f"Same llama-cpp-python version, same prompts, greedy, {builds['max_tokens']} tokens, "
                  f"{builds['rounds']} rounds taking turns (bench/cpu_builds.py). Portable loads llama.cpp's "
                  f"`{builds['portable_variant']}` CPU variant here; native is `-march=native` "
                  "(GGML_NATIVE=ON, one CPU backend).", "",
                  "| prompt | portable decode tok/s | native decode tok/s | portable ÷ native |", "|---|---|---|---|"]
        for prompt in PROMPTS:
            mine, theirs = builds[f"portable {prompt} decode tok/s"], builds[f"native {prompt} decode tok/s"]
            lines.append(f"| {prompt} | {mine:.1f} | {theirs:.1f} | {mine / theirs:.3f} |")
        lines.append(f"| all (median of per-round medians) | {builds['portable decode tok/s']:.1f} | "
                     f"{builds['native decode tok/s']:.1f} | "
                     f"{builds['portable decode tok/s'] / builds['native decode tok/s']:.3f} |")
        if "paired ratios" in builds:
            ratios = builds["paired ratios"]
            lines += ["", f"Portable ÷ native, paired (same prompt, same round; {len(ratios)} pairs): median "
                          f"**{builds['portable / native']:.3f}**, range {min(ratios):.3f}–{max(ratios):.3f}."]
    if isinstance(extras.get("split"), dict):
        lines += ["", "## A model split across processes with llama.cpp's RPC backend (bench/split.py)", "",
                  "rbee's engine with the share's layers on an RPC share (its own network namespace, reached "
                  "through its unix socket and rbee's bridges) against the same engine with every layer at home, "
                  "taking turns, each load in a fresh process. On one machine both share its cores: this is the "
                  "link's own cost, not what a second machine adds.", ""]
        lines += [f"- {key}: {value:.3g}" if isinstance(value, float) else f"- {key}: {value}"
                  for key, value in extras["split"].items()]
        if "split / llama-server --rpc (client's clock)" in extras["split"]:
            lines += ["", "`llama-server --rpc` runs the same split by hand: its `ggml-rpc-server` on a "
                          "loopback TCP port (no fence), the same layers on it (`-ngl`), context 1024 and "
                          "micro-batch 64 as rbee's split worker, built from the same vendored llama.cpp "
                          "(bench/llama_tools.py). Its decode rate is taken from the token arrivals at its HTTP "
                          "client and from its own `timings`; rbee's split, which needs two hosts to run through "
                          "the fleet, is timed here at its engine's token stream, so the ratio on llama-server's "
                          "own timings is the like-for-like one."]
            if extras["split"].get("llama-server --rpc same text") is False:
                lines += ["", "llama-server's greedy text is not rbee's: it parts at the third token (\"red, blue "
                              "and yellow\" against \"red, yellow and blue\", in every round), while rbee's split and "
                              "unsplit runs agree. Why (its prompt's tokens or its sampler chain at temperature 0) "
                              "is not found yet; what is compared here is the decode rate."]
        lines += ["", "Not measured here: the split across two hosts through the queen's SSH connections (the "
                      "e2e tests run it; on one machine both ends share the same cores)."]
    for section, title in (("link", "The link alone, no engine: fake worker → relay (as a hive runs it) → client"),
                           ("models", "Models: first vs warm infer; download through the provisioner"),
                           ("mlx", "MLX: tiny random-weight model, mlx-lm direct vs an rbee MLX worker"),
                           ("dialects", "Ollama's /api/chat against OpenAI's /v1/chat/completions: time to first "
                                        "token on the same warm worker, taking turns (bench/dialects.py)")):
        if isinstance(extras.get(section), dict):
            lines += ["", f"## {title}", ""]
            lines += [f"- {key}: {value:.3g}" for key, value in extras[section].items()]
    if isinstance(extras.get("fleet"), dict):
        lines += ["", "## fleet up (loopback sshd hosts, each its own unix user)", ""]
        lines += [f"- {key}: {value:.2f}" for key, value in extras["fleet"].items()]
    if isinstance(extras.get("hot path"), dict):
        lines += ["", "## The engine's hot path against llama.cpp's own tools, this CPU", "",
                  *hot_path.render(extras["hot path"])]
    lines += ["", "## Other figures", ""]
    for key, value in extras.items():
        if key in ("concurrency", "fleet", "models", "mlx", "link", "cpu builds", "dialects", "hot path", "split",
                   "date"):
            continue
        lines.append(f"- {key}: {value:.3g}" if isinstance(value, float) else f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def targets(samples: list[Sample], extras: dict[str, Any]) -> list[tuple[str, str, bool]]:
    base = warm(samples, "in-process")
    chain = warm(samples, "rbee chain")
    rows: list[tuple[str, str, bool]] = []
    if base and chain:
        ratio = median([s.decode_tps for s in chain]) / median([s.decode_tps for s in base])
        rows.append(("chain decode tok/s ≥ 97 % of in-process", f"{ratio * 100:.1f} %", ratio >= 0.97))
        added = (median([s.ttft_s for s in chain]) - median([s.ttft_s for s in base])) * 1000
        rows.append(("added TTFT (warm) ≤ 15 ms", f"{added:+.1f} ms", added <= 15))
    for role in ("queen", "hive"):
        key = f"rbee chain: {role} CPU per token (µs)"
        if isinstance(extras.get(key), float):
            rows.append((f"{role} CPU per token ≤ 50 µs", f"{extras[key]:.0f} µs", extras[key] <= 50))
    rbee_rows = {row["streams"]: row for row in extras.get("concurrency") or [] if row["system"] == "rbee chain"}
    if 1 in rbee_rows and 8 in rbee_rows:
        gain = rbee_rows[8]["aggregate_tps"] / rbee_rows[1]["aggregate_tps"]
        rows.append(("8 streams ≥ 1.8 × the aggregate tok/s of 1 stream", f"{gain:.2f} ×", gain >= 1.8))
        p95 = rbee_rows[8]["ttft_p95_ms"] / 1000
        rows.append(("TTFT p95 at 8 streams ≤ 1.5 s", f"{p95:.2f} s", p95 <= 1.5))
    if base and chain:
        ratio = median([s.decode_tps for s in chain]) / median([s.decode_tps for s in base])
        rows.append(("one stream: chain decode ≥ 0.95 of in-process", f"{ratio:.3f}", ratio >= 0.95))
    builds = extras.get("cpu builds") if isinstance(extras.get("cpu builds"), dict) else {}
    if "portable / native" in builds:
        ratio = builds["portable / native"]
        rows.append(("portable build decodes within 5 % of a native build (paired median)", f"{ratio:.3f}",
                     ratio >= 0.95))
    fleet = extras.get("fleet") if isinstance(extras.get("fleet"), dict) else {}
    one = fleet.get("fleet up, 1 host(s), from clean (s)")
    for count in (2, 4):
        many = fleet.get(f"fleet up, {count} host(s), from clean (s)")
        if one and many:
            rows.append((f"fleet up, {count} hosts ≤ 1.3 × 1 host", f"{many / one:.2f} ×", many / one <= 1.3))
    reruns = [value for key, value in fleet.items() if "idempotent" in key]
    if reruns:
        rows.append(("idempotent fleet up ≤ 2 s", f"{max(reruns):.2f} s (slowest)", max(reruns) <= 2))
    return rows


def draw(samples: list[Sample], path: Path, concurrency: list[dict[str, Any]] | None = None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    present = [name for name in ORDER if warm(samples, name)]
    tps = [median([s.decode_tps for s in warm(samples, name)]) for name in present]
    ttft = [median([s.ttft_s * 1000 for s in warm(samples, name)]) for name in present]
    figure, ((left, right), (curve, p95)) = plt.subplots(2, 2, figsize=(12, 9))
    left.bar(present, tps, color="#d9a400")
    left.set_title("decode tokens/s (warm median, higher is better)")
    right.bar(present, ttft, color="#4a6fa5")
    right.set_title("time to first token, ms (warm median, lower is better)")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=20)
    rows = concurrency or []
    for system in sorted({row["system"] for row in rows}):
        mine = [row for row in rows if row["system"] == system]
        curve.plot([r["streams"] for r in mine], [r["aggregate_tps"] for r in mine], marker="o", label=system)
        p95.plot([r["streams"] for r in mine], [r["ttft_p95_ms"] for r in mine], marker="o", label=system)
    curve.set_title("aggregate tokens/s against concurrent streams")
    p95.set_title("TTFT p95, ms, against concurrent streams")
    for axis in (curve, p95):
        axis.set_xlabel("streams")
        if rows:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, tokens, streams and hosts")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from its .json")
    parser.add_argument("--only", choices=["hot-path", "split"],
                        help="measure this section again; the rest comes from the .json")
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.max_tokens = args.max_tokens or (64 if args.quick else 128)
    args.levels = [1, 2, 4] if args.quick else [1, 2, 4, 8]
    args.hosts = [1, 2] if args.quick else [1, 2, 4]
    return args


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def write_doc(path: Path, text: str) -> None:
    """Write the benchmarks page, keeping its GPU section (made by bench/gpu.py on a GPU machine)."""
    old = path.read_text() if path.exists() else ""
    if gpu.START in old and gpu.END in old:
        text = gpu.splice(text, gpu.START + old.split(gpu.START, 1)[1].split(gpu.END, 1)[0] + gpu.END)
    path.write_text(text)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from rbee.config import models_dir
    from rbee.engine.proof import default_model

    model = default_model(models_dir(), lambda text: print(text, file=sys.stderr, flush=True))
    if args.render_only or args.only:
        raw = json.loads(args.out.with_suffix(".json").read_text())
        if args.only == "hot-path":
            raw["extras"]["hot path"] = measure_hot_path(model, args)
        elif args.only == "split":
            raw["extras"]["split"] = measure_split(model, args)
        if args.only:
            args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
        samples = [Sample(**s) for s in raw["samples"]]
        plot = draw(samples, args.out.with_suffix(".png"), raw["extras"].get("concurrency"))
        write_doc(args.out, render(samples, raw["extras"], args, plot))
        return 0
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as tmp:
        say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
        say("0/5 CPU builds: the portable llama.cpp rbee installs against a native build, on this CPU")
        builds = cpu_builds.compare(model, PROMPTS, args.max_tokens, args.runs, Path(tmp), say)
        samples, extras = asyncio.run(collect(args, model, Path(tmp)))
        extras["date"] = now()
        extras["cpu builds"] = builds
        try:
            extras["mlx"] = systems.mlx_speeds(Path(tmp), args.max_tokens, args.runs)
        except ImportError as exc:
            extras["mlx"] = f"not measured: {exc}"
        say("the engine's hot path: rbee and llama-server through one harness, llama-batched-bench")
        extras["hot path"] = measure_hot_path(model, args)
        say("a model split with llama.cpp's RPC backend: half the layers on a share, against none")
        extras["split"] = measure_split(model, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot = draw(samples, args.out.with_suffix(".png"), extras.get("concurrency"))
    text = render(samples, extras, args, plot)
    write_doc(args.out, text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"samples": [asdict(s) for s in samples], "extras": extras}, indent=1, default=str)
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
