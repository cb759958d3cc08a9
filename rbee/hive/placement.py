"""Where a new worker goes and how big its context is: pure functions over the host's
devices and the model's size, so every rule is table-tested without a GPU.

- llama.cpp with offload on a CUDA host: the GPU with the most free memory that holds
  the offloaded part (weights + KV cache of the offloaded layers + runtime); split
  over several GPUs (``tensor_split``) only when none holds it and the hive allows it.
- Apple Silicon (Metal, or MLX): unified memory, i.e. the host's free RAM.
- Everything else, and ``gpu_layers = 0``: RAM.

A partial offload (``gpu_layers = N`` of L) puts N/L of the weights and KV cache on
the GPU and the rest in RAM, as llama.cpp does; both parts are checked.
The context defaults to the model's trained length, halved until admission grants it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rbee.engine.sizing import FALLBACK_CTX, MIN_AUTO_CTX, RUNTIME_OVERHEAD
from rbee.errors import NoCapacityError


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    kind: str  # cuda | metal
    free: int

    @classmethod
    def from_probe(cls, gpu: dict[str, Any]) -> Gpu:
        return cls(int(gpu.get("index", 0)), str(gpu.get("name", "GPU")), str(gpu.get("kind", "cuda")),
                   int(gpu.get("memory_free", 0)))


@dataclass(frozen=True)
class Memory:
    """What the host has for a new worker: free RAM, GPUs, and rbee's own budget (0 = none)."""

    ram_free: int
    gpus: tuple[Gpu, ...] = ()
    budget: int = 0
    reserved: int = 0  # held by live workers, counted against the budget

    @classmethod
    def from_probe(cls, devices: dict[str, Any], budget: int = 0, reserved: int = 0) -> Memory:
        gpus = tuple(Gpu.from_probe(g) for g in devices.get("gpus", []))
        return cls(int(devices["cpu"]["ram_free"]), gpus, budget, reserved)

    @property
    def cuda(self) -> list[Gpu]:
        return [g for g in self.gpus if g.kind == "cuda"]

    @property
    def metal(self) -> bool:
        return any(g.kind == "metal" for g in self.gpus)


@dataclass(frozen=True)
class Need:
    """What a model takes for a given context."""

    weights: int
    kv_cache: int
    layers: int
    runtime: int = RUNTIME_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime

    def detail(self, n_ctx: int) -> str:
        return (f"{self.weights / 1e6:.0f} MB weights + {self.kv_cache / 1e6:.0f} MB KV cache for {n_ctx} tokens + "
                f"{self.runtime / 1e6:.0f} MB runtime")


