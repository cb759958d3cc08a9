"""How each system is driven and timed. Every function returns Samples measured the same
way: TTFT from sending the request to the first non-empty text, decode tokens/s over the
tokens after the first, wall time to the end of the stream."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

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
        span = self.wall_s - self.ttft_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


async def timed(pieces: AsyncIterator[str]) -> tuple[int, float, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    async for _ in pieces:
        if first is None:
            first = time.perf_counter() - started
        tokens += 1
    return tokens, first or 0.0, time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_answering(http: httpx.AsyncClient, path: str, exited: Callable[[], bool], what: str,
                         timeout: float) -> None:
    """Poll ``GET path`` until 200; fail at once if the server's process exited, or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if exited():
            raise RuntimeError(f"{what} exited during startup")
        try:
            if (await http.get(path, timeout=1)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout:g} s")
        await asyncio.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


# 1. llama-cpp-python in-process -------------------------------------------------------------

class InProcess:
    """llama-cpp-python in this process, token by token: the limit for this stack. Each token is
    turned into text on its own (an incremental UTF-8 decoder); ``create_completion`` would
    detokenise everything made so far at every step, a cost of its own and no baseline."""

    def __init__(self, model: Path, max_tokens: int, extras: dict[str, Any]) -> None:
        from rbee.engine.backends import load

        load()  # the portable build's CPU variant, as a worker loads it
        from llama_cpp import Llama

        started = time.perf_counter()
        self.llm = Llama(model_path=str(model), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
        extras["in-process model load (s)"] = time.perf_counter() - started
        self.max_tokens = max_tokens

    async def pieces(self, prompt: str) -> AsyncIterator[str]:
        import codecs

        import llama_cpp

        # Generation blocks the loop, as in a plain script; nothing else runs in this process meanwhile.
        llm, decoder = self.llm, codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        for made, token in enumerate(llm.generate(llm.tokenize(prompt.encode()), temp=0.0, reset=True)):
            if made >= self.max_tokens or llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            text = decoder.decode(llm.detokenize([token]))
            if text:
                yield text

    def close(self) -> None:
        self.llm.close()


# OpenAI-style streaming (llama_cpp.server and the queen) --------------------------------

async def openai_pieces(http: httpx.AsyncClient, prompt: str, max_tokens: int, model: str) -> AsyncIterator[str]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED,
            "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0].get("text")
            if text:
                yield text


class LlamaServer:
    """llama-cpp-python's own OpenAI server, over HTTP."""

    def __init__(self, model: Path, max_tokens: int, extras: dict[str, Any]) -> None:
        self.model, self.max_tokens, self.extras = model, max_tokens, extras
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> LlamaServer:
        started = time.perf_counter()
        self.process = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for with polling below
            [sys.executable, "-m", "bench.llama_server", "--model", str(self.model), "--n_ctx", "2048",
             "--n_threads", str(os.cpu_count()), "--host", "127.0.0.1", "--port", str(self.port),
             "--interrupt_requests", "False"],  # queue concurrent requests instead of cutting the running one
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=None)
        process = self.process
        try:
            await wait_answering(self.http, "/v1/models", lambda: process.poll() is not None, "llama_cpp.server", 120)
        except RuntimeError:
            await self.__aexit__()
            raise
        self.extras["llama_cpp.server start + load (s)"] = time.perf_counter() - started
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        if self.process is not None:
            self.process.terminate()
            await asyncio.to_thread(self.process.wait, 20)

    def pieces(self, prompt: str) -> AsyncIterator[str]:
        return openai_pieces(self.http, prompt, self.max_tokens, str(self.model))


# 3-5. rbee ------------------------------------------------------------------------------

