"""The cost of splitting a model with llama.cpp's RPC backend, on one machine: rbee's engine with
half of the default model's layers on a share (``rbee.worker.rpc_share``, over its unix socket and
rbee's bridges) against the same engine with every layer at home, and against llama.cpp's own
``llama-server --rpc`` with the same layers on its ``rpc-server`` (bench/llama_tools.py), taking
turns; and the share's first load (every tensor sent) against a later one (the large ones read
from its cache).

On loopback this is the link's own cost: both processes share the same two cores, so the split
cannot be faster; across hosts each share computes on its own machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket as socket_module
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from bench import llama_tools, systems
from rbee.engine.rpc import SPLIT_UBATCH

PROMPT = "The three primary colours are"

#: runs in a child: rbee's own engine on ``model``, ``layers`` of its last layers (the output
#: projection counted, as llama.cpp counts it) on the shares given, greedy; prints one JSON line
CHILD = r"""
import asyncio, json, sys, time
from pathlib import Path

async def main() -> None:
    from rbee.link.schemas import JobRequest
    from rbee.worker.__main__ import attach_shares
    from rbee.worker.backends.base import create_backend
    from rbee.worker.runner import ModelRunner

    model, layers, tokens = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    bridges = await attach_shares([Path(p) for p in sys.argv[5:]])
    runner = ModelRunner(create_backend("llama-cpp", n_ctx=1024, threads=0, gpu_layers=layers, slots=1), model)
    started = time.monotonic()
    await runner.load()
    loaded = time.monotonic() - started
    request = JobRequest(prompt=sys.argv[4], max_tokens=tokens, temperature=0.0)
    pieces, stamps = [], []
    async for piece in runner.generate(request):
        pieces.append(piece.text)
        stamps.append(time.monotonic())
    import llama_cpp

    backend = runner.backend
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    print(json.dumps({"text": "".join(pieces), "load_s": loaded, "decode_tps": decode, "report": backend.report,
                      "ubatch": llama_cpp.llama_n_ubatch(backend.engine.step.ctx)}), flush=True)
    runner.close()
    for bridge in bridges:
        bridge.close()

