"""What the engine itself says about where a model went: device, layers offloaded out of
the total, and the memory its weights and KV cache took on the device and in RAM.

llama.cpp tells this only in its load log (``using device CUDA0 (NVIDIA H100 …)``,
``offloaded 19/19 layers to GPU``, ``CUDA0 model buffer size = 1907.00 MiB``,
``CUDA0 KV buffer size = …``); llama-cpp-python exposes no call for it. So the worker
captures that log while loading (``llama_log_set``) and this pure parser reads it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

MIB = 1024 * 1024

_DEVICE = re.compile(r"using device (\S+) \(([^)]*)\)")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"(\S+) (model|KV) buffer size\s*=\s*([\d.]+) MiB")


@dataclass(frozen=True)
class EngineReport:
    device: str  # "CPU", "CUDA0 (NVIDIA H100 80GB HBM3)", "Metal (Apple M2 Max)", "CUDA0 + CUDA1 (…)"
    layers_offloaded: int
    layers_total: int
    weights_on_device: int  # bytes in GPU (or unified Metal) buffers
    kv_on_device: int
    weights_in_ram: int
    kv_in_ram: int
    n_ctx: int
    gpu_offload_supported: bool
    cpu_variant: str = ""  # llama.cpp's CPU kernels it loaded (a portable build), e.g. "haswell"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def summary(self) -> str:
        where = f"on {self.device}: {self.layers_offloaded}/{self.layers_total} layers offloaded"
        if self.weights_on_device or self.kv_on_device:
            where += (f", {self.weights_on_device / 1e6:.0f} MB weights + {self.kv_on_device / 1e6:.0f} MB KV "
                      "cache in device memory")
        else:
            where += f", {self.weights_in_ram / 1e6:.0f} MB weights + {self.kv_in_ram / 1e6:.0f} MB KV cache in RAM"
        kernels = f", {self.cpu_variant} CPU kernels" if self.cpu_variant else ""
        return where + f", context {self.n_ctx}{kernels}"


def is_host_buffer(name: str) -> bool:
    """CPU, CPU_Mapped, CPU_REPACK, CUDA_Host (pinned RAM) are RAM; CUDA0, Metal, Vulkan0 … are the device."""
    return name.startswith("CPU") or name.endswith("_Host")


def parse_load_log(text: str, *, layers_total: int, n_ctx: int, gpu_offload_supported: bool,
                   cpu_variant: str = "") -> EngineReport:
    """``layers_total``: repeating layers + the output layer, as llama.cpp counts offloadable ones."""
    devices = [f"{name} ({description})" for name, description in _DEVICE.findall(text)]
    offloaded = _OFFLOADED.findall(text)
    done, total = (int(offloaded[-1][0]), int(offloaded[-1][1])) if offloaded else (0, layers_total)
    sizes = {("model", True): 0.0, ("model", False): 0.0, ("KV", True): 0.0, ("KV", False): 0.0}
    for name, kind, mib in _BUFFER.findall(text):
        sizes[(kind, not is_host_buffer(name))] += float(mib)
    if done == 0 or not devices:
        device = "CPU"
    elif len(devices) == 1:
        device = devices[0]
    else:
        device = " + ".join(devices)
    return EngineReport(
        device=device,
        layers_offloaded=done,
        layers_total=total,
        weights_on_device=int(sizes[("model", True)] * MIB),
        kv_on_device=int(sizes[("KV", True)] * MIB),
        weights_in_ram=int(sizes[("model", False)] * MIB),
        kv_in_ram=int(sizes[("KV", False)] * MIB),
        n_ctx=n_ctx,
        gpu_offload_supported=gpu_offload_supported,
        cpu_variant=cpu_variant,
    )
