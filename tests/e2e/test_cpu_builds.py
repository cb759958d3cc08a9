"""The engine rbee installed runs on other CPUs, and a worker killed by a signal is explained.

- The portable build decodes the default model under ``qemu-x86_64 -cpu Haswell`` (AVX2, no
  AVX-512: an older box than most build machines) with the variant llama.cpp picks there, and
  its first tokens at temperature 0 are the native run's.
- A worker that dies by SIGILL (a stand-in that kills itself that way when its job arrives)
  reaches the keeper's stderr as the signal, what it means, the build and the fix; nothing of
  the chain is left running.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rbee.engine.build import installed
from rbee.engine.proof import TOKENS, recorded
from tests.helpers import run_rbee

QEMU = shutil.which("qemu-x86_64")


def decode(model: Path, prefix: list[str], variant: str, timeout: float) -> dict[str, object]:
    """``variant`` "": the one llama.cpp scores best on the CPU it sees."""
    done = subprocess.run([*prefix, sys.executable, "-m", "rbee.engine.proof", "--child", "--decode", variant,
                           "--model", str(model)], capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.timeout(600)
def test_the_installed_engine_decodes_on_a_haswell_cpu_like_it_does_here(models_dir: Path) -> None:
    build = installed()
    if build is None or not build.portable:
        pytest.fail("llama-cpp-python is not rbee's portable build: run scripts/setup")
    if platform.machine() != "x86_64" or QEMU is None:
        pytest.skip("needs an x86-64 machine with qemu-user (scripts/test installs it)")
    model = next(models_dir.glob("gemma3-270m/*.gguf"))
    kept = recorded()  # what this machine proved it runs (its best by cpuid may not run: issue 22's VM)
    assert kept is not None, "scripts/setup proves the engine"
    native = decode(model, [], kept.variant, 120)
    emulated = decode(model, [QEMU, "-cpu", "Haswell"], "", 540)
    assert emulated["variant"] == "haswell"  # llama.cpp's own pick from what the emulated CPU reports
    assert len(native["tokens"]) == TOKENS  # type: ignore[arg-type]
    assert emulated["tokens"] == native["tokens"], (native, emulated)
    assert str(emulated["text"]).strip()


async def test_a_worker_killed_by_sigill_is_explained_to_the_keeper(rbee_env: dict[str, str]) -> None:
    env = {**rbee_env, "RBEE_WORKER_MODULE": "tests.stand_in_worker", "STAND_IN_DIE_SIGNAL": str(int(signal.SIGILL)),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    code, chunks, stderr = await run_rbee(["infer", "--max-tokens", "4", "The sky is blue because"], env)
    assert code != 0
    assert not chunks
    assert "worker_died" in stderr
    text = " ".join(stderr.split())
    assert "killed by signal 4 (SIGILL, illegal instruction: the engine ran an instruction this CPU does not" in text
    build = installed()
    assert build is not None
    assert f"it ran {build.describe()}" in text
    kept = recorded()
    if kept is not None and kept.variant:
        assert f"CPU variant {kept.variant}" in text
    assert "Fix: prove the CPU variants on that host again" in text and "rbee.engine.proof --again" in text
    assert os.environ.get("RBEE_WORKER_MODULE") is None  # the stand-in was for this chain only