class Rbee:
    """A queen for the benchmark, started like the keeper starts an ephemeral one."""

    def __init__(self, home: Path, inventory: Path | None = None) -> None:
        self.home = home
        self.inventory = inventory
        self.url = ""
        self.child: Any = None

    async def __aenter__(self) -> Rbee:
        from rbee.config import QueenConfig, ServeOptions
        from rbee.keeper.session import start_queen

        config = QueenConfig(home=self.home, ephemeral=True, serve=ServeOptions(),
                             inventory=str(self.inventory or ""))
        self.child = await start_queen(config, ephemeral=True)
        self.url = self.child.url
        # one client (one pooled connection) for all requests, as the OpenAI systems get one
        from rbee.link.auth import load_token
        from rbee.link.client import LinkClient

        self.token = load_token(home=self.home)
        self.client = LinkClient(self.url, "queen", stall_timeout=None, token=self.token)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        await self.child.stop(grace=30.0)

    async def pieces(self, prompt: str, max_tokens: int, node: str | None = None,
                     model: str | None = None, **fields: Any) -> AsyncIterator[str]:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED,
                                **fields}
        if node:
            body["node"] = node
        if model:
            body["model"] = model
        async for event in self.client.run(body):
            if event.type == "token":
                yield event["text"]
            elif event.type == "error":
                raise RuntimeError(event["message"])

    async def workers(self) -> list[dict[str, Any]]:
        """Every worker as ``GET /v1/workers`` lists it."""
        async with httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}) as http:
            return list((await http.get("/v1/workers")).json()["workers"])

    async def hive(self, name: str) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}) as http:
            hives = (await http.get("/v1/hives")).json()["hives"]
        return dict(next(h for h in hives if h["name"] == name))

    async def fleet(self, action: str) -> float:
        from rbee.link.client import LinkClient

        started = time.perf_counter()
        async with LinkClient(self.url, "queen", stall_timeout=None, token=self.token) as client:
            async for event in client.run({"action": action, "inventory": str(self.inventory)},
                                          path="/v1/fleet/jobs"):
                if event.type == "error":
                    raise RuntimeError(event["message"])
                if event.type == "narration" and event["action"] == "report":
                    failed = [r for r in event["report"] if r["action"] == "failed"]
                    if failed:
                        raise RuntimeError(f"fleet {action} failed: {failed}")
        return time.perf_counter() - started


Pieces = Callable[[str], AsyncIterator[str]]


async def measure(systems: dict[str, Pieces], prompts: dict[str, str], runs: int, extras: dict[str, Any],
                  cpu_of: Callable[[], Awaitable[dict[str, dict[str, int]]]] | None = None) -> list[Sample]:
    """Each system's first request (cold), then for every prompt ``runs`` rounds in which every
    system takes its turn: a machine that speeds up or slows down during the run (a shared VM
    does) moves all systems alike, so the ratios between them hold.

    ``cpu_of``, asked after the cold round (when every process exists), names processes per
    system (``{"rbee chain": {"queen": pid, ...}}``); their CPU time over that system's warm
    requests, per token, goes into ``extras``."""
    samples = []
    first_name = next(iter(prompts))
    for system, pieces in systems.items():
        tokens, ttft, wall = await timed(pieces(prompts[first_name]))
        samples.append(Sample(system, first_name, "cold", tokens, ttft, wall))
    watched = await cpu_of() if cpu_of else {}
    spent = {system: dict.fromkeys(pids, 0.0) for system, pids in watched.items()}
    counted = dict.fromkeys(watched, 0)
    for name, prompt in prompts.items():
        for _ in range(runs):
            for system, pieces in systems.items():
                pids = watched.get(system, {})
                before = {role: cpu_seconds(pid) for role, pid in pids.items()}
                tokens, ttft, wall = await timed(pieces(prompt))
                for role, pid in pids.items():
                    spent[system][role] += cpu_seconds(pid) - before[role]
                if pids:
                    counted[system] += tokens
                samples.append(Sample(system, name, "warm", tokens, ttft, wall))
    for system, roles in spent.items():
        for role, seconds in roles.items():
            extras[f"{system}: {role} CPU per token (µs)"] = seconds / max(counted[system], 1) * 1e6
    return samples


