"""The cost of splitting a model with llama.cpp's RPC backend, on one machine: rbee's engine with
half of the default model's layers on a share (``rbee.worker.rpc_share``, over its unix socket and
rbee's bridges) against the same engine with every layer at home, taking turns; and the share's
first load (every tensor sent) against a later one (the large ones read from its cache).

On loopback this is the link's own cost: both processes share the same two cores, so the split
cannot be faster; across hosts each share computes on its own machine.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    bridges = await attach_shares([Path(p) for p in sys.argv[4:]])
    runner = ModelRunner(create_backend("llama-cpp", n_ctx=1024, threads=0, gpu_layers=layers, slots=1), model)
    started = time.monotonic()
    await runner.load()
    loaded = time.monotonic() - started
    request = JobRequest(prompt="The three primary colours are", max_tokens=tokens, temperature=0.0)
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
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(layers), str(tokens), *map(str, shares)],
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


def measure(model: Path, layers_total: int, max_tokens: int, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Half the repeating layers (and the output) on a share, against none; alternating rounds."""
    on_share = layers_total // 2 + 1
    alone: list[dict[str, Any]] = []
    split: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rbee-split-") as tmp:
        process, socket = start_share(Path(tmp))
        try:
            for number in range(rounds):
                say(f"split round {number + 1}/{rounds}: every layer at home, then {on_share} on the share")
                alone.append(run_child(model, 0, [], max_tokens)[0])
                split.append(run_child(model, on_share, [socket], max_tokens)[0])
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    alone_tps = statistics.median(r["decode_tps"] for r in alone)
    split_tps = statistics.median(r["decode_tps"] for r in split)
    cached = statistics.median(r["load_s"] for r in split[1:]) if len(split) > 1 else float("nan")
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "layers on the share": on_share, "layers total": layers_total + 1, "rounds": rounds,
        "decode alone (tok/s)": alone_tps, "decode split (tok/s)": split_tps, "split / alone": split_tps / alone_tps,
        "load alone (s)": statistics.median(r["load_s"] for r in alone), "load split, cold (s)": split[0]["load_s"],
        "load split, cached (s)": cached, "cached / cold": cached / split[0]["load_s"],
        "same text": all(r["text"] == alone[0]["text"] for r in [*alone, *split]),
        "share device": split[0]["report"].get("device", ""),
        "weights on the share (MB)": split[0]["report"].get("weights_on_device", 0) / 1e6,
    }
