"""What a GGUF file says about itself: architecture, context length, parameters,
quantization, and what admission needs (layers, KV heads, head size).

Types and names come from the ``gguf`` package (``GGUFValueType``,
``LlamaFileType``). Its ``GGUFReader`` materialises every array field — the
default model's 262k-token vocabulary — and took 11.8 s on a 2-core machine, so
this reader walks the header itself and skips arrays without decoding them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from rbee.errors import BadModelError

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    context_length: int
    parameters: int
    quantization: str
    layers: int
    kv_heads: int
    head_dim: int
    has_chat_template: bool
    #: the output projection (``output.weight``, or the token embeddings it is tied to): llama.cpp
    #: puts it, and the logits' compute buffer, with the last offloaded layer (rbee.queen.split)
    output_bytes: int = 0
    vocab: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """f16 K and V for every layer: what llama.cpp allocates for ``n_ctx`` tokens."""
        return 2 * self.layers * n_ctx * self.kv_heads * self.head_dim * 2


def _read(handle: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


MAX_STRING = 64 * 1024 * 1024  # a chat template is kilobytes; more means a corrupt length


def _string(handle: BinaryIO) -> str:
    length = _read(handle, "<Q")
    if length > MAX_STRING:
        raise ValueError(f"a string of {length} bytes")
    data = handle.read(length)
    if len(data) != length:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind == GGUFValueType.STRING:
        return _string(handle)
    if kind == GGUFValueType.ARRAY:
        item_kind, count = _read(handle, "<I"), _read(handle, "<Q")
        if item_kind == GGUFValueType.STRING:
            for _ in range(count):
                handle.seek(_read(handle, "<Q"), 1)
        elif item_kind in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[GGUFValueType(item_kind)]) * count, 1)
        else:
            for _ in range(count):
                _value(handle, item_kind)
        return None
    return _read(handle, _SCALARS[GGUFValueType(kind)])


#: the tensors whose size and shape a split needs: the output projection, or the embeddings tied to it
OUTPUT_TENSORS = ("output.weight", "token_embd.weight")
#: where tensor data starts when ``general.alignment`` does not say (the GGUF spec's default)
DEFAULT_ALIGNMENT = 32


def tensor_bytes(kind: int, dims: list[int] | tuple[int, ...]) -> int:
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        return 0
    return math.prod(dims) // block * size


@dataclass(frozen=True)
class Tensor:
    name: str
    kind: int
    dims: tuple[int, ...]
    offset: int  # from the start of the file

    @property
    def bytes(self) -> int:
        return tensor_bytes(self.kind, self.dims)


@dataclass(frozen=True)
class Header:
    """Scalar and string keys (arrays skipped), the parameter count, and every tensor's place."""

    fields: dict[str, Any]
    tensors: tuple[Tensor, ...]

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.dims) for t in self.tensors)

    @property
    def outputs(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors if t.name in OUTPUT_TENSORS}


def read_header(path: Path) -> Header:
    try:
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise BadModelError(f"{path} is not a GGUF file (bad magic)")
            version = _read(handle, "<I")
            if version < 2:
                raise BadModelError(f"{path}: GGUF version {version} is too old; convert it with a current llama.cpp")
            n_tensors, n_kv = _read(handle, "<Q"), _read(handle, "<Q")
            if n_tensors > 1_000_000 or n_kv > 1_000_000:
                raise ValueError(f"{n_tensors} tensors and {n_kv} keys")
            fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _string(handle)
                fields[key] = _value(handle, _read(handle, "<I"))
            found: list[tuple[str, int, tuple[int, ...], int]] = []
            for _ in range(n_tensors):
                name = _string(handle)
                dims = tuple(_read(handle, "<Q") for _ in range(_read(handle, "<I")))
                found.append((name, _read(handle, "<I"), dims, _read(handle, "<Q")))
            alignment = fields.get("general.alignment") or DEFAULT_ALIGNMENT
            start = -(-handle.tell() // alignment) * alignment
    except (EOFError, ValueError, struct.error, MemoryError, OverflowError, ZeroDivisionError) as exc:
        raise BadModelError(
            f"{path} is truncated or corrupt: its GGUF header cannot be read ({type(exc).__name__})"
        ) from exc
    tensors = tuple(Tensor(name, kind, dims, start + offset) for name, kind, dims, offset in found)
    return Header(fields, tensors)


def read_info(path: Path) -> GgufInfo:
    header = read_header(path)
    fields, outputs = header.fields, header.outputs
    output = outputs.get("output.weight") or outputs.get("token_embd.weight")
    arch = str(fields.get("general.architecture", "unknown"))
    heads = int(fields.get(f"{arch}.attention.head_count", 1) or 1)
    embedding = int(fields.get(f"{arch}.embedding_length", 0) or 0)
    head_dim = int(fields.get(f"{arch}.attention.key_length", 0) or (embedding // heads if heads else 0))
    file_type = fields.get("general.file_type")
    try:
        quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quant = f"type {file_type}"
    return GgufInfo(
        architecture=arch,
        context_length=int(fields.get(f"{arch}.context_length", 0) or 0),
        parameters=header.parameters,
        quantization=quant,
        layers=int(fields.get(f"{arch}.block_count", 0) or 0),
        kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", heads) or heads),
        head_dim=head_dim,
        has_chat_template="tokenizer.chat_template" in fields,
        output_bytes=output.bytes if output else 0,
        vocab=output.dims[1] if output and len(output.dims) > 1 else 0,
    )
