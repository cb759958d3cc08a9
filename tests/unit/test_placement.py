"""Where a worker goes and how big its context is: table tests over fake hosts with
0, 1, 2 and 4 GPUs and mixed free memory."""

from __future__ import annotations

import pytest

from rbee.hive.placement import (
    MIN_AUTO_CTX,
    Gpu,
    Memory,
    Need,
    NoCapacityError,
    place,
    size_worker,
)

GB = 10**9
MB = 10**6


def cuda(*free_gb: float) -> tuple[Gpu, ...]:
    return tuple(Gpu(i, f"RTX {i}", "cuda", int(f * GB)) for i, f in enumerate(free_gb))


MAC = (Gpu(0, "Apple M2 Max", "metal", 0),)
MODEL = Need(weights=4 * GB, kv_cache=1 * GB, layers=32, runtime=64 * MB)  # 5.064 GB in all

PLACES = [
    # (ram GB, gpus, gpu_layers, offload, split, engine) -> (kind, gpus, split?, device contains)
    (32, (), -1, True, False, "llama-cpp", "cpu", (), False, "CPU"),
    (32, cuda(24), -1, True, False, "llama-cpp", "cuda", (0,), False, "GPU 0"),
    (32, cuda(24), 0, True, False, "llama-cpp", "cpu", (), False, "CPU"),
    (32, cuda(24), -1, False, False, "llama-cpp", "cpu", (), False, "CPU"),  # build without CUDA
    (32, cuda(4, 20), -1, True, False, "llama-cpp", "cuda", (1,), False, "GPU 1"),  # most free wins
    (32, cuda(8, 8), -1, True, False, "llama-cpp", "cuda", (0,), False, "GPU 0"),  # tie: lowest index
    (32, cuda(3, 3, 3, 3), -1, True, True, "llama-cpp", "cuda", (0, 1, 2, 3), True, "GPUs 0+1+2+3 (split)"),
    (32, cuda(1, 6, 0.5, 3), -1, True, True, "llama-cpp", "cuda", (1,), False, "GPU 1"),  # one holds it: no split
    (32, cuda(2, 3, 0, 1), -1, True, True, "llama-cpp", "cuda", (0, 1, 3), True, "GPUs 0+1+3 (split)"),
    (32, cuda(3), 16, True, False, "llama-cpp", "cuda", (0,), False, "GPU 0"),  # half the layers fit
    (64, MAC, -1, True, False, "llama-cpp", "metal", (), False, "unified memory"),
    (64, MAC, -1, True, False, "mlx", "metal", (), False, "unified memory"),
    (64, MAC, 0, True, False, "llama-cpp", "cpu", (), False, "CPU"),
    (16, (), -1, True, False, "mlx", "cpu", (), False, "CPU"),  # mlx[cpu] on Linux
]


@pytest.mark.parametrize("ram, gpus, layers, offload, split, engine, kind, visible, is_split, device", PLACES)
def test_place(ram: float, gpus: tuple[Gpu, ...], layers: int, offload: bool, split: bool, engine: str, kind: str,
               visible: tuple[int, ...], is_split: bool, device: str) -> None:
    placement = place(Memory(int(ram * GB), gpus), MODEL, engine=engine, gpu_layers=layers, offload=offload,
                      allow_split=split)
    assert placement.kind == kind and placement.gpus == visible and device in placement.device
    assert bool(placement.tensor_split) == is_split
    if is_split:
        assert sum(placement.tensor_split) == pytest.approx(1.0, abs=1e-3)
    if kind == "cuda":
        assert placement.env() == {"CUDA_VISIBLE_DEVICES": ",".join(map(str, visible))}
    else:
        assert placement.env() == {}


def test_split_follows_free_memory() -> None:
    placement = place(Memory(32 * GB, cuda(3, 1, 0, 2)), MODEL, engine="llama-cpp", gpu_layers=-1, offload=True,
                      allow_split=True)
    assert placement.gpus == (0, 1, 3) and placement.tensor_split == pytest.approx((0.5, 1 / 6, 1 / 3), abs=1e-3)