@dataclass(frozen=True)
class Placement:
    kind: str  # cpu | cuda | metal
    device: str  # for people: "CPU", "NVIDIA H100 (GPU 1)", "GPUs 0+1 (split)", "Apple M2 Max (unified memory)"
    gpu_layers: int  # what llama.cpp is asked to offload: -1 all, 0 none, N
    gpus: tuple[int, ...] = ()  # CUDA indexes the worker sees (CUDA_VISIBLE_DEVICES)
    tensor_split: tuple[float, ...] = ()  # fractions per visible GPU when split
    need: int = 0
    free: int = 0  # of the pool that decided
    pool: str = "RAM"
    notes: tuple[str, ...] = field(default=())

    def env(self) -> dict[str, str]:
        """The worker's environment: a CUDA worker sees only its GPUs, so ``main_gpu`` is 0."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in self.gpus)} if self.kind == "cuda" else {}


def offloaded_fraction(gpu_layers: int, layers: int) -> float:
    if gpu_layers < 0:
        return 1.0
    if layers <= 0:
        return 1.0 if gpu_layers > 0 else 0.0
    return min(gpu_layers, layers) / layers


def place(
    memory: Memory, need: Need, *, engine: str, gpu_layers: int, offload: bool, allow_split: bool = False,
    name: str = "the model", detail: str = "",
) -> Placement:
    """Where a worker for ``need`` goes, or NoCapacityError naming need and free.

    ``offload``: the engine can use a GPU here (llama.cpp built with CUDA/Metal, or MLX).
    """
    detail = detail or f"{need.weights / 1e6:.0f} MB weights + {need.kv_cache / 1e6:.0f} MB KV cache"
    budget_left = memory.budget - memory.reserved if memory.budget > 0 else None
    if budget_left is not None and need.total > budget_left:
        raise NoCapacityError(
            f"cannot load {name}: it needs {_gb(need.total)} ({detail}) and {_gb(max(budget_left, 0))} is free in "
            f"rbee's memory budget ({_gb(memory.budget)} budget, {_gb(memory.reserved)} held by workers). "
            "Stop a worker (`rbee workers stop`), raise the host's `memory` in inventory.toml (or "
            "RBEE_MEMORY_BUDGET) or use a smaller model"
        )
    wants_gpu = offload and (engine == "mlx" or gpu_layers != 0)
    if wants_gpu and memory.metal:
        metal = next(g for g in memory.gpus if g.kind == "metal")
        _check(memory.ram_free, need.total, name, detail, "unified memory")
        return Placement("metal", f"{metal.name} (unified memory)", gpu_layers, need=need.total,
                         free=memory.ram_free, pool="unified memory")
    if not wants_gpu or engine != "llama-cpp" or not memory.cuda:
        _check(memory.ram_free, need.total, name, detail, "RAM")
        return Placement("cpu", "CPU", 0 if engine == "llama-cpp" else gpu_layers, need=need.total,
                         free=memory.ram_free)
    share = offloaded_fraction(gpu_layers, need.layers)
    on_gpu = int((need.weights + need.kv_cache) * share) + need.runtime
    in_ram = need.total - on_gpu + (need.runtime if share < 1 else 0)
    if share < 1:
        _check(memory.ram_free, in_ram, name, f"the {1 - share:.0%} of it left on the CPU", "RAM")
    ranked = sorted(memory.cuda, key=lambda g: (-g.free, g.index))
    best = ranked[0]
    if best.free >= on_gpu:
        return Placement("cuda", f"{best.name} (GPU {best.index})", gpu_layers, gpus=(best.index,), need=on_gpu,
                         free=best.free, pool=f"VRAM of GPU {best.index}")
    usable = [g for g in ranked if g.free > 0]
    total_free = sum(g.free for g in usable)
    if allow_split and len(usable) > 1 and total_free >= on_gpu:
        chosen = sorted(usable, key=lambda g: g.index)
        split = tuple(round(g.free / total_free, 4) for g in chosen)
        label = "+".join(str(g.index) for g in chosen)
        return Placement("cuda", f"GPUs {label} (split)", gpu_layers, gpus=tuple(g.index for g in chosen),
                         tensor_split=split, need=on_gpu, free=total_free, pool=f"VRAM of GPUs {label}")
    hint = ""
    if len(usable) > 1 and total_free >= on_gpu:
        hint = "; together the GPUs would hold it: set `gpu_split = true` for this hive"
    raise NoCapacityError(
        f"cannot load {name}: its offloaded part needs {_gb(on_gpu)} of VRAM ({detail}) and the GPU with the most "
        f"free memory, {best.name} (GPU {best.index}), has {_gb(best.free)}{hint}. Stop a worker, offload fewer "
        "layers (`gpu_layers = N`), use a smaller context (`ctx`) or a smaller model"
    )


def _check(free: int, need: int, name: str, detail: str, pool: str) -> None:
    if need > free:
        raise NoCapacityError(
            f"cannot load {name}: it needs {_gb(need)} ({detail}) and {_gb(free)} is free in {pool}. "
            "Stop a worker (`rbee workers stop`), use a smaller context (`ctx`) or a smaller model"
        )


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


@dataclass(frozen=True)
class Sized:
    """A placement and the context it was made for."""

    placement: Placement
    n_ctx: int
    need: Need
    why: str


@dataclass(frozen=True)
class Demand:
    """What a new worker of one model asks of its host (from the catalog entry and the job). The
    supervisor sizes it against the memory free when it admits the worker, under its spawn lock."""

    weights: int
    kv_per_token: int
    layers: int
    trained_ctx: int
    requested_ctx: int | None
    engine: str
    gpu_layers: int
    offload: bool
    allow_split: bool = False
    name: str = "the model"
    #: a split job's main worker: the bytes it holds here (its layers on helpers' RPC shares)
    split_bytes: int = 0
    split_layers: int = 0
    rpc_split: tuple[float, ...] = ()

    def size(self, memory: Memory) -> Sized:
        if self.split_bytes:
            return self.size_split(memory)
        fields = {key: value for key, value in dataclasses.asdict(self).items()
                  if key not in ("split_bytes", "split_layers", "rpc_split")}
        return size_worker(memory, **fields)

    def size_split(self, memory: Memory) -> Sized:
        """The main worker of a split: the queen planned its context and share; this host checks
        it has the room (RAM, and rbee's budget), as for any worker."""
        n_ctx = self.requested_ctx or FALLBACK_CTX
        need = Need(self.weights, self.kv_per_token * n_ctx, self.layers)
        detail = f"its share of a split: {self.split_bytes / 1e6:.0f} MB here, {self.split_layers} layers on helpers"
        budget_left = memory.budget - memory.reserved if memory.budget > 0 else None
        free = memory.ram_free if budget_left is None else min(memory.ram_free, budget_left)
        _check(free, self.split_bytes, self.name, detail, "RAM" if budget_left is None else "rbee's memory budget")
        placement = Placement("cpu", f"CPU and {len(self.rpc_split) or 1} RPC share(s)", self.split_layers,
                              tensor_split=self.rpc_split, need=self.split_bytes, free=free)
        return Sized(placement, n_ctx, need, "planned by the queen for the split")


def size_worker(
    memory: Memory, *, weights: int, kv_per_token: int, layers: int, trained_ctx: int, requested_ctx: int | None,
    engine: str, gpu_layers: int, offload: bool, allow_split: bool = False, name: str = "the model",
) -> Sized:
    """The context and placement of a new worker.

    An asked-for context is granted or refused. Otherwise the model's trained length,
    halved while it does not fit, down to ``MIN_AUTO_CTX`` (or the trained length if smaller).
    """

    def attempt(n_ctx: int) -> tuple[Placement, Need]:
        need = Need(weights, kv_per_token * n_ctx, layers)
        return place(memory, need, engine=engine, gpu_layers=gpu_layers, offload=offload, allow_split=allow_split,
                     name=name, detail=need.detail(n_ctx)), need

    if requested_ctx is not None:
        placement, need = attempt(requested_ctx)
        return Sized(placement, requested_ctx, need, "asked for")
    trained = trained_ctx if trained_ctx > 0 else FALLBACK_CTX
    floor = min(MIN_AUTO_CTX, trained)
    n_ctx = trained
    while True:
        try:
            placement, need = attempt(n_ctx)
        except NoCapacityError:
            if n_ctx <= floor:
                raise
            n_ctx = max(n_ctx // 2, floor)
            continue
        if n_ctx == trained:
            why = "the model's trained length" if trained_ctx > 0 else "the model does not say; rbee's fallback"
        else:
            why = f"capped by free memory; the model was trained for {trained}"
        return Sized(placement, n_ctx, need, why)

