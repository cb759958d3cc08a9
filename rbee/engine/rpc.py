"""llama.cpp's RPC backend, through the installed build: serve this host's devices to another
host's worker, or attach a remote server's devices to this process so a model's layers go there.

llama-cpp-python 0.3.36 has no ``rpc_servers`` parameter, but its build carries the backend
(``GGML_RPC=ON`` in every build rbee makes) as a module beside the CPU kernels. Its two entry
points are found the way llama.cpp's own ``--rpc`` finds them: the ``RPC`` registry's
``ggml_backend_rpc_start_server`` and ``ggml_backend_rpc_add_server``. A registry added with
``ggml_backend_register`` puts its devices ahead of the local GPUs when the model loads
(llama.cpp: "add RPC servers at the front of the list"), so ``n_gpu_layers`` of the last layers
and their KV cache go to the remote devices and the rest stays here.

The server speaks TCP only and has no authentication: it is never started where anything but
rbee's own bridge can reach it (``rbee.link.private``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

from rbee.engine import backends
from rbee.errors import EngineBuildError, ModelLoadError

RPC_MODULE = "libggml-rpc"
#: a split worker's micro-batch: the helper holding the output projection also holds the logits'
#: compute buffer, a vocabulary row per token of it (64 MB at 262k entries, against 512 MB at
#: llama.cpp's usual 512)
SPLIT_UBATCH = 64
#: ggml_backend_dev_type: what a server offers (a GPU where the host has one, else the CPU)
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, DEVICE_ACCEL = 0, 1, 2, 3

_lock = threading.Lock()
_reg: int | None = None
_attached: list[str] = []


def attached() -> int:
    """How many RPC servers this process has added (a split worker's, before its model loads)."""
    return len(_attached)


@functools.cache
def _ggml() -> ctypes.CDLL:
    lib = backends.registry()
    for name, args, result in (
        ("ggml_backend_reg_by_name", [ctypes.c_char_p], ctypes.c_void_p),
        ("ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        ("ggml_backend_register", [ctypes.c_void_p], None),
        ("ggml_backend_dev_count", [], ctypes.c_size_t),
        ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
        ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int),
        ("ggml_backend_dev_backend_reg", [ctypes.c_void_p], ctypes.c_void_p),
        ("ggml_backend_reg_name", [ctypes.c_void_p], ctypes.c_char_p),
    ):
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return lib


def rpc_registry() -> int:
    """The RPC backend's registry, its module loaded once (a portable build keeps it apart)."""
    global _reg
    with _lock:
        if _reg is None:
            backends.load()
            lib = _ggml()
            reg = lib.ggml_backend_reg_by_name(b"RPC")
            build = backends.require_installed()
            module = build.lib_dir / f"{RPC_MODULE}{backends.module_suffix()}"
            if not reg and module.is_file():
                reg = lib.ggml_backend_load(os.fsencode(module))
            if not reg:
                raise EngineBuildError(f"this llama.cpp build ({build.lib_dir}) has no RPC backend, so it cannot "
                                       "take part in a model split across hosts; rebuild the engine with rbee's "
                                       "flags: python -m rbee.engine.build --force")
            _reg = int(reg)
        return _reg


def _entry(name: bytes, signature: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    address = _ggml().ggml_backend_reg_get_proc_address(rpc_registry(), name)
    if not address:
        raise EngineBuildError(f"this llama.cpp build's RPC backend lacks {name.decode()}")
    return signature(address)


def serving_devices() -> list[int]:
    """What a server offers, as llama.cpp's rpc-server picks: every GPU, else the CPU."""
    lib = _ggml()
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    gpus = [dev for dev in devices if lib.ggml_backend_dev_type(dev) in (DEVICE_GPU, DEVICE_IGPU)
            and lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)) != b"RPC"]
    return gpus or [dev for dev in devices if lib.ggml_backend_dev_type(dev) == DEVICE_CPU][:1]


def serve(endpoint: str, cache_dir: Path | None, threads: int) -> None:
    """Run llama.cpp's RPC server on ``endpoint`` ("127.0.0.1:PORT"); returns only if it fails.
    ``cache_dir``: where it keeps the large tensors it was sent, by hash, so the next load of the
    same model reads them from disk instead of the link."""
    start = _entry(b"ggml_backend_rpc_start_server", ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)))
    devices = serving_devices()
    array = (ctypes.c_void_p * len(devices))(*devices)
    start(endpoint.encode(), os.fsencode(cache_dir) if cache_dir else None, threads, len(devices), array)


def attach(endpoint: str) -> int:
    """Add the RPC server at ``endpoint`` to this process's devices (before the model loads);
    returns how many devices it offers."""
    add = _entry(b"ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    reg = add(endpoint.encode())
    if not reg:
        raise ModelLoadError(f"the RPC server of this model's share at {endpoint} did not answer; the helper "
                             "host's share is not running")
    lib = _ggml()
    lib.ggml_backend_register(reg)
    _attached.append(endpoint)
    return sum(1 for i in range(lib.ggml_backend_dev_count())
               if lib.ggml_backend_dev_backend_reg(lib.ggml_backend_dev_get(i)) == reg)
