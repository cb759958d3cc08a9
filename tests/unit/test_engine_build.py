"""The portable build's pieces that need no compiler: its flags, how a build is recognised,
that a build without CPU modules never enters the cache, and which libggml copy a process
really holds."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from rbee.engine import build
from rbee.engine.backends import mapped_file


def wheel(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"")
    return path


def test_every_build_is_portable_and_never_native() -> None:
    for accel in ("cpu", "cuda", "metal"):
        args = build.cmake_args(accel)
        assert "-DGGML_NATIVE=OFF" in args and "-DGGML_BACKEND_DL=ON" in args and "-DGGML_CPU_ALL_VARIANTS=ON" in args
        assert "-DGGML_BACKEND_DIR:STRING=llama_cpp/lib" in args  # typed: kept relative, inside the wheel
    assert build.cmake_args("cuda").endswith("-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native")
    assert build.build_env()["CMAKE_ARGS"] == build.cmake_args()
    assert "--no-cache-dir" in build.pip_wheel_args("0.3.36", Path("/x"))  # pip's cache may hold a native build


def test_a_cpu_module_is_named_by_its_variant() -> None:
    assert build.module_variant("libggml-cpu-haswell.so") == "haswell"
    assert build.module_variant("libggml-cpu-armv8.2_1.so") == "armv8.2_1"
    assert build.module_variant("libggml-cpu.so") is None
    assert build.module_variant("libggml-cuda.so") is None


def test_a_build_without_cpu_modules_never_enters_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native = tmp_path / "native"
    native.mkdir()
    wheel(native / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl",
          ["llama_cpp/lib/libllama.so", "llama_cpp/lib/libggml-cpu.so"])
    with pytest.raises(RuntimeError, match="no per-level CPU modules"):
        build.finish_wheel("0.3.36", native, build.portable_folder("0.3.36"))
    assert build.cached_wheel("0.3.36") is None
    portable = tmp_path / "portable"
    portable.mkdir()
    wheel(portable / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl",
          ["llama_cpp/lib/libllama.so", "llama_cpp/lib/libggml-cpu-x64.so", "llama_cpp/lib/libggml-cpu-haswell.so"])
    kept = build.finish_wheel("0.3.36", portable, build.portable_folder("0.3.36"))
    assert kept == build.cached_wheel("0.3.36") and build.wheel_is_portable(kept) and not portable.exists()


def test_the_libggml_a_process_holds_is_the_mapped_copy() -> None:
    """A wheel carries libggml.so, .so.0 and .so.0.x as three files; libllama loads .so.0."""
    lib = Path("/venv/lib/python3.11/site-packages/llama_cpp/lib")
    maps = "\n".join([
        f"7f00-7f10 r-xp 00000000 fd:01 11 {lib}/libllama.so.0",
        f"7f10-7f20 r-xp 00000000 fd:01 12 {lib}/libggml-base.so.0",
        f"7f20-7f30 r-xp 00000000 fd:01 13 {lib}/libggml.so.0",
        "7f30-7f40 r-xp 00000000 fd:01 14 /other/llama_cpp/lib/libggml.so",
        "7ffd-7ffe rw-p 00000000 00:00 0 [stack]",
    ])
    assert mapped_file(lib, "libggml", maps) == lib / "libggml.so.0"
    assert mapped_file(Path("/nowhere"), "libggml", maps) is None
