"""llama.cpp's own tools as baselines: ``llama-batched-bench`` (the engine's own ceiling),
``llama-server`` and ``ggml-rpc-server`` (a split hand-run with ``llama-server --rpc``), built from
the llama.cpp vendored in the installed llama-cpp-python's source (the same version), with the
CPU kernels of the variant rbee's workers load here, and ggml's RPC backend.

    python -m bench.llama_tools [--variant zen4]   # prints the folder holding them (default: the
                                                   # variant rbee's workers load here)

Built once per llama-cpp-python version and variant into ``~/.cache/rbee/llama-tools/`` (15
to 30 minutes on 2 cores); later calls return the cached folder at once. No ``-march=native``:
the flags are the variant's own, as ggml's CMakeLists lists them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rbee.engine import backends, cpu
from rbee.engine import build as engine_build

TOOLS = ("llama-batched-bench", "llama-server", "ggml-rpc-server")
def cmake_flags(variant: str) -> list[str]:
    """The variant's own instruction sets on, every other off, as ggml's CMakeLists builds the
    module a portable engine loads (``rbee.engine.cpu.VARIANTS`` mirrors that list)."""
    if not variant:
        raise SystemExit("the installed engine is a single build, not one of ggml's CPU variants: name the variant "
                         "to build llama.cpp's tools for (--variant, or RBEE_CPU_VARIANT)")
    variants = {v.name: v.needs for v in cpu.VARIANTS["x86_64"]}
    if variant not in variants:
        raise SystemExit(f"llama.cpp has no x86 CPU variant {variant!r} to build the tools for; it has: "
                         f"{', '.join(variants)}")
    on = set(variants[variant])
    return ["-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON",
            *(f"-DGGML_{flag}={'ON' if flag in on else 'OFF'}" for flag in cpu.X86_FLAGS)]


def version() -> str:
    from importlib.metadata import version as installed_version

    return installed_version("llama_cpp_python")


def source_archive(wanted: str) -> Path:
    """llama-cpp-python's sdist of ``wanted``: kept by rbee's fleet wheelhouse, else from pip."""
    name = f"llama_cpp_python-{wanted}.tar.gz"
    for found in (Path.home() / ".cache" / "rbee" / "wheelhouse").glob(f"**/{name}"):
        return found
    target = engine_build.cache_dir() / "sdist"
    target.mkdir(parents=True, exist_ok=True)
    if not (target / name).is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={wanted}", "-d", str(target)], check=True)
    return target / name


def tools_dir(variant: str) -> Path:
    return engine_build.cache_dir().parent / "llama-tools" / f"{version()}-{variant}"


def tools_variant(folder: Path) -> str:
    """The CPU variant a folder of :func:`tools_dir` was built for ("" for another folder, e.g. a
    CUDA build's /tmp/llama-bin)."""
    suffix = folder.name.rsplit("-", 1)[-1]
    return suffix if suffix in {v.name for v in cpu.VARIANTS["x86_64"]} else ""


def ensure(variant: str) -> Path:
    """The folder holding the tools, built now if missing (a folder from before ``ggml-rpc-server`` was
    one of them is built again: its ``llama-server`` has no ``--rpc``)."""
    folder = tools_dir(variant)
    if all((folder / tool).is_file() for tool in TOOLS):
        return folder
    with tempfile.TemporaryDirectory(prefix="llama-tools-") as tmp:
        with tarfile.open(source_archive(version())) as archive:
            archive.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *cmake_flags(variant)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target", *TOOLS],
                       check=True, stdout=subprocess.DEVNULL)
        staged = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, staged / tool)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete one
        os.replace(staged, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_tools", description=__doc__.split("\n")[0])
    parser.add_argument("--variant", help="a CPU variant of ggml's (default: the one rbee's workers load here)")
    args = parser.parse_args(argv)
    print(ensure(args.variant or backends.variant_here()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
