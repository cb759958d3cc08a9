"""A share's RPC cache filled from the helper's own GGUF: the tensors of its layers that llama.cpp
looks up by hash, each in a file named by its FNV-1a hash and holding exactly its bytes, hashed
once, with progress; and pruned of what no model on the host holds any more. (That ggml's RPC
client asks for those very names is checked against the real server in tests/e2e/test_rpc_share.py.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import pytest

from rbee.hive.gguf_meta import read_header
from rbee.hive.rpc_cache import HASH_THRESHOLD, fnv1a_64, prime, prune, share_tensors
from tests.tiny_gguf import write_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 1280: each feed-forward matrix is 13 MB of f32 (above llama.cpp's 10 MiB), the rest below
    return write_tiny_model(tmp_path_factory.mktemp("gguf") / "wide.gguf", hidden=1280)


def test_fnv1a_64_is_the_published_function() -> None:
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


def test_a_share_takes_the_large_tensors_of_its_layers_and_of_the_output_it_holds(model: Path) -> None:
    tensors = read_header(model).tensors
    assert sorted(t.name for t in share_tensors(tensors, 1, 1, output=False)) == [
        "blk.1.ffn_down.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"]
    assert share_tensors(tensors, 2, 5, output=False) == []  # past the last layer
    # the output projection of this model is 2.6 MB: sent, not cached, as llama.cpp does
    assert [t.name for t in share_tensors(tensors, 0, 0, output=True)] == []
    assert all(t.bytes > HASH_THRESHOLD for t in share_tensors(tensors, 0, 2, output=True))


def test_prime_writes_each_tensor_under_its_hash_once(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "rpc-cache"
    primed = prime(model, cache, 0, 1, output=False)
    assert (primed.tensors, primed.written) == (3, 3) and primed.bytes == 3 * 1280 * 2560 * 4
    reader = gguf.GGUFReader(model)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.0.ffn_") and tensor.name.endswith(".weight") and tensor.n_bytes > 1e6:
            data = tensor.data.tobytes()
            assert (cache / f"{fnv1a_64(data):016x}").read_bytes() == data
    assert sorted(p.name for p in cache.iterdir() if p.name != "index.json") == sorted(
        f"{fnv1a_64(t.data.tobytes()):016x}" for t in reader.tensors
        if t.name.startswith("blk.0.ffn_") and t.n_bytes > HASH_THRESHOLD)
    again = prime(model, cache, 0, 1, output=False)
    assert (again.tensors, again.written) == (3, 0)  # found by the index, nothing hashed or written
    (cache / next(p.name for p in cache.iterdir() if p.name != "index.json")).unlink()
    assert prime(model, cache, 0, 1, output=False).written == 1  # a file gone is written again
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_a_share_with_nothing_to_cache_writes_nothing(model: Path, tmp_path: Path) -> None:
    primed = prime(model, tmp_path / "rpc-cache", 0, 0, output=False)
    assert primed.tensors == 0 and not (tmp_path / "rpc-cache").exists()
    assert "its weights cross the link" in primed.describe()


def cached(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.name != "index.json"}


def test_prime_reports_its_progress_in_bytes(model: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    primed = prime(model, tmp_path / "rpc-cache", 0, 2, output=False,
                   progress=lambda done, total: seen.append((done, total)))
    assert len(seen) == primed.tensors + 1 == 7
    assert [total for _, total in seen] == [primed.bytes] * 7
    assert [done for done, _ in seen] == sorted({done for done, _ in seen})
    assert seen[0][0] == 0 and seen[-1][0] == primed.bytes


def test_prune_keeps_what_a_model_on_the_host_holds_and_removes_the_rest(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "rpc-cache"
    mine = shutil.copy(model, tmp_path / "mine.gguf")
    prime(Path(mine), cache, 0, 1, output=False)
    kept = cached(cache)
    (cache / "0123456789abcdef").write_bytes(b"x" * 100)  # llama.cpp's server saved it on a miss
    (cache / ".0123456789abcdef.1.tmp").write_bytes(b"y")  # a filler's staged file: not a cache file yet
    assert prune(cache) == (1, 100)
    assert cached(cache) == kept | {".0123456789abcdef.1.tmp"}

    os.utime(mine, ns=(1, 1))  # the model file was replaced: its tensors may be other bytes now
    files, size = prune(cache)
    assert (files, size) == (3, 3 * 1280 * 2560 * 4) and cached(cache) == {".0123456789abcdef.1.tmp"}

    prime(Path(mine), cache, 0, 1, output=False)
    Path(mine).unlink()  # the model left the catalog
    assert prune(cache)[0] == 3 and cached(cache) == {".0123456789abcdef.1.tmp"}
    assert prune(tmp_path / "nowhere") == (0, 0)


def test_priming_one_model_keeps_the_cache_of_another(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "rpc-cache"
    one, two = (Path(shutil.copy(model, tmp_path / name)) for name in ("one.gguf", "two.gguf"))
    prime(one, cache, 0, 1, output=False)
    first = cached(cache)
    assert prime(two, cache, 1, 1, output=False).written == 3  # other layers, other tensors
    assert first < cached(cache) and len(cached(cache)) == 6
    assert prime(one, cache, 0, 1, output=False).written == 0  # still indexed: nothing pruned or hashed