asyncio.run(main())
"""


def run_child(model: Path, layers: int, shares: list[Path], tokens: int = 24,
              env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """One load and generation in a fresh process: its JSON line, and its stderr."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(layers), str(tokens), PROMPT,
                           *map(str, shares)],
                          capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the engine child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def start_share(folder: Path) -> tuple[subprocess.Popen[str], Path]:
    socket = folder / "share" / "rpc.sock"
    process = subprocess.Popen([sys.executable, "-m", "rbee.worker.rpc_share", "--socket", str(socket), "--cache",
                                str(folder / "cache"), "--parent-pid", str(os.getpid())],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != f"ready {socket}":
        process.kill()
        raise RuntimeError("the share did not start")
    return process, socket


@contextlib.contextmanager
def llama_server_split(tools: Path, model: Path, on_share: int) -> Iterator[str]:
    """``llama-server --rpc`` with ``on_share`` layers on an ``rpc-server``, as a person would run
    the split by hand (loopback TCP, no fence), rbee's context and micro-batch; its base URL."""
    rpc_port, http_port, threads = systems.free_port(), systems.free_port(), str(os.cpu_count() or 1)
    with contextlib.ExitStack() as stack:
        for argv in ([str(tools / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", threads],
                     [str(tools / "llama-server"), "-m", str(model), "--port", str(http_port), "--rpc",
                      f"127.0.0.1:{rpc_port}", "-ngl", str(on_share), "-c", "1024", "-ub", str(SPLIT_UBATCH),
                      "-np", "1", "-t", threads, "--fit", "off"]):
            process = stack.enter_context(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.DEVNULL))
            stack.callback(process.terminate)
            if argv[0].endswith("ggml-rpc-server"):
                wait_listening(rpc_port, process)
        url = f"http://127.0.0.1:{http_port}"

        async def answering() -> None:
            async with httpx.AsyncClient(base_url=url) as http:
                await systems.wait_answering(http, "/health", lambda: process.poll() is not None,
                                             "llama-server --rpc", timeout=120)

        asyncio.run(answering())
        yield url


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket_module.create_connection(("127.0.0.1", port), timeout=1):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"rpc-server did not listen on port {port}")
        time.sleep(0.05)


def server_run(url: str, max_tokens: int) -> dict[str, Any]:
    """One greedy completion of the child's prompt: its text, its decode rate as the client sees
    the tokens arrive, and llama-server's own (``timings.predicted_per_second``)."""
    pieces: list[str] = []
    stamps: list[float] = []
    own = 0.0
    body = {"prompt": PROMPT, "n_predict": max_tokens, "temperature": 0, "stream": True, "cache_prompt": False}
    with httpx.stream("POST", f"{url}/completion", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content"):
                stamps.append(time.monotonic())
                pieces.append(event["content"])
            own = float(event.get("timings", {}).get("predicted_per_second", own))
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"text": "".join(pieces), "decode_tps": decode, "own_decode_tps": own}


def primed_load(model: Path, folder: Path, layers_total: int, on_share: int, max_tokens: int) -> dict[str, float]:
    """A share's first load after its hive filled the cache from its own copy of the model
    (rbee.hive.rpc_cache), as a helper's is in a split job: its load and how long filling took."""
    from rbee.hive.rpc_cache import prime

    filled = prime(model, folder / "cache", layers_total - (on_share - 1), on_share - 1, output=True)
    process, socket = start_share(folder)
    try:
        return {"load_s": run_child(model, on_share, [socket], max_tokens)[0]["load_s"], "prime_s": filled.seconds}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def measure(model: Path, layers_total: int, max_tokens: int, rounds: int, say: Callable[[str], None],
            tools: Path | None = None) -> dict[str, Any]:
    """Half the repeating layers (and the output) on a share, against none, and against
    ``llama-server --rpc`` with the same split when ``tools`` has it; alternating rounds."""
    on_share = layers_total // 2 + 1
    alone: list[dict[str, Any]] = []
    split: list[dict[str, Any]] = []
    server: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rbee-split-") as tmp, contextlib.ExitStack() as stack:
        process, socket = start_share(Path(tmp))
        url = stack.enter_context(llama_server_split(tools, model, on_share)) if tools else None
        try:
            for number in range(rounds):
                say(f"split round {number + 1}/{rounds}: every layer at home, then {on_share} on the share"
                    + (", then llama-server --rpc with the same split" if url else ""))
                alone.append(run_child(model, 0, [], max_tokens)[0])
                split.append(run_child(model, on_share, [socket], max_tokens)[0])
                if url:
                    server.append(server_run(url, max_tokens))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        primed = primed_load(model, Path(tmp) / "primed", layers_total, on_share, max_tokens)
    alone_tps = statistics.median(r["decode_tps"] for r in alone)
    split_tps = statistics.median(r["decode_tps"] for r in split)
    cached = statistics.median(r["load_s"] for r in split[1:]) if len(split) > 1 else float("nan")
    versus_server: dict[str, Any] = {}
    if server:
        server_tps = statistics.median(r["decode_tps"] for r in server)
        server_own = statistics.median(r["own_decode_tps"] for r in server)
        versus_server = {
            "llama-server --rpc decode, its client's clock (tok/s)": server_tps,
            "llama-server --rpc decode, its own timings (tok/s)": server_own,
            "split / llama-server --rpc (client's clock)": split_tps / server_tps,
            "split / llama-server --rpc (its own timings)": split_tps / server_own,
            "llama-server --rpc same text": all(r["text"].strip() == split[0]["text"].strip() for r in server),
            "CPU kernels, rbee and llama-server --rpc": (f"{split[0]['report'].get('cpu_variant') or '?'}, "
                                                         f"{llama_tools.tools_variant(tools) if tools else '?'}"),
        }
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "layers on the share": on_share, "layers total": layers_total + 1, "rounds": rounds,
        "decode alone (tok/s)": alone_tps, "decode split (tok/s)": split_tps, "split / alone": split_tps / alone_tps,
        "load alone (s)": statistics.median(r["load_s"] for r in alone), "load split, cold (s)": split[0]["load_s"],
        "load split, cached (s)": cached, "cached / cold": cached / split[0]["load_s"],
        "load split, first, cache filled from the helper's copy (s)": primed["load_s"],
        "filling that cache (s)": primed["prime_s"],
        "same text": all(r["text"] == alone[0]["text"] for r in [*alone, *split]),
        "share device": split[0]["report"].get("device", ""),
        "weights on the share (MB)": split[0]["report"].get("weights_on_device", 0) / 1e6,
        **versus_server,
    }
