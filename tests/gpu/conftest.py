"""GPU tests: run only where an NVIDIA GPU is present and llama-cpp-python was built for it
(on a lent GPU machine, through ../shared/gpu/on-device). Skipped everywhere else, CI included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def gpu_missing() -> str | None:
    if not Path("/proc/driver/nvidia/version").exists():
        return "no NVIDIA GPU on this machine"
    from rbee.engine.build import installed

    if installed() is None:
        return "llama-cpp-python is not installed"
    from rbee.engine.backends import gpu_offload_supported

    if not gpu_offload_supported():
        return "llama-cpp-python here was built without GPU support"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = gpu_missing()
    if reason is None:
        return
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def gpu_model() -> Path:
    """The 1B F16 random-weight model on-device writes (RBEE_GPU_MODEL to use another)."""
    path = Path(os.environ.get("RBEE_GPU_MODEL", "/tmp/m.gguf"))
    if not path.is_file():
        pytest.skip(f"{path} is missing: run through ../shared/gpu/on-device, which writes it")
    return path
