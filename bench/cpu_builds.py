"""Portable against native llama.cpp on this CPU: does the build that runs on every CPU cost speed?

The portable build is the one rbee installs (``rbee.engine.build``: every CPU variant, the best
one loaded at run time); the native one is the same llama-cpp-python version built with
``GGML_NATIVE=ON`` (``-march=native``, what pip builds by default), made here once into
``~/.cache/rbee/engine/native-<version>/`` and installed into the bench's folder, never into the
venv. Each build decodes the same prompts greedily in its own child process, the two taking turns
round by round so drift of a shared machine moves both alike; the figure is the median of the
paired ratios (portable ÷ native, same prompt, same round). Decode tok/s counts the tokens
after the first over the time after the first (the prompt's evaluation is left out).

    python -m bench.cpu_builds --child MODEL MAX_TOKENS   (one build's run, JSON on stdout)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rbee.engine import build as engine_build
from rbee.engine.proof import greedy

NATIVE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"


def native_wheel(version: str, say: Any) -> Path:
    folder = engine_build.cache_dir() / f"native-{version}"
    found = sorted(folder.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    say(f"building a native llama-cpp-python {version} ({NATIVE_ARGS}) to compare with: minutes, once")
    return engine_build.build_wheel(version, folder, NATIVE_ARGS, portable=False)


def run_child(model: Path, max_tokens: int, prompts: dict[str, str], site: Path | None) -> dict[str, Any]:
    """One build's decode of every prompt; ``site``: a folder that shadows the venv's llama_cpp."""
    env = {key: value for key, value in os.environ.items() if key != "RBEE_CPU_VARIANT"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([*([str(site)] if site else []), root])
    done = subprocess.run([sys.executable, "-m", "bench.cpu_builds", "--child", str(model), str(max_tokens)],
                          input=json.dumps(prompts), capture_output=True, text=True, env=env, check=False,
                          timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the decode run failed: {done.stderr[-1500:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def compare(model: Path, prompts: dict[str, str], max_tokens: int, rounds: int, workdir: Path,
            say: Any) -> dict[str, Any]:
    installed = engine_build.installed()
    if installed is None or not installed.portable:
        return {"skipped": "the venv's llama-cpp-python is not rbee's portable build (run scripts/setup)"}
    wheel = native_wheel(installed.version, say)
    site = workdir / "native-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--target", str(site), str(wheel)], check=True)
    runs: dict[str, list[dict[str, Any]]] = {"portable": [], "native": []}
    for turn in range(rounds):
        order = ("portable", "native") if turn % 2 == 0 else ("native", "portable")
        for name in order:
            say(f"cpu builds: round {turn + 1}/{rounds}, {name}")
            runs[name].append(run_child(model, max_tokens, prompts, site if name == "native" else None))
    result: dict[str, Any] = {"rounds": rounds, "max_tokens": max_tokens,
                              "portable_variant": runs["portable"][0]["variant"],
                              "portable library": runs["portable"][0]["llama_cpp"],
                              "native library": runs["native"][0]["llama_cpp"]}
    for name, done in runs.items():
        for prompt in prompts:
            result[f"{name} {prompt} decode tok/s"] = statistics.median(r["decode_tps"][prompt] for r in done)
        result[f"{name} decode tok/s"] = statistics.median(
            statistics.median(r["decode_tps"].values()) for r in done)
    # paired: each prompt's portable rate over the native rate of the same round (run back to back),
    # so the machine's drift between rounds cancels; the median of those ratios
    paired = [mine["decode_tps"][prompt] / theirs["decode_tps"][prompt]
              for mine, theirs in zip(runs["portable"], runs["native"], strict=True) for prompt in prompts]
    result["paired ratios"] = [round(ratio, 4) for ratio in paired]
    result["portable / native"] = statistics.median(paired)
    return result


def child(model: Path, max_tokens: int, prompts: dict[str, str]) -> dict[str, Any]:
    from rbee.engine.backends import load

    loaded = load()  # the proven variant, as rbee's workers run it (a native build: nothing to choose)
    import llama_cpp

    threads = os.cpu_count() or 1  # as an rbee worker alone on its host
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=1024, n_gpu_layers=0, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    rates: dict[str, float] = {}
    for name, prompt in prompts.items():
        llm.reset()
        times = [time.perf_counter() for _ in greedy(llm, prompt, max_tokens)]
        rates[name] = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    llm.close()
    return {"variant": loaded.variant or "native", "decode_tps": rates, "llama_cpp": str(Path(llama_cpp.__file__))}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.stdin.read()))))
