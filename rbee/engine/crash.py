"""Why a process died of a signal, in the operator's words: the signal, what it usually means
for an engine process, the build it ran and the command that fixes it. Never only "killed by
signal 4"."""

from __future__ import annotations

import signal

#: signal → (what it is, what it usually means when it kills an engine process)
MEANING: dict[int, tuple[str, str]] = {
    signal.SIGILL: ("illegal instruction",
                    "the engine ran an instruction this CPU does not execute: a build made for another CPU, or "
                    "instructions the CPU advertises but its hypervisor does not run (AMX, AVX-512)"),
    signal.SIGSEGV: ("segmentation fault",
                     "usually a corrupt or truncated model file, an input that crashed llama.cpp, or memory "
                     "running out while the model was mapped"),
    signal.SIGBUS: ("bus error",
                    "usually a model file truncated or replaced while it was mapped, or a full disk or memory "
                    "under the mapped file"),
    signal.SIGKILL: ("killed", "usually the kernel's out-of-memory killer (see `dmesg`), or a kill by hand"),
    signal.SIGABRT: ("aborted", "llama.cpp stopped on a failed check; its last output says which"),
}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_reason(returncode: int | None) -> str:
    """``Popen.returncode`` in words: "exited with code 3", "killed by signal 4 (SIGILL, illegal
    instruction: …)"."""
    if returncode is None or returncode >= 0:
        return f"exited with code {returncode}"
    number = -returncode
    what, meaning = MEANING.get(number, ("", ""))
    detail = f" ({signal_name(number)}{', ' + what if what else ''}{': ' + meaning if meaning else ''})"
    return f"killed by signal {number}{detail}"


def fix_for(number: int, *, portable: bool, python: str = "python") -> str:
    """The command that usually cures a worker killed by ``number``."""
    if number == signal.SIGILL:
        if portable:
            return (f"prove the CPU variants on that host again and keep the first that runs: `{python} -m "
                    "rbee.engine.proof --again` (`rbee fleet up` does it on a fleet host), or force a lower one "
                    "with RBEE_CPU_VARIANT")
        return (f"replace this llama-cpp-python with rbee's portable build: `{python} -m rbee.engine.build --force` "
                "(scripts/setup does it here; `rbee fleet up` on a fleet host)")
    if number in (signal.SIGSEGV, signal.SIGBUS):
        return ("check the model file: remove it (`rbee models rm NAME`) and provision it again; free memory or "
                "disk; if it happens again with the same request, report it with the worker's log")
    if number == signal.SIGKILL:
        return "free memory on the host, or ask for a smaller context (`--ctx`) or a smaller model"
    return "see the worker's log"


def remedy(returncode: int | None, engine: str, *, portable: bool, python: str = "python") -> str:
    """For a death by a signal, the engine it ran and the fix ("it ran …. Fix: …"); else ""."""
    if returncode is None or returncode >= 0:
        return ""
    ran = f"it ran {engine}. " if engine else ""
    return f"{ran}Fix: {fix_for(-returncode, portable=portable, python=python)}"


def explain_worker_death(returncode: int | None, engine: str, *, portable: bool, python: str = "python") -> str:
    """A worker's death with the engine it ran and the fix; ``engine`` describes the build."""
    cure = remedy(returncode, engine, portable=portable, python=python)
    return f"{exit_reason(returncode)}; {cure}" if cure else exit_reason(returncode)
