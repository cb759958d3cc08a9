"""Download GGUF models from a Hugging Face Hub (or any server speaking its API)
with ``huggingface_hub``: HF_ENDPOINT and HF_TOKEN are honoured (the token is never
printed), progress is narrated, an interrupted download resumes, the checksum is
verified, and only a complete file is renamed into the catalog.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import tqdm as hf_tqdm

from rbee.errors import ModelError, ModelNotFoundError
from rbee.hive.models import ModelCatalog, ModelEntry, sha256_of
from rbee.hive.refs import ModelRef, entry_name, pick_gguf

log = logging.getLogger(__name__)

Narrate = Callable[..., None]

ATTEMPTS = 4


class Progress:
    """Turns byte counts into narration: size, percent, speed, ETA, at most 4 times a second."""

    def __init__(self, narrate: Narrate, label: str, interval: float = 0.25) -> None:
        self.narrate = narrate
        self.label = label
        self.interval = interval
        self.started = time.monotonic()
        self.last = 0.0
        self.start_bytes: int | None = None

    def __call__(self, done: int, total: int | None, final: bool = False) -> None:
        now = time.monotonic()
        if self.start_bytes is None:
            self.start_bytes = done
        if not final and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        speed = (done - self.start_bytes) / elapsed
        eta = (total - done) / speed if total and speed > 0 else None
        percent = 100.0 * done / total if total else 0.0
        message = f"{self.label}: {done / 1e6:.1f}/{(total or 0) / 1e6:.1f} MB ({percent:.0f}%, {speed / 1e6:.1f} MB/s"
        message += f", ETA {eta:.0f} s)" if eta is not None else ")"
        self.narrate("download", message, bytes=done, total=total, speed=round(speed), eta=eta)


def progress_tqdm(report: Progress) -> type:
    """A tqdm class for huggingface_hub that reports to ``report`` and prints nothing."""

    class _Tqdm(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = False
            kwargs["file"] = io.StringIO()
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            result = super().update(n)
            report(int(self.n), int(self.total) if self.total else None)
            return result

    return _Tqdm


class HubDownloader:
    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        self.endpoint = endpoint  # None: HF_ENDPOINT or the public Hub
        self.token = token  # None: HF_TOKEN or the cached login

    def pick_file(self, ref: ModelRef) -> str:
        try:
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(ref.value)
        except HfHubHTTPError as exc:
            raise ModelNotFoundError(f"cannot list {ref}: {_brief(exc)}") from exc
        files = [sibling.rfilename for sibling in info.siblings or []]
        chosen = pick_gguf(files)
        if chosen is None:
            raise ModelNotFoundError(f"{ref} holds no .gguf file; name one with hf:{ref.value}:FILE.gguf")
        return chosen

    def provision(self, catalog: ModelCatalog, ref: ModelRef, narrate: Narrate) -> ModelEntry:
        filename = ref.file or self.pick_file(ref)
        full = ModelRef("hf", ref.value, filename)
        name = entry_name(full)
        existing = catalog.get(name)
        if existing is not None:
            return existing
        url = hf_hub_url(ref.value, filename, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, token=self.token)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise ModelNotFoundError(f"cannot reach {full}: {_brief(exc)}") from exc
        size = meta.size or 0
        expected = (meta.etag or "").strip('"').lower()
        catalog.staging.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(catalog.staging).free
        if size and free < size * 1.02:
            raise ModelError(
                f"not enough disk space for {full}: it needs {size / 1e6:.0f} MB, {catalog.root} has "
                f"{free / 1e6:.0f} MB free. Free some space (`rbee models rm`) and pull again"
            )
        stage_dir = catalog.staging / name
        narrate("download", f"downloading {full} ({size / 1e6:.1f} MB)", bytes=0, total=size)
        report = Progress(narrate, filename.rsplit("/", 1)[-1])
        path = self._download(ref.value, filename, stage_dir, report)
        report(size, size, final=True)
        narrate("verify", f"checking the sha256 of {filename}")
        actual = sha256_of(path)
        if len(expected) == 64 and actual != expected:
            shutil.rmtree(stage_dir, ignore_errors=True)
            raise ModelError(
                f"checksum mismatch for {full}: the Hub says sha256 {expected[:16]}…, the download is "
                f"{actual[:16]}…. Nothing was kept; pull again"
            )
        flat = stage_dir / path.name
        if path != flat:
            path.rename(flat)
        try:
            entry = catalog.admit(name, str(full), flat, actual)
        finally:
            shutil.rmtree(stage_dir, ignore_errors=True)
        narrate("provision", f"{name} is ready ({entry.info.quantization}, {entry.size / 1e6:.0f} MB)")
        return entry

    def _download(self, repo: str, filename: str, stage_dir: Path, report: Progress) -> Path:
        """hf_hub_download into the staging dir; after a dropped connection the next attempt
        resumes from the bytes already there (huggingface_hub keeps an .incomplete file)."""
        last: Exception | None = None
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return Path(
                    hf_hub_download(
                        repo, filename, local_dir=stage_dir, endpoint=self.endpoint, token=self.token,
                        tqdm_class=progress_tqdm(report),
                    )
                )
            except OSError as exc:
                if getattr(exc, "errno", None) == 28:  # ENOSPC
                    shutil.rmtree(stage_dir, ignore_errors=True)
                    raise ModelError(f"the disk filled up while downloading {filename}; nothing was kept") from exc
                last = exc
            except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
                last = exc
            except Exception as exc:  # httpx transport errors surface as several types
                last = exc
            log.warning("download of %s failed (attempt %d/%d): %s", filename, attempt, ATTEMPTS, _brief(last))
            time.sleep(min(0.5 * attempt, 2.0))
        raise ModelError(f"download of {repo}:{filename} failed {ATTEMPTS} times: {_brief(last)}")


def _brief(exc: BaseException | None) -> str:
    return str(exc).splitlines()[0][:300] if exc else "unknown error"
