"""The provisioner with the real huggingface_hub client against a local hub-compatible server."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbee.errors import (
    BadModelError,
    BadModelRefError,
    HubUnreachableError,
    ModelError,
    ModelNotFoundError,
    RequestError,
)
from rbee.hive.models import ModelCatalog
from rbee.hive.provision import HubDownloader
from tests.hub_server import HubServer, Repo, write_tiny_gguf


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


@pytest.fixture
def hub(gguf_bytes: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[HubServer, Repo]]:
    repo = Repo(files={"tiny-Q8_0.gguf": gguf_bytes, "tiny-Q4_K_M.gguf": gguf_bytes, "README.md": b"hi"})
    with HubServer() as server:
        server.repos["acme/tiny-GGUF"] = repo
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_TOKEN", "hf_secret_token_for_tests")
        yield server, repo


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, action: str, message: str, **extra: Any) -> None:
        self.events.append((action, message, extra))

    def of(self, action: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [e for e in self.events if e[0] == action]


def catalog_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".staging" not in p.parts)


def test_download_picks_the_preferred_quant_narrates_progress_and_writes_a_manifest(hub: Any, tmp_path: Path,
                                                                                    gguf_bytes: bytes) -> None:
    server, repo = hub
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    narrate = Recorder()
    entry = catalog.resolve("hf:acme/tiny-GGUF", narrate)
    assert entry.path.name == "tiny-Q4_K_M.gguf"  # Q4_K_M before Q8_0
    assert entry.sha256 == hashlib.sha256(gguf_bytes).hexdigest()
    assert entry.info.architecture == "llama" and entry.info.context_length == 512
    progress = narrate.of("download")
    assert progress and progress[-1][2]["bytes"] == len(gguf_bytes) == progress[-1][2]["total"]
    assert all("hf_secret_token" not in message for _, message, _ in narrate.events)
    assert catalog_files(tmp_path / "models") == ["tiny-q4_k_m/manifest.json", "tiny-q4_k_m/tiny-Q4_K_M.gguf"]
    # the second resolve finds it in the catalog: no new request
    before = len(repo.requests)
    assert catalog.resolve("hf:acme/tiny-GGUF", Recorder()).path == entry.path
    assert catalog.resolve("tiny-q4_k_m", Recorder()).path == entry.path
    assert len(repo.requests) == before


def test_interrupted_download_resumes(hub: Any, tmp_path: Path) -> None:
    server, repo = hub
    # huggingface_hub writes in 10 MB chunks: cut the connection after more than one of them
    gguf_bytes = write_tiny_gguf(tmp_path / "bigger.gguf", megabytes=24).read_bytes()
    repo.files["tiny-Q8_0.gguf"] = gguf_bytes
    repo.drop_after = 15 * 1024 * 1024
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    entry = catalog.resolve("hf:acme/tiny-GGUF:tiny-Q8_0.gguf", Recorder())
    assert entry.path.read_bytes() == gguf_bytes
    ranges = [r for method, _, r in repo.requests if method == "GET" and r]
    assert ranges and int(ranges[0].split("=")[1].split("-")[0]) > 0, repo.requests


def test_checksum_mismatch_is_rejected_and_nothing_is_kept(hub: Any, tmp_path: Path) -> None:
    server, repo = hub
    repo.wrong_sha = True
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    with pytest.raises(ModelError, match="checksum mismatch"):
        catalog.resolve("hf:acme/tiny-GGUF:tiny-Q8_0.gguf", Recorder())
    assert catalog_files(tmp_path / "models") == []
    assert not list((tmp_path / "models" / ".staging").rglob("*.gguf*"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_not_enough_disk_is_refused_before_downloading(hub: Any, small_disk: Path, gguf_bytes: bytes) -> None:
    server, repo = hub
    (small_disk / "ballast").write_bytes(b"\0" * (3 * 1024 * 1024))
    catalog = ModelCatalog(small_disk / "models", HubDownloader(endpoint=server.url))
    with pytest.raises(ModelError, match="not enough disk space"):
        catalog.resolve("hf:acme/tiny-GGUF:tiny-Q8_0.gguf", Recorder())
    assert not [r for r in repo.requests if r[0] == "GET"]
    assert catalog_files(small_disk / "models") == []


def test_disk_filling_up_during_the_download_leaves_nothing(hub: Any, small_disk: Path) -> None:
    server, repo = hub
    repo.on_get = lambda: (small_disk / "ballast").write_bytes(b"\0" * (3 * 1024 * 1024))
    catalog = ModelCatalog(small_disk / "models", HubDownloader(endpoint=server.url))
    with pytest.raises(ModelError, match="disk"):
        catalog.resolve("hf:acme/tiny-GGUF:tiny-Q8_0.gguf", Recorder())
    assert catalog_files(small_disk / "models") == []
    assert not list((small_disk / "models" / ".staging").rglob("*.gguf*"))


@pytest.mark.parametrize(
    "ref",
    ["hf:acme/tiny-GGUF:../../etc/passwd.gguf", "hf:acme/tiny-GGUF:/etc/x.gguf", "file:relative/x.gguf",
     "file:/models/../etc/passwd", "../x", "hf:acme", "hf:a/b/c"],
)
def test_references_cannot_escape(ref: str, tmp_path: Path) -> None:
    with pytest.raises(RequestError):
        ModelCatalog(tmp_path).resolve(ref, Recorder())


def test_unknown_repo_is_a_clear_error(hub: Any, tmp_path: Path) -> None:
    server, _ = hub
    with pytest.raises(ModelNotFoundError, match="acme/nope"):
        ModelCatalog(tmp_path, HubDownloader(endpoint=server.url)).resolve("hf:acme/nope", Recorder())


@pytest.fixture(scope="module")
def mlx_repo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    pytest.importorskip("mlx_lm")
    from tests.mlx_model import write_tiny_mlx_model

    folder = write_tiny_mlx_model(tmp_path_factory.mktemp("mlx") / "tiny")
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    return {**files, "README.md": b"# tiny", "weights/extra.bin": b"not for mlx-lm", "model.gguf.txt": b"x"}


def test_mlx_repo_is_provisioned_as_a_snapshot_of_what_mlx_lm_needs(
    hub: Any, tmp_path: Path, mlx_repo_files: dict[str, bytes]
) -> None:
    server, _ = hub
    repo = server.repos["acme/tiny-mlx"] = Repo(files=mlx_repo_files)
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    narrate = Recorder()
    entry = catalog.resolve("hf:acme/tiny-mlx", narrate, "mlx")
    assert entry.format == "mlx" and entry.path.is_dir() and entry.ref == "hf:acme/tiny-mlx"
    assert sorted(p.name for p in entry.path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert entry.info.architecture == "llama" and entry.info.context_length == 512 and entry.info.layers == 2
    assert {name for method, name, _ in repo.requests if method == "GET"} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    progress = narrate.of("download")
    total = sum(len(mlx_repo_files[n]) for n in ("config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json"))
    assert progress[-1][2]["bytes"] == progress[-1][2]["total"] == total
    assert any("sha256" in message for _, message, _ in narrate.of("verify"))
    assert catalog_files(tmp_path / "models") == [
        "tiny-mlx/manifest.json", "tiny-mlx/mlx/config.json", "tiny-mlx/mlx/model.safetensors",
        "tiny-mlx/mlx/tokenizer.json", "tiny-mlx/mlx/tokenizer_config.json"]
    # found again in the catalog, by ref and by name, with no request
    before = len(repo.requests)
    assert catalog.resolve("hf:acme/tiny-mlx", Recorder(), "mlx").path == entry.path
    assert catalog.resolve("tiny-mlx", Recorder()).path == entry.path
    assert len(repo.requests) == before


def test_mlx_snapshot_with_a_bad_checksum_keeps_nothing(
    hub: Any, tmp_path: Path, mlx_repo_files: dict[str, bytes]
) -> None:
    server, _ = hub
    server.repos["acme/tiny-mlx"] = Repo(files=mlx_repo_files, wrong_sha=True)
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    with pytest.raises(ModelError, match=r"checksum mismatch .* model.safetensors"):
        catalog.resolve("hf:acme/tiny-mlx", Recorder(), "mlx")
    assert catalog_files(tmp_path / "models") == []


def test_a_repo_without_the_asked_form_says_which_form_is_missing(hub: Any, tmp_path: Path) -> None:
    server, _ = hub
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    with pytest.raises(ModelNotFoundError, match=r"acme/tiny-GGUF holds an MLX model \(config.json"):
        catalog.resolve("hf:acme/tiny-GGUF", Recorder(), "mlx")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("ref", ["hf:acme/tiny-GGUF", "hf:acme/tiny-GGUF:tiny-Q4_K_M.gguf"])
def test_an_unreachable_hub_is_named_and_fails_in_seconds(tmp_path: Path, ref: str) -> None:
    import time

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=endpoint))
    started = time.monotonic()
    with pytest.raises(HubUnreachableError, match=f"the model hub at {endpoint} cannot be reached") as caught:
        catalog.resolve(ref, Recorder())
    assert caught.value.status == 502 and caught.value.code == "hub_unreachable"
    assert time.monotonic() - started < 10  # not huggingface_hub's ~25 s of retries
    assert catalog_files(tmp_path / "models") == []


def test_a_file_that_is_not_a_model_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secret = tmp_path / "secrets.txt"
    secret.write_text("root:x:0:0:the first bytes of a private file\n")
    catalog = ModelCatalog(tmp_path / "models")
    with pytest.raises(BadModelError) as caught:
        catalog.resolve(f"file:{secret}", Recorder())
    assert caught.value.status == 400 and str(secret) in caught.value.message
    assert "root" not in caught.value.message.replace(str(secret), "")


def test_a_folder_that_is_not_a_model_is_refused_without_walking_it(tmp_path: Path) -> None:
    catalog = ModelCatalog(tmp_path / "models")
    with pytest.raises(BadModelError, match=r"is not an MLX model directory: it lacks config\.json"):
        catalog.resolve("file:/", Recorder())


def test_a_model_of_another_repo_with_the_same_file_name_is_never_served_in_its_place(hub: Any, tmp_path: Path,
                                                                                        gguf_bytes: bytes) -> None:
    server, _ = hub
    server.repos["mallory/x"] = Repo(files={"tiny-Q4_K_M.gguf": b"GGUF" + b"\0" * 64})
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    genuine = catalog.resolve("hf:acme/tiny-GGUF:tiny-Q4_K_M.gguf", Recorder())
    with pytest.raises(BadModelRefError, match=r"already holds hf:acme/tiny-GGUF:tiny-Q4_K_M\.gguf"):
        catalog.resolve("hf:mallory/x:tiny-Q4_K_M.gguf", Recorder())
    assert catalog.resolve("hf:acme/tiny-GGUF:tiny-Q4_K_M.gguf", Recorder()).path == genuine.path


def test_a_ref_whose_file_stem_is_dot_dot_cannot_delete_the_catalog(hub: Any, tmp_path: Path) -> None:
    """Issue 23.1: `...gguf` has the stem `..`; as a catalog name its staging dir was the models
    root, and the cleanup after the download removed every model."""
    server, repo = hub
    repo.files["...gguf"] = repo.files["tiny-Q8_0.gguf"]
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    kept = catalog.resolve("hf:acme/tiny-GGUF:tiny-Q8_0.gguf", Recorder())
    for ref in ("hf:acme/tiny-GGUF:...gguf", "hf:acme/tiny-GGUF:sub/...gguf", "hf:acme/tiny-GGUF:.hidden.gguf"):
        with pytest.raises(BadModelRefError):
            catalog.resolve(ref, Recorder())
    assert kept.path.is_file() and catalog.get(kept.name) is not None
    assert catalog_files(tmp_path / "models") == ["tiny-q8_0/manifest.json", "tiny-q8_0/tiny-Q8_0.gguf"]


def test_a_hub_listing_that_names_a_dot_dot_file_is_refused(hub: Any, tmp_path: Path) -> None:
    """A whole-repo ref picks a file from the Hub's listing: that name obeys the same rule."""
    server, _ = hub
    server.repos["mallory/dots"] = Repo(files={"...Q4_K_M.gguf": b"GGUF" + b"\0" * 64})
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "precious").write_text("keep me")
    with pytest.raises(BadModelRefError):
        catalog.resolve("hf:mallory/dots", Recorder())
    assert (tmp_path / "models" / "precious").read_text() == "keep me"


