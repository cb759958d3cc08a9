"""The proof's choice among CPU variants, with real child processes: a stand-in child that dies
by a real SIGILL for the variants told to, the way llama.cpp dies on an instruction the CPU
advertises but cannot run; and the words a worker's death by a signal is given."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from rbee.engine import crash
from rbee.engine.build import Installed
from rbee.engine.proof import Attempt, Verdict, key_of, prove, recorded, save
from rbee.errors import EngineBuildError
from tests.unit.test_cpu_variants import cpu

CHILD = '''
import json, os, signal, sys
args = sys.argv[2:]
dies = sys.argv[1].split(",")
if "--scores" in args:
    print(json.dumps({"sapphirerapids": 4000, "icelake": 1900, "haswell": 63, "x64": 1, "skylakex": 0}))
    sys.exit(0)
variant = args[args.index("--decode") + 1]
if variant in dies:
    os.kill(os.getpid(), signal.SIGILL)
if "load" in dies:
    print("llama_model_load: error loading model: tensor data is not within the file bounds", file=sys.stderr)
    sys.exit(3)
print(json.dumps({"variant": variant, "tokens": [818, 7217, 563, 3730], "text": " the sky"}))
'''

BUILD = Installed("0.3.36", Path("/nowhere"), ("x64", "haswell", "skylakex", "icelake", "sapphirerapids"))


def stand_in(tmp_path: Path, dies: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script), dies]


def run(tmp_path: Path, dies: str) -> Verdict:
    return prove(tmp_path / "model.gguf", child=lambda args: [*stand_in(tmp_path, dies), *args], build=BUILD,
                 cpu=cpu("xeon-sapphirerapids.txt"), timeout=30)


def test_the_best_variant_that_decodes_is_kept(tmp_path: Path) -> None:
    verdict = run(tmp_path, "none")
    assert verdict.variant == "sapphirerapids" and not verdict.tried
    assert verdict.tokens == (818, 7217, 563, 3730)
    assert verdict.line() == "CPU variant sapphirerapids, proven"
    assert verdict.reason == "the best variant llama.cpp finds for this CPU's features; decoded 4 tokens"


def test_a_variant_killed_by_sigill_is_ruled_out_and_the_next_one_down_kept(tmp_path: Path) -> None:
    said: list[str] = []
    verdict = prove(tmp_path / "m.gguf", child=lambda args: [*stand_in(tmp_path, "sapphirerapids"), *args],
                    build=BUILD, cpu=cpu("xeon-sapphirerapids.txt"), timeout=30, narrate=said.append)
    assert verdict.variant == "icelake"
    assert verdict.tried == (Attempt("sapphirerapids", "SIGILL", signal.SIGILL),)
    assert verdict.line() == "CPU variant icelake, proven after ruling out sapphirerapids (SIGILL)"
    assert any("sapphirerapids died: killed by signal 4 (SIGILL, illegal instruction" in s and "trying icelake" in s
               for s in said)


def test_when_no_variant_runs_the_error_lists_each_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError) as caught:
        run(tmp_path, "sapphirerapids,icelake,haswell,x64")
    message = caught.value.message
    assert "sapphirerapids (SIGILL), icelake (SIGILL), haswell (SIGILL), x64 (SIGILL)" in message
    assert "rbee.engine.proof --again" in message
    assert "skylakex" not in message  # llama.cpp scored it 0 here: never tried


def test_a_failure_that_is_no_signal_stops_the_proof_with_the_engines_words(tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError) as caught:
        run(tmp_path, "load")
    assert "exited with code 3" in caught.value.message
    assert "tensor data is not within the file bounds" in caught.value.message


def test_a_kept_verdict_counts_only_for_the_same_build_and_cpu(tmp_path: Path) -> None:
    here = cpu("amd-epyc-avx2.txt")
    verdict = Verdict(key=key_of(BUILD, here), engine=BUILD.describe(), build="portable", variant="haswell",
                      cpu=here.model, features=here.summary(), reason="r", tried=(Attempt("zen4", "SIGILL", 4),))
    path = tmp_path / "rbee-engine.json"
    save(verdict, path)
    assert recorded(BUILD, here, path) == verdict
    assert recorded(BUILD, cpu("xeon-vm-amx-tile-only.txt"), path) is None  # another CPU
    other = Installed("0.3.37", BUILD.lib_dir, BUILD.cpu_modules)
    assert recorded(other, here, path) is None  # another build


def test_a_worker_killed_by_sigill_is_explained_with_the_build_and_the_fix() -> None:
    text = crash.explain_worker_death(-signal.SIGILL, "llama-cpp-python 0.3.36, portable build, CPU variant zen4",
                                      portable=True, python="/v/bin/python")
    assert text.startswith("killed by signal 4 (SIGILL, illegal instruction: the engine ran an instruction")
    assert "it ran llama-cpp-python 0.3.36, portable build, CPU variant zen4" in text
    assert "`/v/bin/python -m rbee.engine.proof --again`" in text
    single = crash.explain_worker_death(-signal.SIGILL, "llama-cpp-python 0.3.36, single build", portable=False)
    assert "rbee.engine.build --force" in single


@pytest.mark.parametrize(("number", "words"), [
    (signal.SIGSEGV, "corrupt or truncated model file"),
    (signal.SIGBUS, "truncated or replaced while it was mapped"),
    (signal.SIGKILL, "out-of-memory killer"),
])
def test_other_deadly_signals_say_what_they_usually_mean(number: int, words: str) -> None:
    text = crash.explain_worker_death(-number, "e", portable=True)
    assert f"killed by signal {number} ({signal.Signals(number).name}" in text and words in text
    assert "Fix: " in text


def test_a_plain_exit_stays_plain() -> None:
    assert crash.explain_worker_death(3, "e", portable=True) == "exited with code 3"
