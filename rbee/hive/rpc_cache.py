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

The cache is pruned whenever it is filled and when a model leaves the catalog: a file stays only
while a model file on this host, as it is now (same size and mtime), holds its tensor. The rest
goes: tensors of a model that was removed or replaced, and those llama.cpp's server saved on a
miss (bytes that crossed the link; they would cross again next time).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fnv_c.ext._fnv import ffi, lib

from rbee.hive.gguf_meta import Tensor, read_header

#: ggml-rpc.cpp: tensors larger than this are looked up by hash before their bytes are sent
HASH_THRESHOLD = 10 * 1024 * 1024
INDEX = "index.json"
_LAYER = re.compile(r"^blk\.(\d+)\.")
_NAME = re.compile(r"^[0-9a-f]{16}$")  # ggml names a cache file by the 64-bit hash, in hex
#: one filler or pruner of a cache folder at a time (two split jobs may fill one host's cache): the
#: index is rewritten whole, and a pruner must not take a file a filler wrote but has not indexed yet
_LOCK = threading.Lock()


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


def prime(model: Path, cache: Path, first: int, count: int, output: bool,
          progress: Callable[[int, int], None] | None = None) -> Primed:
    """Fill ``cache`` with the share's large tensors from ``model`` (OSError, e.g. a full disk,
    leaves no partial file behind); ``progress(done, total)`` in bytes, at the start and after each
    tensor."""
    started = time.monotonic()
    wanted = share_tensors(read_header(model).tensors, first, count, output)
    if not wanted:
        return Primed()
    cache.mkdir(parents=True, exist_ok=True)
    source = _source(model)
    total = sum(t.bytes for t in wanted)
    written = done = 0
    if progress is not None:
        progress(0, total)
    with _LOCK:
        index, _ = _pruned(cache, _read_index(cache))
        try:
            with model.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                for tensor in wanted:
                    key = f"{source}|{tensor.name}"
                    with memoryview(mapped)[tensor.offset:tensor.offset + tensor.bytes] as data:
                        name = index.get(key) or f"{fnv1a_64(data):016x}"
                        index[key] = name
                        if not _present(cache / name, tensor.bytes):
                            _write(cache / name, data)
                            written += 1
                    done += tensor.bytes
                    if progress is not None:
                        progress(done, total)
        finally:
            with contextlib.suppress(OSError):  # only a shortcut for next time
                _write(cache / INDEX, json.dumps(index).encode())
    return Primed(len(wanted), total, written, time.monotonic() - started)


def prune(cache: Path) -> tuple[int, int]:
    """Remove the cache files no model on this host holds as it is now; returns (files, bytes)."""
    if not cache.is_dir():
        return 0, 0
    with _LOCK:
        index, gone = _pruned(cache, _read_index(cache))
        with contextlib.suppress(OSError):
            _write(cache / INDEX, json.dumps(index).encode())
    return len(gone), sum(gone.values())


def _source(model: Path) -> str:
    """A model file as the index keys it: path, size and mtime (a replaced file is another source)."""
    stat = model.stat()
    return f"{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_index(cache: Path) -> dict[str, str]:
    try:
        index = json.loads((cache / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in index.items()} if isinstance(index, dict) else {}


def _files(cache: Path) -> dict[str, int]:
    """The cache's tensor files (by ggml's naming) and their sizes."""
    found = {}
    for entry in os.scandir(cache):
        if _NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                found[entry.name] = entry.stat(follow_symlinks=False).st_size
    return found


def _pruned(cache: Path, index: dict[str, str]) -> tuple[dict[str, str], dict[str, int]]:
    """``index`` without the entries of model files that are gone or changed, and the cache
    without the files no entry left names, with their sizes (called under the lock)."""
    live: dict[str, bool] = {}

    def current(source: str) -> bool:
        if source not in live:
            path = source.rsplit("|", 2)[0]
            try:
                live[source] = _source(Path(path)) == source
            except OSError:
                live[source] = False
        return live[source]

    kept = {key: name for key, name in index.items() if current(key.rsplit("|", 1)[0])}
    wanted = set(kept.values())
    gone = {}
    for name, size in _files(cache).items():
        if name not in wanted:
            with contextlib.suppress(OSError):
                (cache / name).unlink()
                gone[name] = size
    return kept, gone


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
