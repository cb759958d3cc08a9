"""Which engine a worker runs: one small pure function of the host and the model.

MLX on Apple Silicon when the model has an MLX form and mlx-lm is installed;
llama.cpp otherwise (on the GPU when the host has one and llama-cpp-python was built
for it, else CPU; a GPU the build cannot use is said so, with the fix). An explicit
choice (``--backend`` or the hive's ``backend =``) wins, and a choice that cannot be
met is an error naming what is missing.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Collection
from dataclasses import dataclass

from rbee.engine.build import cmake_args
from rbee.errors import EngineError

FORMAT_OF = {"mlx": "mlx", "llama-cpp": "gguf"}


@dataclass(frozen=True)
class Host:
    os: str  # darwin | linux | windows
    arch: str  # arm64 | x86_64 | aarch64
    engines: frozenset[str]  # engines importable on the host
    nvidia: bool
    offload: bool = False  # llama-cpp-python here was built with GPU offload (CUDA, Metal, …)


@dataclass(frozen=True)
class Choice:
    engine: str
    format: str
    reason: str


@functools.cache
def installed_engines() -> frozenset[str]:
    """Engines importable here; looked up once (a lookup walks sys.path)."""
    found = set()
    if importlib.util.find_spec("llama_cpp") is not None:
        found.add("llama-cpp")
    if importlib.util.find_spec("mlx_lm") is not None:
        found.add("mlx")
    return frozenset(found)


#: what to run on a host whose llama-cpp-python cannot use its NVIDIA GPU
CUDA_REBUILD = (f"CMAKE_ARGS='{cmake_args('cuda')}' pip install --force-reinstall --no-cache-dir --no-binary "
                "llama-cpp-python llama-cpp-python (needs the CUDA toolkit; `rbee fleet up` does this on hosts with "
                "nvcc)")


@functools.cache
def gpu_offload_supported() -> bool:
    """Whether the installed llama-cpp-python can put layers on a GPU; asked once (it loads the
    native library, so call it off the event loop the first time)."""
    if "llama-cpp" not in installed_engines():
        return False
    from rbee.engine import backends

    return backends.gpu_offload_supported()


def choose_engine(host: Host, formats: Collection[str], requested: str = "auto") -> Choice:
    """``formats``: the forms the model exists in ("gguf", "mlx")."""
    if requested not in ("auto", "mlx", "llama-cpp"):
        raise EngineError(f"unknown backend {requested!r}: use auto, mlx or llama-cpp")
    if requested != "auto":
        fmt = FORMAT_OF[requested]
        if requested not in host.engines:
            hint = "pip install 'rbee[mlx]'" if requested == "mlx" else "pip install llama-cpp-python"
            raise EngineError(f"backend {requested} was asked for, but it is not installed on this {host.os}/"
                              f"{host.arch} host; {hint}")
        if fmt not in formats:
            raise EngineError(f"backend {requested} needs the model in {fmt} form; it is only in "
                              f"{', '.join(sorted(formats)) or 'no known'} form")
        return Choice(requested, fmt, f"{requested} was asked for")
    apple = host.os == "darwin" and host.arch in ("arm64", "aarch64")
    if apple and "mlx" in host.engines and "mlx" in formats:
        return Choice("mlx", "mlx", "Apple Silicon with mlx-lm and an MLX form of the model")
    if "llama-cpp" in host.engines and "gguf" in formats:
        if host.offload and (host.nvidia or apple):
            why = f"llama.cpp on {'CUDA' if host.nvidia else 'Metal'}"
        elif host.nvidia:
            why = ("llama.cpp on CPU: this host has an NVIDIA GPU, but its llama-cpp-python was built without "
                   f"GPU support; rebuild it: {CUDA_REBUILD}")
        else:
            why = "llama.cpp on CPU"
        if apple and "mlx" not in formats:
            why += " (no MLX form of the model)"
        elif apple and "mlx" not in host.engines:
            why += " (mlx-lm is not installed)"
        return Choice("llama-cpp", "gguf", why)
    if "mlx" in host.engines and "mlx" in formats:
        return Choice("mlx", "mlx", "mlx-lm is the engine installed for the model's form")
    raise EngineError(
        f"no engine on this {host.os}/{host.arch} host can run the model: it is in "
        f"{', '.join(sorted(formats)) or 'no known'} form and the host has "
        f"{', '.join(sorted(host.engines)) or 'no engine'} installed"
    )
