"""Prove the installed engine on this machine by running it, not by reading flags.

A CPU can advertise instructions its hypervisor does not run (AMX on some cloud VMs), and a
build can carry instructions of the machine it was made on. So the engine is proven in a
child process: load the default model with one CPU variant and decode a few tokens. A child
killed by a signal (SIGILL above all) rules that variant out and the next one down is tried;
the first that decodes is the verdict, kept next to the engine (``<venv>/rbee-engine.json``)
and keyed by the build and the CPU, so the proof is paid once per host, not on every start.
``scripts/setup`` and the hive install step of ``fleet up`` run it; a hive with no verdict
runs it before its first llama.cpp worker.

    python -m rbee.engine.proof [--again] [--variant NAME] [--models-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee.engine import crash
from rbee.engine.backends import VARIANT_ENV, require_installed
from rbee.engine.build import Installed, installed
from rbee.engine.cpu import Cpu, local_cpu
from rbee.errors import EngineBuildError, RbeeError

PROMPT = "The sky is blue because"
TOKENS = 4
CHILD_TIMEOUT_S = 600.0  # a load under emulation (qemu) is slow; a hang is still bounded

Narrate = Callable[[str], None]
#: the command that runs one child: ``--scores`` or ``--decode VARIANT`` is appended
ChildCommand = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class Attempt:
    variant: str
    outcome: str  # the signal's name: SIGILL, …
    signal: int = 0


@dataclass(frozen=True)
class Verdict:
    """Which CPU variant of the engine runs here, and how that was proven."""

    key: str
    engine: str  # Installed.describe()
    build: str  # portable | single
    variant: str  # "" for a single build
    cpu: str
    features: str  # Cpu.summary()
    reason: str
    tokens: tuple[int, ...] = ()
    tried: tuple[Attempt, ...] = ()  # variants ruled out before this one, with what killed them
    forced: bool = False
    proved_at: float = 0.0
    seconds: float = 0.0

    @property
    def portable(self) -> bool:
        return self.build == "portable"

    def line(self) -> str:
        """A short line for `fleet status` and narration; ``reason`` has the long form."""
        variant = f"CPU variant {self.variant}" if self.variant else "single build"
        how = "forced and proven" if self.forced else "proven"
        return f"{variant}, {how}" + (f" after ruling out {ruled_out(self.tried)}" if self.tried else "")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        values["tokens"] = tuple(values.get("tokens", ()))
        values["tried"] = tuple(Attempt(**attempt) for attempt in values.get("tried", ()))
        return cls(**values)


def ruled_out(tried: Sequence[Attempt]) -> str:
    return ", ".join(f"{a.variant} ({a.outcome})" for a in tried)


def verdict_path() -> Path:
    """Next to the engine: a fact about this engine on this machine, shared by every RBEE_HOME."""
    return Path(sys.prefix) / "rbee-engine.json"


def key_of(build: Installed, cpu: Cpu) -> str:
    parts = [build.version, build.kind, *build.cpu_modules, cpu.system, cpu.machine, cpu.model, *sorted(cpu.features)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def recorded(build: Installed | None = None, cpu: Cpu | None = None, path: Path | None = None) -> Verdict | None:
    """The kept verdict, if it is about this build on this CPU."""
    build = build or installed()
    if build is None:
        return None
    try:
        verdict = Verdict.from_dict(json.loads((path or verdict_path()).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.key == key_of(build, cpu or local_cpu()) else None


def save(verdict: Verdict, path: Path | None = None) -> None:
    path = path or verdict_path()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(verdict.as_dict(), indent=1))
    tmp.replace(path)


def default_child(python: str = sys.executable) -> ChildCommand:
    return lambda args: [python, "-m", "rbee.engine.proof", "--child", *args]


@dataclass
class Outcome:
    returncode: int
    output: dict[str, Any] = field(default_factory=dict)
    tail: str = ""

    @property
    def signal(self) -> int:
        return -self.returncode if self.returncode < 0 else 0


def run_child(command: list[str], timeout: float) -> Outcome:
    env = {key: value for key, value in os.environ.items() if key != VARIANT_ENV}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EngineBuildError(f"proving the engine took longer than {timeout:.0f} s ({' '.join(command[-3:])}); "
                               "the machine is overloaded or the engine hangs") from exc
    output: dict[str, Any] = {}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            output = json.loads(lines[-1])
        except ValueError:
            output = {}
    tail = "\n".join(done.stderr.strip().splitlines()[-8:])
    return Outcome(done.returncode, output, tail)


def prove(model: Path, *, forced: str = "", child: ChildCommand | None = None, narrate: Narrate = lambda _: None,
          timeout: float = CHILD_TIMEOUT_S, build: Installed | None = None, cpu: Cpu | None = None) -> Verdict:
    """Decode ``TOKENS`` tokens of ``model`` with each candidate variant, best first, until one
    does; ``forced`` tries only that one."""
    build = build or require_installed()
    cpu = cpu or local_cpu()
    child = child or default_child()
    started = time.monotonic()
    if forced:
        candidates, why = [forced], f"forced by {VARIANT_ENV} or --variant"
    elif build.portable:
        scored = run_child(child(["--scores"]), timeout)
        if scored.returncode != 0:
            raise EngineBuildError("could not read llama.cpp's CPU variant scores "
                                   f"({crash.exit_reason(scored.returncode)}):\n{scored.tail}")
        ranked = sorted(((int(s), name) for name, s in scored.output.items() if int(s) > 0), reverse=True)
        candidates = [name for _, name in ranked]
        why = "the best variant llama.cpp finds for this CPU's features"
    else:
        candidates, why = [""], "the only CPU code in this build"
    tried: list[Attempt] = []
    for variant in candidates:
        label = variant or "the built-in CPU kernels"
        narrate(f"proving {label}: loading {model.name} and decoding {TOKENS} tokens in a child process")
        outcome = run_child(child(["--decode", variant, "--model", str(model)]), timeout)
        if outcome.returncode == 0 and outcome.output.get("tokens"):
            reason = why if not tried else f"the best variant that ran after {len(tried)} that did not"
            verdict = Verdict(key=key_of(build, cpu), engine=build.describe(), build=build.kind, variant=variant,
                              cpu=cpu.model, features=cpu.summary(), reason=f"{reason}; decoded {TOKENS} tokens",
                              tokens=tuple(outcome.output["tokens"]), tried=tuple(tried), forced=bool(forced),
                              proved_at=time.time(), seconds=round(time.monotonic() - started, 1))
            return verdict
        if outcome.signal == 0:
            raise EngineBuildError(f"the engine could not decode {model} with {label} "
                                   f"({crash.exit_reason(outcome.returncode)}):\n{outcome.tail}")
        tried.append(Attempt(variant or "single", crash.signal_name(outcome.signal), outcome.signal))
        narrate(f"{label} died: {crash.exit_reason(outcome.returncode)}"
                + (f"; trying {candidates[candidates.index(variant) + 1]}" if variant != candidates[-1] else ""))
    fix = crash.fix_for(tried[-1].signal, portable=build.portable, python=sys.executable)
    raise EngineBuildError(
        f"no CPU variant of {build.describe()} runs on this CPU ({cpu.model}: {cpu.summary()}); tried "
        f"{ruled_out(tried)}. Fix: {fix}"
    )


def ensure(models_dir: Path, *, again: bool = False, forced: str = "", narrate: Narrate = lambda _: None) -> Verdict:
    """The kept verdict for this build and CPU, or a new proof (kept when it succeeds)."""
    build = require_installed()
    cpu = local_cpu()
    kept = None if again else recorded(build, cpu)
    if kept is not None and (not forced or kept.variant == forced):
        return kept
    model = default_model(models_dir, narrate)
    verdict = prove(model, forced=forced, narrate=narrate, build=build, cpu=cpu)
    try:
        save(verdict)
    except OSError as exc:
        narrate(f"could not keep the verdict in {verdict_path()} ({exc.strerror}); it will be proven again")
    return verdict


def default_model(models_dir: Path, narrate: Narrate) -> Path:
    """The default model's file in the catalog (assembled from its package the first time)."""
    from rbee.hive.models import ModelCatalog

    return ModelCatalog(models_dir).resolve(None, lambda _kind, text, **_: narrate(text)).path


