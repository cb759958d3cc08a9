"""How rbee builds llama-cpp-python: one build that runs on every CPU of its platform.

llama.cpp's own release binaries are built this way: no ``-march=native`` (``GGML_NATIVE=OFF``),
the CPU kernels compiled once per instruction-set level (``GGML_CPU_ALL_VARIANTS``) as modules
loaded at run time (``GGML_BACKEND_DL``), so the level is chosen on the machine that runs it
(``rbee.engine.backends``). ``scripts/setup``, the wheel the queen pushes to hosts of its own
platform and the builds made on hosts (CUDA, Metal, another platform) all use these flags; pip's
wheel cache is never trusted for it (it may hold a native build), the portable wheel is kept in
rbee's own cache, ``~/.cache/rbee/engine/``.

Standard library only: ``scripts/setup`` runs ``python -m rbee.engine.build`` before rbee's
dependencies are installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

#: the llama-cpp-python that is built when the environment has none
LLAMA_CPP_PYTHON = "0.3.36"
#: bumped when the flags change, so hosts installed with older flags are rebuilt or reinstalled
BUILD_ID = "portable-2"
#: where the build installs the per-level CPU modules: next to libllama, where rbee loads them from.
#: Typed STRING: an untyped -D of a PATH option is made absolute against the build directory, which
#: would install them outside the wheel and compile a temporary folder in as a place to load from.
MODULE_DIR = "llama_cpp/lib"
#: LLAVA_BUILD=OFF: the multimodal library, which rbee does not load (images are refused), is
#: not built. GGML_RPC=ON: the RPC backend (a module beside the CPU ones) through which a model is
#: split across hosts; every build has it, so any host can serve a share or run the main worker
PORTABLE = ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
            f"-DGGML_BACKEND_DIR:STRING={MODULE_DIR}", "-DLLAVA_BUILD=OFF", "-DGGML_RPC=ON")
#: what an accelerator adds; CUDA kernels are built for the GPUs of the host that builds them (a
#: CUDA build is made on its host and never copied), as GGML_NATIVE=ON would have
ACCELERATOR: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "cuda": ("-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=native"),
    "metal": ("-DGGML_METAL=on",),
}
CPU_MODULE_PREFIX = "libggml-cpu-"


def cmake_args(accel: str = "cpu") -> str:
    return " ".join((*PORTABLE, *ACCELERATOR[accel]))


def build_env(accel: str = "cpu") -> dict[str, str]:
    """The environment a llama-cpp-python build runs in, on the queen or on a host."""
    return {"CMAKE_ARGS": cmake_args(accel), "FORCE_CMAKE": "1"}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rbee" / "engine"


@dataclass(frozen=True)
class Installed:
    """The llama-cpp-python this Python imports, as rbee sees its build."""

    version: str
    lib_dir: Path
    cpu_modules: tuple[str, ...]  # variant names, e.g. ("haswell", "x64", …); empty: one CPU backend built in

    @property
    def portable(self) -> bool:
        return bool(self.cpu_modules)

    @property
    def kind(self) -> str:
        return "portable" if self.portable else "single"

    def describe(self) -> str:
        how = (f"portable build, {len(self.cpu_modules)} CPU variants" if self.portable
               else "single build (CPU kernels for the machine it was built on)")
        return f"llama-cpp-python {self.version}, {how}"


def module_variant(filename: str) -> str | None:
    """``libggml-cpu-haswell.so`` → ``haswell``."""
    if not filename.startswith(CPU_MODULE_PREFIX):
        return None
    stem = filename[len(CPU_MODULE_PREFIX):]
    for suffix in (".so", ".dylib", ".dll"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return None


def installed() -> Installed | None:
    """Found without importing llama_cpp (which loads the native library)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    version = ""
    init = package / "__init__.py"
    if init.is_file():
        for line in init.read_text(errors="replace").splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    lib_dir = package / "lib"
    names = sorted(p.name for p in lib_dir.iterdir()) if lib_dir.is_dir() else []
    modules = tuple(v for v in (module_variant(name) for name in names) if v)
    return Installed(version or "unknown", lib_dir, modules)


