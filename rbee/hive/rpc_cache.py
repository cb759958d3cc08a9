"""A share's weights from the helper's own copy of the model, so the link does not carry them.

ggml's RPC client asks the server for every weight tensor larger than ``HASH_THRESHOLD`` by the
FNV-1a hash of its bytes first (``RPC_CMD_SET_TENSOR_HASH``); a server started with a cache
folder answers from the file named by that hash there, and only on a miss are the bytes sent
(and then saved there). Before a share starts, its hive writes those files from the GGUF in its
own catalog for the layers the share will hold, so even the first load of a split reads the
large tensors on the helper. Smaller tensors (norms, biases; a small model's whole layers) are
always sent: that is llama.cpp's rule, not rbee's.

The hashes come from ``fnv-c`` (C, through cffi): ggml's own ``fnv_hash`` is static in
``ggml-rpc.cpp``, and FNV-1a cannot be vectorised in numpy (each byte's step needs the last).
A tensor's hash is kept in ``index.json`` by file, size and mtime, so a second share of the same
model hashes nothing. A wrong guess of which layers the share holds costs only a miss: the file
name is the content's hash, so a wrong file can never be served.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fnv_c.ext._fnv import ffi, lib

from rbee.hive.gguf_meta import Tensor, read_header

#: ggml-rpc.cpp: tensors larger than this are looked up by hash before their bytes are sent
HASH_THRESHOLD = 10 * 1024 * 1024
INDEX = "index.json"
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Primed:
    """What a share's cache holds for it: ``tensors`` files of ``bytes`` in all, ``written`` of
    them written now (the rest were there), in ``seconds``."""

    tensors: int = 0
    bytes: int = 0
    written: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        if not self.tensors:
            return "no tensor of its layers is large enough for llama.cpp's cache: its weights cross the link"
        return (f"{self.tensors} tensor{'s' if self.tensors > 1 else ''} ({self.bytes / 1e6:.0f} MB) read from its "
                "own copy of the model, smaller ones over the link")


def fnv1a_64(data: memoryview | bytes) -> int:
    """ggml-rpc.cpp's ``fnv_hash``: FNV-1a, 64 bits."""
    return int(lib.fnv1a_64(ffi.from_buffer(data), len(data)))


def share_tensors(tensors: tuple[Tensor, ...], first: int, count: int, output: bool) -> list[Tensor]:
    """The cacheable tensors of layers ``first`` .. ``first + count - 1``, and of the output
    projection when the share holds it (``output.weight``, else the embeddings tied to it)."""
    names = {t.name for t in tensors}
    out = "output.weight" if "output.weight" in names else "token_embd.weight"
    chosen = []
    for tensor in tensors:
        layer = _LAYER.match(tensor.name)
        if (layer and first <= int(layer.group(1)) < first + count) or (output and tensor.name == out):
            if tensor.bytes > HASH_THRESHOLD:
                chosen.append(tensor)
    return chosen


def prime(model: Path, cache: Path, first: int, count: int, output: bool) -> Primed:
    """Fill ``cache`` with the share's large tensors from ``model`` (OSError, e.g. a full disk,
    leaves no partial file behind)."""
    started = time.monotonic()
    wanted = share_tensors(read_header(model).tensors, first, count, output)
    if not wanted:
        return Primed()
    cache.mkdir(parents=True, exist_ok=True)
    stat = model.stat()
    source = f"{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache / INDEX
    try:
        index: dict[str, str] = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    written = 0
    with model.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for tensor in wanted:
            key = f"{source}|{tensor.name}"
            with memoryview(mapped)[tensor.offset:tensor.offset + tensor.bytes] as data:
                name = index.get(key) or f"{fnv1a_64(data):016x}"
                index[key] = name
                if _present(cache / name, tensor.bytes):
                    continue
                _write(cache / name, data)
            written += 1
    with contextlib.suppress(OSError):  # only a shortcut for next time
        _write(index_path, json.dumps(index).encode())
    return Primed(len(wanted), sum(t.bytes for t in wanted), written, time.monotonic() - started)


def _present(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _write(path: Path, data: memoryview | bytes) -> None:
    """``data`` at ``path`` whole or not at all: the server reads a file without checking its
    hash, so no reader may see part of one, and two shares filling the cache at once (two split
    jobs of the same model) each write a temporary file of their own."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    staged = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