# the child ---------------------------------------------------------------------------------

def child_scores() -> dict[str, int]:
    from rbee.engine.backends import scores

    build = installed()
    return scores(build) if build is not None else {}


def greedy(llm: Any, prompt: str, n_tokens: int) -> Iterator[int]:
    """Up to ``n_tokens`` greedy tokens of ``prompt`` from a loaded ``llama_cpp.Llama``, each as
    llama.cpp samples it, ending early at an end-of-generation token."""
    import llama_cpp

    tokens = llm.tokenize(prompt.encode(), add_bos=True)
    for count, token in enumerate(llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)):
        if count >= n_tokens or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            return
        yield int(token)


def child_decode(model: Path, variant: str, n_tokens: int = TOKENS) -> dict[str, Any]:
    """Greedy tokens of ``PROMPT`` on the CPU with ``variant`` loaded ("" for a single build)."""
    from rbee.engine.backends import load

    loaded = load(variant)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, n_gpu_layers=0, verbose=False)
    try:
        tokens = list(greedy(llm, PROMPT, n_tokens))
        text = llm.detokenize(tokens).decode(errors="replace")
    finally:
        llm.close()
    return {"variant": loaded.variant, "tokens": tokens, "text": text}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rbee.engine.proof", description=__doc__.split("\n\n")[0])
    parser.add_argument("--again", action="store_true", help="prove again even when a verdict is kept")
    parser.add_argument("--variant", default="", help="prove (and keep) only this CPU variant")
    parser.add_argument("--models-dir", type=Path, help="the catalog holding the default model (RBEE_HOME/models)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scores", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=TOKENS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.child:
            result: Any = child_scores() if args.scores else child_decode(args.model, args.decode or "", args.tokens)
            print(json.dumps(result))
            return 0
        from rbee.config import models_dir

        verdict = ensure(args.models_dir or models_dir(), again=args.again, forced=args.variant,
                         narrate=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    except RbeeError as exc:
        print(f"rbee: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(verdict.as_dict()))
    else:
        print(f"engine: {verdict.engine}\nCPU: {verdict.cpu} ({verdict.features})\nruns: {verdict.line()}: "
              f"{verdict.reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