def wheel_is_portable(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(module_variant(Path(name).name) for name in archive.namelist()
                   if name.startswith(MODULE_DIR + "/"))


def portable_folder(version: str) -> Path:
    return cache_dir() / f"{BUILD_ID}-{version}"


def cached_wheel(version: str) -> Path | None:
    found = sorted(portable_folder(version).glob("llama_cpp_python-*.whl"))
    return found[0] if found else None


def pip_wheel_args(version: str, wheel_dir: Path) -> list[str]:
    """pip's arguments for the build; ``--no-cache-dir``: pip's wheel cache is keyed by the
    source, not the flags, and may hold a native build of the same version."""
    return ["wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python", "--disable-pip-version-check",
            "--wheel-dir", str(wheel_dir), f"llama-cpp-python=={version}"]


def finish_wheel(version: str, tmp: Path, folder: Path, portable: bool = True) -> Path:
    """Check a fresh build and move it into ``folder``, whole or not at all; a build meant to be
    portable without per-level CPU modules is refused."""
    wheels = sorted(tmp.glob("llama_cpp_python-*.whl"))
    if not wheels or (portable and not wheel_is_portable(wheels[0])):
        raise RuntimeError(f"the llama-cpp-python {version} build in {tmp} has no per-level CPU modules "
                           f"({MODULE_DIR}/{CPU_MODULE_PREFIX}*.so); its build log says why")
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder / wheels[0].name


def build_wheel(version: str, folder: Path, cmake: str, portable: bool = True) -> Path:
    """Build llama-cpp-python ``version`` with the CMake flags ``cmake`` into ``folder``: in a
    temporary folder beside it, then checked and renamed in whole. pip's output goes to
    ``<folder>.log``, whose end a failure quotes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    log = folder.with_name(folder.name + ".log")
    try:
        with open(log, "w") as out:
            done = subprocess.run([sys.executable, "-m", "pip", *pip_wheel_args(version, tmp)],
                                  env={**os.environ, "CMAKE_ARGS": cmake, "FORCE_CMAKE": "1"}, stdout=out,
                                  stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-20:])
            raise RuntimeError(f"building llama-cpp-python {version} failed; the end of {log}:\n{tail}")
        return finish_wheel(version, tmp, folder, portable)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def portable_wheel(version: str) -> Path:
    """The portable wheel of ``version`` from rbee's cache, built first when missing (minutes)."""
    found = cached_wheel(version)
    if found is not None:
        return found
    print(f"building llama-cpp-python {version} for every CPU of this platform ({cmake_args()}); "
          "this takes a while the first time", file=sys.stderr, flush=True)
    started = time.monotonic()
    wheel = build_wheel(version, portable_folder(version), cmake_args())
    print(f"built {wheel.name} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return wheel


def ensure(force: bool = False) -> Installed:
    """Make this environment's llama-cpp-python the portable build (install it when there is none,
    replace a single build, e.g. one pip made with ``-march=native``)."""
    current = installed()
    if current is not None and current.portable and not force:
        return current
    version = current.version if current is not None and current.version != "unknown" else LLAMA_CPP_PYTHON
    if current is not None:
        print(f"replacing {current.describe()} with the portable build", file=sys.stderr)
    wheel = portable_wheel(version)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--force-reinstall", "--no-deps", str(wheel)], check=True)
    importlib.invalidate_caches()
    after = installed()
    if after is None or not after.portable:
        raise RuntimeError(f"installed {wheel.name}, but {sys.executable} does not import it")
    return after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rbee.engine.build",
                                     description="Make this environment's llama-cpp-python the portable build.")
    parser.add_argument("--force", action="store_true", help="reinstall it even when it is already portable")
    args = parser.parse_args(argv)
    try:
        engine = ensure(force=args.force)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"rbee: could not build the portable llama-cpp-python: {exc}", file=sys.stderr)
        return 1
    print(f"engine: {engine.describe()} ({engine.lib_dir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
