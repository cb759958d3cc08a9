"""Download models from a Hugging Face Hub (or any server speaking its API) with
``huggingface_hub``: a GGUF file, or an MLX repository as a snapshot of just the files
mlx-lm needs. HF_ENDPOINT and HF_TOKEN are honoured (the token is never printed),
progress is narrated, an interrupted download resumes, checksums are verified where
the Hub gives them, and only a complete model is renamed into the catalog.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import tqdm as hf_tqdm

from rbee.errors import DiskFullError, DownloadError, DownloadInterruptedError, HubUnreachableError, ModelNotFoundError
from rbee.hive.models import ModelCatalog, ModelEntry, sha256_of
from rbee.hive.refs import ModelRef, entry_name, inside, is_mlx_repo, mlx_files, pick_gguf, safe_relative

log = logging.getLogger(__name__)

Narrate = Callable[..., None]

ATTEMPTS = 4


class Progress:
    """Turns byte counts into narration: size, percent, speed, ETA, at most 4 times a second (and
    always the count that completes ``total``)."""

    def __init__(self, narrate: Narrate, label: str, interval: float = 0.25, action: str = "download") -> None:
        self.narrate = narrate
        self.label = label
        self.action = action
        self.interval = interval
        self.started = time.monotonic()
        self.last = 0.0
        self.start_bytes: int | None = None

    def __call__(self, done: int, total: int | None, final: bool = False) -> None:
        now = time.monotonic()
        if self.start_bytes is None:
            self.start_bytes = done
        if not final and done != total and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        speed = (done - self.start_bytes) / elapsed
        eta = (total - done) / speed if total and speed > 0 else None
        percent = 100.0 * done / total if total else 0.0
        message = f"{self.label}: {done / 1e6:.1f}/{(total or 0) / 1e6:.1f} MB ({percent:.0f}%, {speed / 1e6:.1f} MB/s"
        message += f", ETA {eta:.0f} s)" if eta is not None else ")"
        self.narrate(self.action, message, bytes=done, total=total, speed=round(speed), eta=eta)


def progress_tqdm(report: Progress) -> type:
    """A tqdm class for huggingface_hub that reports bytes to ``report`` and prints nothing.

    snapshot_download also opens a files-count bar and a network-transfer bar with the same
    class; only the bar of bytes written (its ``name`` ends in ``snapshot_download``, or a
    single file's bar) is reported."""

    class _Tqdm(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            name = kwargs.pop("name", None) or ""
            self._reports = kwargs.get("unit") == "B" and not name.endswith(".transfer")
            kwargs["disable"] = False
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            result = super().update(n)
            if self._reports:
                report(int(self.n), int(self.total) if self.total else None)
            return result

    return _Tqdm


class HubDownloader:
    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        self.endpoint = endpoint  # None: HF_ENDPOINT or the public Hub
        self.token = token  # None: HF_TOKEN or the cached login

    @property
    def hub(self) -> str:
        """The endpoint downloads go to: the one given, else HF_ENDPOINT or the public Hub."""
        return self.endpoint or hf_constants.ENDPOINT

    def reachable(self, ref: ModelRef) -> None:
        """Fail in seconds, naming the endpoint, when the hub's host does not even accept a
        connection: huggingface_hub retries that for about 25 s. Skipped behind a proxy."""
        parts = urlsplit(self.hub)
        if parts.scheme in urllib.request.getproxies() or not parts.hostname:
            return
        try:
            socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                     timeout=5).close()
        except OSError as exc:
            raise self._unreachable(ref, exc) from exc

    def list_files(self, ref: ModelRef) -> dict[str, RepoFile]:
        """The repo's files with sizes and, for LFS files, the Hub's sha256."""
        self.reachable(ref)
        try:
            tree = HfApi(endpoint=self.endpoint, token=self.token).list_repo_tree(ref.value, recursive=True)
            return {item.path: item for item in tree if isinstance(item, RepoFile)}
        except HfHubHTTPError as exc:
            raise ModelNotFoundError(f"cannot list {ref}: {_brief(exc)}") from exc
        except Exception as exc:  # the Hub client's transport errors (connect, DNS, TLS, timeout)
            raise self._unreachable(ref, exc) from exc

    def _unreachable(self, ref: ModelRef, exc: BaseException) -> HubUnreachableError:
        return HubUnreachableError(
            f"the model hub at {self.hub} cannot be reached for {ref} ({_brief(exc)}); check this host's "
            "network, or set HF_ENDPOINT to a reachable mirror"
        )

    def provision(self, catalog: ModelCatalog, ref: ModelRef, narrate: Narrate, form: str | None = None) -> ModelEntry:
        """``form``: what the engine needs ("gguf" or "mlx"); None = whatever the repo holds, GGUF first."""
        if ref.file is None:
            files = self.list_files(ref)
            names = list(files)
            chosen = pick_gguf(names) if form != "mlx" else None
            if chosen is None:
                if form != "gguf" and is_mlx_repo(names):
                    return self._provision_snapshot(catalog, ref, files, narrate)
                wanted = {"gguf": "a .gguf file", "mlx": "an MLX model (config.json and *.safetensors)"}
                raise ModelNotFoundError(
                    f"{ref} holds {wanted[form] if form else 'neither a .gguf file nor an MLX model'}"
                    f"{'' if form == 'mlx' else f'; name a file with hf:{ref.value}:FILE.gguf'}"
                )
            ref = ModelRef("hf", ref.value, safe_relative(chosen, f"{ref} (the Hub's file {chosen!r})"))
        return self._provision_file(catalog, ref, narrate)

    def _provision_snapshot(self, catalog: ModelCatalog, ref: ModelRef, files: dict[str, RepoFile],
                            narrate: Narrate) -> ModelEntry:
        """An MLX repo: snapshot_download of only what mlx-lm needs into staging, each LFS file
        checked against the Hub's sha256, then one rename into the catalog."""
        name = entry_name(ref)
        wanted = [safe_relative(path, f"{ref} (the Hub's file {path!r})") for path in mlx_files(list(files))]
        size = sum(files[path].size or 0 for path in wanted)
        self._check_disk(catalog, ref, size)
        with catalog.claim(name) as stage_dir:
            existing = catalog.get(name)
            if existing is not None:
                catalog.check_same(existing, ref)
                return existing
            return self._snapshot_into(catalog, ref, files, wanted, size, name, stage_dir, narrate)

    def _snapshot_into(self, catalog: ModelCatalog, ref: ModelRef, files: dict[str, RepoFile], wanted: list[str],
                       size: int, name: str, stage_dir: Path, narrate: Narrate) -> ModelEntry:
        narrate("download", f"downloading {ref} (MLX, {len(wanted)} files, {size / 1e6:.1f} MB)", bytes=0, total=size)
        report = Progress(narrate, ref.value.rsplit("/", 1)[-1])
        self._retry(lambda: snapshot_download(
            ref.value, local_dir=stage_dir, allow_patterns=wanted, endpoint=self.endpoint, token=self.token,
            tqdm_class=progress_tqdm(report),
        ), str(ref), stage_dir)
        report(size, size, final=True)
        narrate("verify", f"checking the sha256 of {sum(1 for p in wanted if files[p].lfs)} LFS files")
        digest = hashlib.sha256()
        for path in sorted(wanted):
            lfs = files[path].lfs
            if lfs is not None:
                actual = sha256_of(inside(stage_dir, path))
                if actual != lfs.sha256:
                    raise DownloadError(
                        f"checksum mismatch for {ref} file {path}: the Hub says sha256 {lfs.sha256[:16]}…, the "
                        f"download is {actual[:16]}…. Nothing was kept; pull again"
                    )
                digest.update(f"{path}:{actual}\n".encode())
        shutil.rmtree(stage_dir / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
        entry = catalog.admit(name, str(ref), stage_dir, digest.hexdigest())
        narrate("provision", f"{name} is ready (MLX, {entry.info.quantization}, {entry.size / 1e6:.0f} MB)")
        return entry

    @staticmethod
    def _check_disk(catalog: ModelCatalog, ref: ModelRef, size: int) -> None:
        catalog.staging.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(catalog.staging).free
        if size and free < size * 1.02:
            raise DiskFullError(
                f"not enough disk space for {ref}: it needs {size / 1e6:.0f} MB, {catalog.root} has "
                f"{free / 1e6:.0f} MB free. Free some space (`rbee models rm`) and pull again"
            )

    def _provision_file(self, catalog: ModelCatalog, ref: ModelRef, narrate: Narrate) -> ModelEntry:
        filename = ref.file
        assert filename is not None
        full = ModelRef("hf", ref.value, filename)
        name = entry_name(full)
        with catalog.claim(name) as stage_dir:
            existing = catalog.get(name)
            if existing is not None:
                catalog.check_same(existing, full)
                return existing
            return self._download_into(catalog, full, name, stage_dir, narrate)

    def _download_into(self, catalog: ModelCatalog, full: ModelRef, name: str, stage_dir: Path,
                       narrate: Narrate) -> ModelEntry:
        filename = full.file
        assert filename is not None
        url = hf_hub_url(full.value, filename, endpoint=self.endpoint)
        self.reachable(full)
        try:
            meta = get_hf_file_metadata(url, token=self.token)
        except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
            raise ModelNotFoundError(f"{full} is not on the hub: {_brief(exc)}") from exc
        except Exception as exc:  # connect, DNS, TLS, timeout
            raise self._unreachable(full, exc) from exc
        size = meta.size or 0
        expected = (meta.etag or "").strip('"').lower()
        self._check_disk(catalog, full, size)
        narrate("download", f"downloading {full} ({size / 1e6:.1f} MB)", bytes=0, total=size)
        report = Progress(narrate, filename.rsplit("/", 1)[-1])
        path = self._download(full.value, filename, stage_dir, report)
        report(size, size, final=True)
        narrate("verify", f"checking the sha256 of {filename}")
        actual = sha256_of(path)
        if len(expected) == 64 and actual != expected:
            raise DownloadError(
                f"checksum mismatch for {full}: the Hub says sha256 {expected[:16]}…, the download is "
                f"{actual[:16]}…. Nothing was kept; pull again"
            )
        flat = inside(stage_dir, path.name)
        if path != flat:
            inside(stage_dir, str(path.relative_to(stage_dir))).rename(flat)
        entry = catalog.admit(name, str(full), flat, actual)
        narrate("provision", f"{name} is ready ({entry.info.quantization}, {entry.size / 1e6:.0f} MB)")
        return entry

    def _download(self, repo: str, filename: str, stage_dir: Path, report: Progress) -> Path:
        return Path(self._retry(lambda: hf_hub_download(
            repo, filename, local_dir=stage_dir, endpoint=self.endpoint, token=self.token,
            tqdm_class=progress_tqdm(report),
        ), f"{repo}:{filename}", stage_dir))

    @staticmethod
    def _retry(download: Callable[[], str], what: str, stage_dir: Path) -> str:
        """Run a huggingface_hub download into the staging dir; after a dropped connection the
        next attempt resumes from the bytes already there (it keeps .incomplete files)."""
        last: Exception | None = None
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return download()
            except OSError as exc:
                if getattr(exc, "errno", None) == 28:  # ENOSPC
                    shutil.rmtree(stage_dir, ignore_errors=True)
                    raise DiskFullError(f"the disk filled up while downloading {what}; nothing was kept") from exc
                last = exc
            except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
                last = exc
            except Exception as exc:  # httpx transport errors surface as several types
                last = exc
            log.warning("download of %s failed (attempt %d/%d): %s", what, attempt, ATTEMPTS, _brief(last))
            time.sleep(min(0.5 * attempt, 2.0))
        raise DownloadInterruptedError(f"download of {what} failed {ATTEMPTS} times: {_brief(last)}; pull again "
                                       "to resume it")


def _brief(exc: BaseException | None) -> str:
    return str(exc).splitlines()[0][:300] if exc else "unknown error"