def test_two_refs_with_one_file_stem_never_share_a_download(hub: Any, tmp_path: Path, gguf_bytes: bytes) -> None:
    """Issue 23.2: both refs map to catalog name `tiny-q8_0`; the second waits for the first's
    claim on that name and is then refused, and the first's file is intact."""
    import threading

    server, repo = hub
    server.repos["other/repo"] = Repo(files={"tiny-Q8_0.gguf": gguf_bytes})
    started, release = threading.Event(), threading.Event()

    def hold() -> None:  # the first download stalls inside its staging dir until released
        started.set()
        release.wait(10)

    repo.on_get = hold
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    results: dict[str, Any] = {}

    def resolve(ref: str) -> None:
        try:
            results[ref] = catalog.resolve(ref, Recorder())
        except Exception as exc:  # collected and checked below
            results[ref] = exc

    first = threading.Thread(target=resolve, args=("hf:acme/tiny-GGUF:tiny-Q8_0.gguf",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=resolve, args=("hf:other/repo:tiny-Q8_0.gguf",))
    second.start()
    second.join(1.0)
    assert second.is_alive(), "the second ref must wait for the first's claim on the name"
    release.set()
    first.join(10)
    second.join(10)
    entry = results["hf:acme/tiny-GGUF:tiny-Q8_0.gguf"]
    assert entry.path.read_bytes() == gguf_bytes
    assert isinstance(results["hf:other/repo:tiny-Q8_0.gguf"], BadModelRefError)
    assert not list((tmp_path / "models" / ".staging").iterdir())


def test_a_whole_repo_ref_is_never_answered_by_another_repos_planted_file(hub: Any, tmp_path: Path,
                                                                          gguf_bytes: bytes) -> None:
    """Issue 23.3: `hf:acme/tiny-GGUF` must not be served by mallory's `tiny-GGUF.gguf`, whose
    stem is the repo's name."""
    server, _ = hub
    server.repos["mallory/plant"] = Repo(files={"tiny-GGUF.gguf": gguf_bytes})
    catalog = ModelCatalog(tmp_path / "models", HubDownloader(endpoint=server.url))
    planted = catalog.resolve("hf:mallory/plant:tiny-GGUF.gguf", Recorder())
    assert planted.name == "tiny-gguf"
    entry = catalog.resolve("hf:acme/tiny-GGUF", Recorder())
    assert entry.ref == "hf:acme/tiny-GGUF:tiny-Q4_K_M.gguf" and entry.path != planted.path


async def test_a_helpers_pull_fills_its_rpc_cache_with_progress_and_a_removal_prunes_it(hub: Any,
                                                                                        tmp_path: Path) -> None:
    """A split's helper is provisioned by one pull job: the model, then its share's part of it in
    llama.cpp's RPC cache, both narrated; removing the model from the catalog frees that cache."""
    from rbee.config import HiveConfig
    from rbee.hive.service import Hive
    from rbee.hive.supervisor import Supervisor
    from rbee.link.jobs import Job
    from rbee.link.schemas import SharePart
    from tests.tiny_gguf import write_tiny_model

    server, repo = hub
    repo.files["wide-Q4_K_M.gguf"] = write_tiny_model(tmp_path / "wide.gguf", hidden=1280).read_bytes()
    config = HiveConfig(name="bee-b", home=tmp_path / "home", models_dir=tmp_path / "models")
    hive = Hive(config, Supervisor(config, "http://127.0.0.1:9"),
                ModelCatalog(config.models_dir, HubDownloader(endpoint=server.url)))
    cache = hive.supervisor.shares.cache
    job = Job("job-test", config.actor)
    await hive.pull(job, "hf:acme/tiny-GGUF:wide-Q4_K_M.gguf", SharePart(layers=(1, 1), output=False))
    said = [(e["action"], e["message"]) for e in job.history if e.type == "narration"]
    filling = [message for action, message in said if action == "cache"]
    assert filling and filling[-1].startswith("filling the RPC cache for layers 1–1 from wide-q4_k_m: 39.3/39.3 MB")
    assert job.history[-1].type == "end"
    files = sorted(p.name for p in cache.iterdir() if p.name != "index.json")
    assert len(files) == 3  # blk.1's three feed-forward matrices, each over llama.cpp's 10 MiB
    # the share itself then only checks: nothing is hashed or written again
    words = await hive.fill_share_cache("wide-q4_k_m", SharePart(layers=(1, 1)))
    assert words == "3 tensors (39 MB) read from its own copy of the model, smaller ones over the link"
    await hive.remove_model("wide-q4_k_m")
    assert sorted(p.name for p in cache.iterdir() if p.name != "index.json") == []
    assert await hive.fill_share_cache("wide-q4_k_m", SharePart(layers=(1, 1))) == (
        "hive:bee-b has no GGUF of wide-q4_k_m in its catalog: its weights cross the link")
