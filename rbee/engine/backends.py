"""Load llama.cpp's backends into this process, with the CPU variant rbee chose.

A portable build registers no backend by itself: llama.cpp would search the Python
executable's folder and the current directory for them (``ggml_backend_load_all``), which
finds nothing in a venv and would load whatever ``libggml-*.so`` sits in the working directory.
So before any model loads, this registers the build's own modules by path: every accelerator
(CUDA, Metal, …) and exactly one CPU variant, the one asked for (the hive passes the variant
its proof kept, ``RBEE_CPU_VARIANT``) or else the one llama.cpp's own check scores best on
this CPU. A single build (llama.cpp compiled with its backends built in) needs none of this.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from rbee.engine.build import CPU_MODULE_PREFIX, Installed, installed
from rbee.engine.cpu import local_cpu
from rbee.errors import EngineBuildError

#: the CPU variant a worker loads: set by its hive from the verdict of the proof, or by the operator
VARIANT_ENV = "RBEE_CPU_VARIANT"
#: the core libraries of a build, not backends; and the RPC backend, loaded only by a process that
#: takes part in a split (rbee.engine.rpc): registered, it would make llama.cpp report GPU offload
CORE = ("libggml.", "libggml-base.", "libllama.", "libmtmd.", "libllava.", "libggml-rpc.")


@dataclass(frozen=True)
class Loaded:
    build: Installed
    variant: str  # "" for a single build
    accelerators: tuple[str, ...]  # module file names, e.g. ("libggml-cuda.so",)


_lock = threading.Lock()
_loaded: Loaded | None = None
_accelerators: tuple[str, ...] | None = None


def module_suffix() -> str:
    return ".dll" if sys.platform == "win32" else ".so"


def accelerator_modules(build: Installed) -> list[Path]:
    suffix = module_suffix()
    return sorted(path for path in build.lib_dir.glob(f"libggml-*{suffix}")
                  if not path.name.startswith((CPU_MODULE_PREFIX, *CORE)))


def module_path(build: Installed, variant: str) -> Path:
    return build.lib_dir / f"{CPU_MODULE_PREFIX}{variant}{module_suffix()}"


def scores(build: Installed) -> dict[str, int]:
    """llama.cpp's own score of each CPU variant on this CPU (``ggml_backend_score``: cpuid, as
    ``ggml_backend_load_all`` asks it); 0 = the CPU lacks something the variant needs."""
    import llama_cpp  # noqa: F401  (the modules need its libggml-base loaded: they carry no search path)

    found = {}
    for variant in build.cpu_modules:
        score = ctypes.CDLL(str(module_path(build, variant))).ggml_backend_score
        score.restype = ctypes.c_int
        found[variant] = int(score())
    return found


def choose_variant(build: Installed, asked: str = "") -> str:
    """The variant to load: the one asked for when the build has it, else the one llama.cpp
    scores best on this CPU."""
    if asked:
        if asked not in build.cpu_modules:
            raise EngineBuildError(f"CPU variant {asked!r} ({VARIANT_ENV}) is not in this build; it has: "
                                   f"{', '.join(build.cpu_modules)}")
        return asked
    scored = {name: score for name, score in scores(build).items() if score > 0}
    if not scored:
        cpu = local_cpu()
        raise EngineBuildError(f"none of llama.cpp's CPU variants in {build.lib_dir} runs on this CPU ({cpu.model}: "
                               f"{cpu.summary()}); rebuild the engine here: python -m rbee.engine.build --force")
    return max(scored, key=lambda name: scored[name])


def mapped_file(lib_dir: Path, stem: str, maps: str) -> Path | None:
    """Which file of ``lib_dir`` named ``stem.so*`` a process has mapped, from its
    ``/proc/self/maps`` text."""
    folder = str(lib_dir.resolve())
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = Path(fields[5]) if len(fields) == 6 else None
        if path is not None and str(path.parent) == folder and (
                path.name == f"{stem}.so" or path.name.startswith(f"{stem}.so.")):
            return path
    return None


def registry() -> ctypes.CDLL:
    """The libggml whose backend registry llama.cpp reads, for the build installed here."""
    return _ggml(require_installed())


def _ggml(build: Installed) -> ctypes.CDLL:
    """The very libggml that libllama links: its registry is the one llama.cpp reads. A wheel
    holds ``libggml.so``, ``.so.0`` and ``.so.0.x`` as three copies, and libllama loads
    ``.so.0``; opening another copy would register the backends into a second, unused registry.
    So the file is the one this process has mapped since ``import llama_cpp`` loaded libllama."""
    import llama_cpp  # noqa: F401
    from llama_cpp._ctypes_extensions import load_shared_library

    try:
        with open("/proc/self/maps") as handle:
            path = mapped_file(build.lib_dir, "libggml", handle.read())
    except OSError:
        path = None
    lib = ctypes.CDLL(str(path)) if path is not None else load_shared_library("ggml", build.lib_dir)
    lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load.restype = ctypes.c_void_p
    return lib


def _register_accelerators(build: Installed, ggml: ctypes.CDLL) -> tuple[str, ...]:
    global _accelerators
    if _accelerators is None:
        _accelerators = tuple(path.name for path in accelerator_modules(build)
                              if ggml.ggml_backend_load(os.fsencode(path)))
    return _accelerators


def load(variant: str | None = None) -> Loaded:
    """Register the build's backends once per process (later calls return the first result).
    ``variant``: None takes ``RBEE_CPU_VARIANT``, else the variant proven here
    (``rbee.engine.proof``); "" lets llama.cpp's scores decide."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        build = require_installed()
        if not build.portable:
            _loaded = Loaded(build, "", ())
            return _loaded
        name = choose_variant(build, _asked() if variant is None else variant)
        ggml = _ggml(build)
        accelerators = _register_accelerators(build, ggml)
        cpu_path = module_path(build, name)
        if not ggml.ggml_backend_load(os.fsencode(cpu_path)):
            raise EngineBuildError(f"llama.cpp refused its {name} CPU kernels ({cpu_path}): this CPU does not "
                                   f"report every instruction they need. Choose another variant ({VARIANT_ENV}) or "
                                   "let rbee prove one: python -m rbee.engine.proof --again")
        _loaded = Loaded(build, name, accelerators)
        return _loaded


def variant_here() -> str:
    """The CPU variant a worker of this host loads (what :func:`load` would pick, without loading
    it): "" for a single build. Baselines built for comparison use it too (bench.llama_tools)."""
    build = require_installed()
    return choose_variant(build, _asked()) if build.portable else ""


def _asked() -> str:
    forced = os.environ.get(VARIANT_ENV, "")
    if forced:
        return forced
    from rbee.engine.proof import recorded

    kept = recorded()
    return kept.variant if kept is not None else ""


def require_installed() -> Installed:
    build = installed()
    if build is None:
        raise EngineBuildError("llama-cpp-python is not installed in this environment; run scripts/setup "
                               "(or `python -m rbee.engine.build`)")
    return build


def gpu_offload_supported() -> bool:
    """Whether the installed llama-cpp-python can put layers on a GPU. The hive asks this: for a
    portable build only its accelerator modules are registered (no CPU kernels are loaded into
    the hive), and without one the answer is known from the files alone."""
    build = installed()
    if build is None:
        return False
    if build.portable:
        with _lock:
            if not _register_accelerators(build, _ggml(build)):
                return False
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())
