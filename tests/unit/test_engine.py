from __future__ import annotations

import pytest

from rbee.errors import EngineError
from rbee.hive.engine import Choice, Host, choose_engine

BOTH = frozenset({"mlx", "llama-cpp"})
LLAMA = frozenset({"llama-cpp"})
MAC_ARM = Host("darwin", "arm64", BOTH, nvidia=False, offload=True)
MAC_ARM_NO_MLX = Host("darwin", "arm64", LLAMA, nvidia=False, offload=True)
MAC_X86 = Host("darwin", "x86_64", LLAMA, nvidia=False)
LINUX_GPU = Host("linux", "x86_64", LLAMA, nvidia=True, offload=True)
LINUX_GPU_CPU_BUILD = Host("linux", "x86_64", LLAMA, nvidia=True, offload=False)
LINUX_CPU = Host("linux", "x86_64", LLAMA, nvidia=False)
LINUX_MLX_CPU = Host("linux", "x86_64", BOTH, nvidia=False)

TABLE = [
    (MAC_ARM, {"gguf", "mlx"}, "mlx", "Apple Silicon"),
    (MAC_ARM, {"gguf"}, "llama-cpp", "no MLX form"),
    (MAC_ARM, {"mlx"}, "mlx", "Apple Silicon"),
    (MAC_ARM_NO_MLX, {"gguf", "mlx"}, "llama-cpp", "mlx-lm is not installed"),
    (MAC_X86, {"gguf", "mlx"}, "llama-cpp", "CPU"),
    (MAC_X86, {"gguf"}, "llama-cpp", "CPU"),
    (LINUX_GPU, {"gguf", "mlx"}, "llama-cpp", "CUDA"),
    (LINUX_GPU, {"gguf"}, "llama-cpp", "CUDA"),
    (LINUX_GPU_CPU_BUILD, {"gguf"}, "llama-cpp", "without GPU support; rebuild it: CMAKE_ARGS='-DGGML_NATIVE=OFF"),
    (MAC_ARM_NO_MLX, {"gguf"}, "llama-cpp", "Metal"),
    (LINUX_CPU, {"gguf"}, "llama-cpp", "CPU"),
    (LINUX_CPU, {"gguf", "mlx"}, "llama-cpp", "CPU"),
    (LINUX_MLX_CPU, {"mlx"}, "mlx", "installed"),
]


@pytest.mark.parametrize("host, formats, engine, why", TABLE)
def test_auto(host: Host, formats: set[str], engine: str, why: str) -> None:
    choice = choose_engine(host, formats)
    assert choice.engine == engine and why in choice.reason
    assert choice.format == ("mlx" if engine == "mlx" else "gguf")


@pytest.mark.parametrize(
    "host, formats, requested, missing",
    [
        (LINUX_CPU, {"gguf", "mlx"}, "mlx", "not installed"),
        (MAC_X86, {"mlx"}, "auto", "no engine"),
        (LINUX_CPU, {"mlx"}, "auto", "no engine"),
        (MAC_ARM, {"gguf"}, "mlx", "only in gguf form"),
        (MAC_ARM, {"mlx"}, "llama-cpp", "only in mlx form"),
        (MAC_ARM, {"gguf"}, "tensorrt", "unknown backend"),
    ],
)
def test_impossible_requests_name_what_is_missing(host: Host, formats: set[str], requested: str, missing: str) -> None:
    with pytest.raises(EngineError, match=missing):
        choose_engine(host, formats, requested)


def test_explicit_choice_wins() -> None:
    assert choose_engine(LINUX_MLX_CPU, {"gguf", "mlx"}, "mlx") == Choice("mlx", "mlx", "mlx was asked for")
