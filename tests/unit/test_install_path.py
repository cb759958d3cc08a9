"""How each host gets rbee and its engine (the rule `fleet plan` shows and `fleet up` follows),
and the wheel tags asked of the package index for another platform."""

from __future__ import annotations

import pytest

from rbee.engine.build import BUILD_ID
from rbee.errors import WheelhouseError
from rbee.link.schemas import HostProbe
from rbee.queen.fleet.plan import install_path, plan_host
from rbee.queen.fleet.wheelhouse import Platform, platform_args

LINUX = Platform("linux", "x86_64", "3.11")
LINUX_312 = Platform("linux", "x86_64", "3.12")
LINUX_ARM = Platform("linux", "aarch64", "3.11")
MAC = Platform("darwin", "arm64", "3.12")

#: every build is the portable one: no -march=native, a CPU module per instruction-set level
PORTABLE = ("-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_BACKEND_DIR:STRING=llama_cpp/lib "
            "-DLLAVA_BUILD=OFF -DGGML_RPC=ON")
CUDA_ARGS = f"{PORTABLE} -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native"
METAL_ARGS = f"{PORTABLE} -DGGML_METAL=on"

PATHS = [
    # (queen, host, nvidia, nvcc, build) -> (same platform, build on host, cmake args, says)
    (LINUX, LINUX, False, False, "auto", True, None, PORTABLE,
     "this queen's own packages; llama-cpp-python as this queen's portable wheel"),
    (LINUX, LINUX, True, True, "auto", True, "cuda", CUDA_ARGS, "built on the host for CUDA"),
    (LINUX, LINUX, True, False, "auto", True, None, PORTABLE, "no CUDA toolkit (nvcc)"),
    (LINUX, LINUX, False, False, "source", True, "cpu", PORTABLE, "built on the host for the CPU only"),
    (LINUX, LINUX_312, False, False, "auto", False, "cpu", PORTABLE,
     "binary wheels for cp312-linux-x86_64 from the package"),
    (LINUX, LINUX_ARM, True, True, "auto", False, "cuda", CUDA_ARGS, "cp311-linux-aarch64"),
    (LINUX, MAC, False, False, "auto", False, "metal", METAL_ARGS, "built on the host for Metal"),
    (MAC, MAC, False, False, "auto", True, None, PORTABLE, "portable wheel"),  # the queen's own wheel has Metal
    (MAC, LINUX, True, True, "auto", False, "cuda", CUDA_ARGS, "cp311-linux-x86_64 from the package index"),
    (MAC, LINUX, False, False, "auto", False, "cpu", PORTABLE, "for the CPU only"),
]


@pytest.mark.parametrize("queen, host, nvidia, nvcc, build, same, builds, cmake, says", PATHS)
def test_install_path(queen: Platform, host: Platform, nvidia: bool, nvcc: bool, build: str, same: bool,
                      builds: str | None, cmake: str, says: str) -> None:
    path = install_path(queen, host, nvidia=nvidia, nvcc=nvcc, build=build)
    assert path.same_platform == same and path.build == builds and path.cmake_args == cmake
    assert says in path.describe()
    assert path.marker == (f"source+{builds}" if builds else "wheel") + f":{BUILD_ID}"


def test_plan_shows_the_install_path() -> None:
    path = install_path(LINUX, MAC, nvidia=False, nvcc=False)
    probe = HostProbe(system="darwin", machine="arm64", python="3.12")
    step = plan_host("mac-studio", probe, "d" * 24, path=path)
    assert step.action == "install" and "built on the host for Metal" in step.as_dict()["path"]
    assert plan_host("x", None, "", "timed out").as_dict()["path"] == ""


TAGS = [
    (Platform("linux", "x86_64", "3.11"), ["manylinux_2_39_x86_64", "manylinux_2_17_x86_64", "linux_x86_64"]),
    (Platform("linux", "aarch64", "3.12"), ["manylinux_2_28_aarch64", "linux_aarch64"]),
    (Platform("darwin", "arm64", "3.12"), ["macosx_11_0_arm64", "macosx_14_0_arm64", "macosx_11_0_universal2"]),
    (Platform("darwin", "x86_64", "3.11"), ["macosx_11_0_x86_64"]),
    (Platform("linux", "amd64", "3.11"), ["manylinux_2_17_x86_64"]),
]


@pytest.mark.parametrize("target, expected", TAGS)
def test_wheel_tags_for_another_platform(target: Platform, expected: list[str]) -> None:
    args = platform_args(target)
    tags = args[1::2]
    assert set(args[0::2]) == {"--platform"}
    for tag in expected:
        assert tag in tags
    assert target.tag.startswith(f"cp{target.python.replace('.', '')}-{target.system}")


def test_no_wheels_for_an_unknown_os() -> None:
    with pytest.raises(WheelhouseError, match="windows"):
        platform_args(Platform("windows", "x86_64", "3.11"))
