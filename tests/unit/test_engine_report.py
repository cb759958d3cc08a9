"""The engine's own load log → where the model went. The CUDA and Metal logs are the
lines llama.cpp prints (src/llama.cpp, llama-model.cpp, llama-kv-cache.cpp); the CPU
one is checked for real in tests/server/test_worker_app.py."""

from __future__ import annotations

from rbee.link.engine_report import MIB, parse_load_log

CUDA_LOG = """\
llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:19:00.0) - 80614 MiB free
llama_model_loader: loaded meta data with 23 key-value pairs and 147 tensors from /tmp/m.gguf (version GGUF V3)
load_tensors: offloading output layer to GPU
load_tensors: offloading 16 repeating layers to GPU
load_tensors: offloaded 17/17 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   250.00 MiB
load_tensors:        CUDA0 model buffer size =  1907.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =   256.00 MiB
llama_context:      CUDA0 compute buffer size =   300.75 MiB
llama_context:  CUDA_Host compute buffer size =    12.01 MiB
"""

SPLIT_LOG = """\
llama_model_load_from_file_impl: using device CUDA0 (NVIDIA RTX 4090) (0000:01:00.0) - 20000 MiB free
llama_model_load_from_file_impl: using device CUDA1 (NVIDIA RTX 4090) (0000:02:00.0) - 20000 MiB free
load_tensors: offloaded 33/33 layers to GPU
load_tensors:        CUDA0 model buffer size =  7000.00 MiB
load_tensors:        CUDA1 model buffer size =  6000.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB
llama_kv_cache:      CUDA1 KV buffer size =   512.00 MiB
"""

PARTIAL_LOG = """\
llama_model_load_from_file_impl: using device CUDA0 (NVIDIA RTX 3060) (0000:01:00.0) - 11000 MiB free
load_tensors: offloaded 10/33 layers to GPU
load_tensors:   CPU_Mapped model buffer size =  3000.00 MiB
load_tensors:        CUDA0 model buffer size =  1300.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =   160.00 MiB
llama_kv_cache:        CPU KV buffer size =   352.00 MiB
"""

METAL_LOG = """\
llama_model_load_from_file_impl: using device Metal (Apple M2 Max) (unknown id) - 49151 MiB free
load_tensors: offloaded 19/19 layers to GPU
load_tensors: Metal_Mapped model buffer size =   241.05 MiB
load_tensors:   CPU_Mapped model buffer size =    85.00 MiB
llama_kv_cache:      Metal KV buffer size =   576.00 MiB
"""

CPU_BUILD_LOG = """\
load_tensors:   CPU_Mapped model buffer size =   241.05 MiB
llama_kv_cache:        CPU KV buffer size =    36.00 MiB
"""


def test_all_layers_on_one_cuda_gpu() -> None:
    report = parse_load_log(CUDA_LOG, layers_total=17, n_ctx=4096, gpu_offload_supported=True)
    assert report.device == "CUDA0 (NVIDIA H100 80GB HBM3)"
    assert (report.layers_offloaded, report.layers_total) == (17, 17)
    assert report.weights_on_device == 1907 * MIB and report.kv_on_device == 256 * MIB
    assert report.weights_in_ram == 250 * MIB and report.kv_in_ram == 0
    assert "17/17 layers offloaded" in report.summary and "device memory" in report.summary


def test_split_over_two_gpus_names_both() -> None:
    report = parse_load_log(SPLIT_LOG, layers_total=33, n_ctx=8192, gpu_offload_supported=True)
    assert report.device == "CUDA0 (NVIDIA RTX 4090) + CUDA1 (NVIDIA RTX 4090)"
    assert report.weights_on_device == 13000 * MIB and report.kv_on_device == 1024 * MIB


def test_partial_offload_counts_both_sides() -> None:
    report = parse_load_log(PARTIAL_LOG, layers_total=33, n_ctx=8192, gpu_offload_supported=True)
    assert (report.layers_offloaded, report.layers_total) == (10, 33)
    assert report.kv_on_device == 160 * MIB and report.kv_in_ram == 352 * MIB


def test_metal_unified_memory() -> None:
    report = parse_load_log(METAL_LOG, layers_total=19, n_ctx=32768, gpu_offload_supported=True)
    assert report.device == "Metal (Apple M2 Max)" and report.layers_offloaded == 19
    assert report.weights_on_device == int(241.05 * MIB) and report.kv_on_device == 576 * MIB


def test_a_cpu_build_reports_cpu_and_nothing_offloaded() -> None:
    report = parse_load_log(CPU_BUILD_LOG, layers_total=19, n_ctx=2048, gpu_offload_supported=False)
    assert report.device == "CPU" and (report.layers_offloaded, report.layers_total) == (0, 19)
    assert report.weights_in_ram == int(241.05 * MIB) and report.kv_in_ram == 36 * MIB
    assert "0/19 layers offloaded" in report.summary and "in RAM" in report.summary