REFUSALS = [
    # (ram GB, gpus, gpu_layers, split, engine, budget GB, the message says)
    (4, (), -1, False, "llama-cpp", 0, ["needs 5.06 GB", "4.00 GB is free in RAM"]),
    (32, cuda(3, 3), -1, False, "llama-cpp", 0, ["needs 5.06 GB of VRAM", "(GPU 0), has 3.00 GB",
                                                 "set `gpu_split = true`"]),
    (32, cuda(2, 2), -1, True, "llama-cpp", 0, ["needs 5.06 GB of VRAM", "has 2.00 GB"]),
    (4, MAC, -1, False, "mlx", 0, ["4.00 GB is free in unified memory"]),
    (1, cuda(24), 16, False, "llama-cpp", 0, ["left on the CPU", "free in RAM"]),  # the CPU half does not fit
    (64, cuda(24), -1, False, "llama-cpp", 4, ["free in rbee's memory budget"]),
]


@pytest.mark.parametrize("ram, gpus, layers, split, engine, budget, says", REFUSALS)
def test_refusals_give_the_numbers(ram: float, gpus: tuple[Gpu, ...], layers: int, split: bool, engine: str,
                                   budget: float, says: list[str]) -> None:
    with pytest.raises(NoCapacityError) as caught:
        place(Memory(int(ram * GB), gpus, budget=int(budget * GB)), MODEL, engine=engine, gpu_layers=layers,
              offload=True, allow_split=split, name="m")
    for text in says:
        assert text in caught.value.message
    assert caught.value.status == 503 and caught.value.code == "no_capacity"


KV_PER_TOKEN = 36 * 1024  # bytes of f16 K+V per token (e.g. 18 layers x 1 KV head x 256 x 2 x 2)
CONTEXTS = [
    # (ram GB, trained, asked) -> (n_ctx, why contains)
    (32, 32768, None, 32768, "trained length"),
    (32, 0, None, 4096, "fallback"),
    (0.7, 32768, None, 8192, "capped by free memory; the model was trained for 32768"),
    (32, 32768, 8192, 8192, "asked for"),
    (32, 1024, None, 1024, "trained length"),
    (32, 32768, 65536, 65536, "asked for"),
]


@pytest.mark.parametrize("ram, trained, asked, n_ctx, why", CONTEXTS)
def test_context(ram: float, trained: int, asked: int | None, n_ctx: int, why: str) -> None:
    sized = size_worker(Memory(int(ram * GB)), weights=300 * MB, kv_per_token=KV_PER_TOKEN, layers=18,
                        trained_ctx=trained, requested_ctx=asked, engine="llama-cpp", gpu_layers=-1, offload=True)
    assert sized.n_ctx == n_ctx and why in sized.why
    assert sized.need.kv_cache == KV_PER_TOKEN * n_ctx


def test_context_refused_below_the_floor_and_when_asked_too_big() -> None:
    with pytest.raises(NoCapacityError, match=f"KV cache for {MIN_AUTO_CTX} tokens"):
        size_worker(Memory(350 * MB), weights=300 * MB, kv_per_token=KV_PER_TOKEN, layers=18, trained_ctx=32768,
                    requested_ctx=None, engine="llama-cpp", gpu_layers=0, offload=False)
    with pytest.raises(NoCapacityError, match="for 65536 tokens"):
        size_worker(Memory(2 * GB), weights=300 * MB, kv_per_token=KV_PER_TOKEN, layers=18, trained_ctx=32768,
                    requested_ctx=65536, engine="llama-cpp", gpu_layers=0, offload=False)


def test_context_on_a_gpu_is_capped_by_vram_not_ram() -> None:
    sized = size_worker(Memory(64 * GB, cuda(0.9)), weights=300 * MB, kv_per_token=KV_PER_TOKEN, layers=18,
                        trained_ctx=32768, requested_ctx=None, engine="llama-cpp", gpu_layers=-1, offload=True)
    assert sized.placement.kind == "cuda" and sized.n_ctx == 8192


@pytest.mark.parametrize("kind, live, expected", [
    ("cuda", 1, True), ("metal", 1, True), ("cuda", 2, False), ("cpu", 1, False), ("cpu", 0, False),
])
def test_a_second_worker_only_where_a_gpu_has_room(kind: str, live: int, expected: bool) -> None:
    from rbee.hive.supervisor import scale_out

    assert scale_out(kind, live) is expected
