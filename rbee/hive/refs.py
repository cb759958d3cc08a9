"""Model references, parsed and checked before anything touches the disk.

    gemma3-270m | default           the built-in default model
    hf:org/repo                     a GGUF file of that Hub repo, picked by quantization preference,
                                    or, for an MLX repo (config.json + *.safetensors), a snapshot of it
    hf:org/repo:path/file.gguf      that file of that repo
    file:/absolute/path.gguf        a file already on the host
    NAME                            an entry of the host's catalog (`rbee models list`)
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rbee.config import DEFAULT_MODEL
from rbee.errors import BadModelRefError

#: The one rule for every name rbee gives a file or folder (catalog entries, staging dirs): it
#: starts with a letter or digit, so ``.``, ``..`` and hidden names can never be one.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

#: Preferred GGUF quantizations when a repo holds several, best first.
QUANT_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q5_0", "Q6_K", "Q8_0", "BF16", "F16", "F32")


@dataclass(frozen=True)
class ModelRef:
    kind: str  # default | hf | file | name
    value: str  # repo for hf, path for file, name for name
    file: str | None = None  # hf file inside the repo

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.value}" + (f":{self.file}" if self.file else "")
        if self.kind == "file":
            return f"file:{self.value}"
        return self.value


def safe_name(name: str, what: str) -> str:
    """``name`` if it passes the one rule, else a 400 naming ``what`` it came from."""
    if not NAME.fullmatch(name):
        raise BadModelRefError(f"{what}: {name!r} cannot name a model on disk; names start with a letter or digit "
                               "and hold only letters, digits, '.', '_' and '-' (at most 128)")
    return name


def inside(parent: Path, *parts: str) -> Path:
    """``parent/parts…``, proven (after resolving links) to lie strictly inside ``parent``
    before anything is written to or removed from it."""
    path = parent.joinpath(*parts)
    if not path.resolve().is_relative_to(parent.resolve()) or path.resolve() == parent.resolve():
        raise BadModelRefError(f"{'/'.join(parts)!r} would lead outside {parent}; rbee refuses it")
    return path


def safe_relative(path: str, ref: str) -> str:
    """A file path inside a repo (from a ref or the Hub's listing): relative, no ``..`` or
    hidden parts, each part a plain name."""
    pure = PurePosixPath(path)
    if (pure.is_absolute() or not pure.parts or any(part.startswith(".") for part in pure.parts)
            or path.startswith("~") or "\\" in path or "\x00" in path or any(ord(c) < 32 for c in path)):
        raise BadModelRefError(f"model reference {ref!r}: the file part must be a plain relative path inside the repo")
    return str(pure)


def parse_ref(ref: str | None) -> ModelRef:
    if ref is None or ref in ("", "default", DEFAULT_MODEL):
        return ModelRef("default", DEFAULT_MODEL)
    if ref.startswith("hf:"):
        body = ref[3:]
        repo, _, file = body.partition(":")
        parts = repo.split("/")
        if len(parts) != 2 or not all(REPO_PART.fullmatch(part) for part in parts):
            raise BadModelRefError(f"model reference {ref!r}: write hf:org/repo or hf:org/repo:file.gguf")
        if file:
            file = safe_relative(file, ref)
            if not file.endswith(".gguf"):
                raise BadModelRefError(f"model reference {ref!r}: rbee loads .gguf files from the Hub")
        return ModelRef("hf", repo, file or None)
    if ref.startswith("file:"):
        path = ref[5:]
        pure = PurePosixPath(path)
        if not pure.is_absolute():
            raise BadModelRefError(f"model reference {ref!r}: a file: path must be absolute")
        if ".." in pure.parts or "\x00" in path:
            raise BadModelRefError(f"model reference {ref!r}: '..' is not allowed in a file: path")
        return ModelRef("file", path)
    if NAME.fullmatch(ref):
        return ModelRef("name", ref)
    raise BadModelRefError(
        f"unknown model reference {ref!r}: use {DEFAULT_MODEL}, a catalog name, hf:org/repo[:file.gguf] "
        "or file:/absolute/path.gguf"
    )


def pick_gguf(files: list[str]) -> str | None:
    """The GGUF a repo should serve by default: the best quantization by QUANT_PREFERENCE."""
    ggufs = [f for f in files if f.endswith(".gguf") and "mmproj" not in f.lower()]
    for quant in QUANT_PREFERENCE:
        for name in sorted(ggufs):
            if quant.lower() in PurePosixPath(name).name.lower():
                return name
    return sorted(ggufs)[0] if ggufs else None


#: What mlx-lm reads from a model repo; everything else (READMEs, other formats) stays on the Hub.
MLX_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
                "*.tiktoken")


def mlx_files(files: list[str]) -> list[str]:
    """The files of a repo an MLX snapshot takes (top level only: mlx-lm reads nothing deeper)."""
    return sorted(f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in MLX_PATTERNS))


def is_mlx_repo(files: list[str]) -> bool:
    top = {f for f in files if "/" not in f}
    has_tokenizer = bool(top & {"tokenizer.json", "tokenizer.model"}) or any(f.endswith(".tiktoken") for f in top)
    return "config.json" in top and any(f.endswith(".safetensors") for f in top) and has_tokenizer


def entry_name(ref: ModelRef) -> str:
    """The catalog name a provisioned model gets, checked against the one name rule."""
    if ref.kind == "default":
        return DEFAULT_MODEL
    if ref.kind == "name":
        return safe_name(ref.value, "model name")
    source = PurePosixPath(ref.file).stem if ref.kind == "hf" and ref.file else ref.value.split("/")[-1]
    return safe_name(re.sub(r"[^A-Za-z0-9._-]", "-", source).lower(), f"model reference {str(ref)!r}")
