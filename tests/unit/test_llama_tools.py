"""The baselines' build: llama.cpp's tools get the CPU kernels of the variant rbee's workers load
on this host, so the hot-path bench compares one engine's kernels with the same kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import hot_path, llama_tools
from rbee.engine import backends
from rbee.engine.build import Installed
from rbee.engine.cpu import X86_FLAGS
from rbee.errors import EngineBuildError

BUILD = Installed("0.3.36", Path("/nowhere"), ("x64", "haswell", "zen4"))


def switched(flags: list[str]) -> dict[str, str]:
    return dict(flag.removeprefix("-DGGML_").split("=") for flag in flags if flag.startswith("-DGGML_"))


def test_a_variant_is_built_with_its_own_instruction_sets_and_no_others() -> None:
    zen4 = switched(llama_tools.cmake_flags("zen4"))
    assert {name for name, value in zen4.items() if value == "ON"} == {
        "RPC", "SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"}
    assert zen4["NATIVE"] == "OFF"  # never the build machine's own CPU
    assert set(X86_FLAGS) <= set(zen4)  # every feature named, so none is left to CMake's default
    haswell = switched(llama_tools.cmake_flags("haswell"))
    assert haswell["AVX2"] == "ON" and haswell["AVX512"] == "OFF" and haswell["AVX_VNNI"] == "OFF"


def test_a_single_build_or_an_unknown_variant_is_refused_by_name() -> None:
    with pytest.raises(SystemExit, match="single build"):
        llama_tools.cmake_flags("")
    with pytest.raises(SystemExit, match=r"no x86 CPU variant 'armv8\.2_1'.*haswell"):
        llama_tools.cmake_flags("armv8.2_1")


def test_the_tools_follow_the_variant_this_hosts_workers_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "require_installed", lambda: BUILD)
    monkeypatch.setattr(llama_tools, "ensure", lambda variant: Path("/tools") / variant)
    monkeypatch.setenv(backends.VARIANT_ENV, "zen4")
    assert backends.variant_here() == "zen4"
    assert hot_path.default_tools() == Path("/tools/zen4")
    monkeypatch.setenv(backends.VARIANT_ENV, "skylakex")  # forced, but not in this build
    with pytest.raises(EngineBuildError, match="'skylakex'"):
        hot_path.default_tools()


def test_a_run_against_other_kernels_says_so_and_fails_its_target() -> None:
    """The run that had haswell tools beside zen4 workers (2026-12-03 03:17) read as all met."""
    from tests.unit.test_gpu_section import HOT_PATH

    worker: Any = HOT_PATH["workers"]

    def section(tools: str, workers: str) -> dict[str, Any]:
        return {**HOT_PATH, "levels": [1, 8], "gpu_layers": None, "threads": 2, "tools": tools,
                "workers": [{**worker[0], "engine": {"device": "CPU", "cpu_variant": workers}}]}

    mixed = section("/root/.cache/rbee/llama-tools/0.3.36-haswell", "zen4")
    assert ("the baselines run the CPU kernels rbee's workers load", "tools haswell, rbee zen4", False) in \
        hot_path.targets(mixed)
    assert "with the `haswell` CPU kernels while rbee's workers load `zen4`: NOT like for like" in \
        hot_path.render(mixed)[0]
    same = section("/root/.cache/rbee/llama-tools/0.3.36-zen4", "zen4")
    assert ("the baselines run the CPU kernels rbee's workers load", "tools zen4, rbee zen4", True) in \
        hot_path.targets(same)
    assert "with the `zen4` CPU kernels rbee's workers load here" in hot_path.render(same)[0]
    assert llama_tools.tools_variant(Path("/tmp/llama-bin")) == ""  # a CUDA build's folder: no CPU row