async def rbee_pids(rbee: Rbee, node: str) -> dict[str, int]:
    """The queen's pid, and the hive's when it runs on this machine."""
    hive = await rbee.hive(node)
    return {"queen": rbee.child.pid, **({"hive": int(hive["pid"])} if node == "localhost" else {})}


# concurrency ----------------------------------------------------------------------------

async def concurrency(systems: dict[str, Callable[[str, int], AsyncIterator[str]]], prompt: str, max_tokens: int,
                      levels: list[int]) -> list[dict[str, Any]]:
    """``streams`` requests at once to each system, level by level (systems take turns at each level)."""
    rows = []
    for streams in levels:
        for system, pieces in systems.items():
            await timed(pieces(prompt, 4))  # warm
            started = time.perf_counter()
            results = await asyncio.gather(*(timed(pieces(prompt, max_tokens)) for _ in range(streams)))
            wall = time.perf_counter() - started
            rows.append({"system": system, "streams": streams, "aggregate_tps": sum(r[0] for r in results) / wall,
                         **ttft_percentiles([r[1] for r in results])})
    return rows


def ttft_percentiles(ttfts_s: list[float]) -> dict[str, float]:
    """The p50 and p95 of streams' times to first token, in ms."""
    ordered = sorted(ttfts_s)
    return {"ttft_p50_ms": ordered[len(ordered) // 2] * 1000,
            "ttft_p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000}


# SSH fleet ----------------------------------------------------------------------------------

def sshd_available() -> str | None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests import sshd_hosts

    return sshd_hosts.available()


async def fleet_timings(workdir: Path, counts: list[int], on_ready: Callable[[Rbee], Any] | None = None
                        ) -> dict[str, float]:
    from tests import sshd_hosts

    timings: dict[str, float] = {}
    hosts, key = sshd_hosts.start_hosts(workdir / "sshd", max(counts))
    try:
        for count in counts:
            for host in hosts:
                sshd_hosts.reset_home(host)
            inventory = sshd_hosts.write_inventory(workdir / f"inventory-{count}.toml", hosts[:count], key,
                                                   workdir / "known_hosts")
            async with Rbee(workdir / f"queen-{count}", inventory) as rbee:
                timings[f"fleet up, {count} host(s), from clean (s)"] = await rbee.fleet("up")
                timings[f"fleet up, {count} host(s), idempotent re-run (s)"] = await rbee.fleet("up")
                if count == 1 and on_ready is not None:
                    await on_ready(rbee)
                if count == 2:
                    timings.update(await spread(rbee, [h.name for h in hosts[:2]]))
                await rbee.fleet("down")
    finally:
        sshd_hosts.stop_hosts(hosts)
    return timings


async def spread(rbee: Rbee, names: list[str]) -> dict[str, float]:
    """The default model warm on the first host and only on disk on the second; then bursts of 8 and
    16 streams without --node: how many the scheduler sends to each host, and the aggregate rate."""
    warm, cold = names
    await timed(rbee.pieces("Hi", 2, node=warm))
    pulled = [e async for e in rbee.client.run({"ref": "gemma3-270m", "node": cold}, "/v1/catalog/jobs")]
    if pulled[-1].type != "end":
        raise RuntimeError(f"could not put the model on {cold}: {pulled[-1]}")
    result: dict[str, float] = {}
    for streams in (8, 16):
        await asyncio.sleep(2.5)  # a fresh heartbeat from both hosts

        async def one() -> tuple[str, int]:
            host, tokens = "", 0
            async for event in rbee.client.run({"prompt": "Once upon a time", "max_tokens": 64,
                                                "temperature": 0.0}):
                if event.type == "narration" and event["action"] == "schedule":
                    host = event["message"].split("hive:", 1)[1].split()[0]
                tokens += event.type == "token"
            return host, tokens

        started = time.perf_counter()
        picks = await asyncio.gather(*(one() for _ in range(streams)))
        wall = time.perf_counter() - started
        for name in names:
            result[f"spread, {streams} streams: jobs on {'warm' if name == warm else 'on-disk'} host {name}"] = \
                float(sum(1 for host, _ in picks if host == name))
        result[f"spread, {streams} streams: aggregate tok/s"] = sum(tokens for _, tokens in picks) / wall
    return result


# models: first vs warm infer, provisioner vs huggingface_hub ----------------------------------

async def first_vs_warm(home: Path, prompt: str, max_tokens: int) -> dict[str, float]:
    """Wall time of the first `infer` on a fresh queen (hive start, worker spawn, model load) and
    of the second one (warm worker reused), in one run."""
    async with Rbee(home) as rbee:
        first = await timed(rbee.pieces(prompt, max_tokens))
        second = await timed(rbee.pieces(prompt, max_tokens))
    return {"first infer wall (s)": first[2], "warm second infer wall (s)": second[2],
            "first infer TTFT (s)": first[1], "warm second infer TTFT (s)": second[1]}


def download_speeds(model: Path, workdir: Path) -> dict[str, float]:
    """The same file through rbee's provisioner and through hf_hub_download directly, both from a
    local hub-compatible server (tests/hub_server.py)."""
    from huggingface_hub import hf_hub_download

    from rbee.hive.models import ModelCatalog
    from rbee.hive.provision import HubDownloader
    from tests.hub_server import HubServer, Repo

    data = model.read_bytes()
    results: dict[str, float] = {}
    with HubServer() as server:
        server.repos["bench/model-GGUF"] = Repo(files={"model-Q4_K_M.gguf": data})
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        started = time.perf_counter()
        hf_hub_download("bench/model-GGUF", "model-Q4_K_M.gguf", local_dir=workdir / "direct", endpoint=server.url)
        results["huggingface_hub direct (MB/s)"] = len(data) / 1e6 / (time.perf_counter() - started)
        catalog = ModelCatalog(workdir / "catalog", HubDownloader(endpoint=server.url))
        started = time.perf_counter()
        catalog.resolve("hf:bench/model-GGUF", lambda *a, **k: None)
        results["rbee provisioner, incl. sha256 check and manifest (MB/s)"] = (
            len(data) / 1e6 / (time.perf_counter() - started)
        )
    return results


def mlx_speeds(workdir: Path, max_tokens: int, runs: int) -> dict[str, float]:
    """Decode tokens/s on the tiny MLX model: mlx-lm called directly vs an rbee MLX worker
    through the whole chain, in one run."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from tests.mlx_model import write_tiny_mlx_model

    path = write_tiny_mlx_model(workdir / "tiny-mlx")
    model, tokenizer = mlx_lm.load(str(path))[:2]
    prompt = "hello world"

    def direct() -> float:
        mx.random.seed(1)
        times = []
        for _ in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                        sampler=make_sampler(temp=0.8)):
            times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])

    direct()  # warm-up (compiles kernels)
    direct_tps = statistics_median([direct() for _ in range(runs)])

    async def through_rbee() -> float:
        async with Rbee(workdir / "queen-mlx") as rbee:
            body_model = f"file:{path}"
            await timed(rbee.pieces(prompt, 4, model=body_model))
            rates = []
            for _ in range(runs):
                tokens, ttft, wall = await timed(rbee.pieces(prompt, max_tokens, model=body_model))
                rates.append((tokens - 1) / (wall - ttft))
            return statistics_median(rates)

    chain_tps = asyncio.run(through_rbee())
    return {"mlx-lm direct, tiny model (tok/s)": direct_tps, "rbee MLX worker via the chain (tok/s)": chain_tps,
            "MLX chain ÷ direct": chain_tps / direct_tps}


def statistics_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
