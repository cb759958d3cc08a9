"""The hive's side of the engine proof: which CPU variant its llama.cpp workers load, and how a
worker's death by a signal is explained.

The verdict is read from where ``scripts/setup`` or ``fleet up`` kept it; a hive that finds
none proves the engine once, in a child process, before its first llama.cpp worker (the job
that waits says so). ``RBEE_CPU_VARIANT`` in the hive's environment forces a variant.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rbee.engine import crash
from rbee.engine.backends import VARIANT_ENV
from rbee.engine.build import installed
from rbee.engine.proof import Verdict, recorded
from rbee.errors import EngineBuildError

Narrate = Callable[..., None]


class EngineProof:
    def __init__(self, models_dir: Path, python: str = sys.executable) -> None:
        self.models_dir = models_dir
        self.python = python
        self._verdict: Verdict | None = None
        self._looked = False
        self._lock = asyncio.Lock()

    @property
    def verdict(self) -> Verdict | None:
        """The kept verdict (read once: a few small files), or the one this hive proved."""
        if self._verdict is None and not self._looked:
            self._looked = True
            self._verdict = recorded()
        return self._verdict

    @property
    def forced(self) -> str:
        return os.environ.get(VARIANT_ENV, "")

    @property
    def line(self) -> str:
        """For the hive's report (`fleet status`)."""
        if self.forced:
            return f"CPU variant {self.forced} (forced by {VARIANT_ENV})"
        verdict = self.verdict
        return verdict.line() if verdict is not None else "not proven yet (before the first llama.cpp worker)"

    async def variant(self, narrate: Narrate) -> str:
        """The variant a new llama.cpp worker loads ("" for a single build)."""
        if self.forced:
            return self.forced
        async with self._lock:
            verdict = self.verdict or await self._prove(narrate)
            self._verdict = verdict
        return verdict.variant

    async def _prove(self, narrate: Narrate) -> Verdict:
        narrate("engine", "proving llama.cpp on this host once: decoding a few tokens of the default model with the "
                          "best CPU variant, in a child process")
        process = await asyncio.create_subprocess_exec(
            self.python, "-m", "rbee.engine.proof", "--json", "--models-dir", str(self.models_dir),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        lines = out.decode(errors="replace").strip().splitlines()
        if process.returncode != 0 or not lines:
            tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-6:])
            raise EngineBuildError(f"llama.cpp does not run on this host: {tail}")
        verdict = Verdict.from_dict(json.loads(lines[-1]))
        narrate("engine", f"llama.cpp proven here: {verdict.line()}")
        return verdict

    def _engine(self) -> tuple[str, bool] | None:
        """What a worker of this hive runs, in words, and whether it is the portable build."""
        build = installed()
        if build is None:
            return None
        verdict = self.verdict
        variant = self.forced or (verdict.variant if verdict is not None else "")
        return build.describe() + (f", CPU variant {variant}" if variant else ""), build.portable

    def remedy(self, returncode: int | None) -> str:
        """For a worker killed by a signal: the engine it ran and the fix (crash.remedy); else ""."""
        engine = self._engine()
        return crash.remedy(returncode, engine[0], portable=engine[1], python=self.python) if engine else ""

    def explain_death(self, returncode: int | None) -> str:
        """A worker's exit in words; for a signal, with the engine it ran and the fix."""
        engine = self._engine()
        if engine is None:
            return crash.exit_reason(returncode)
        return crash.explain_worker_death(returncode, engine[0], portable=engine[1], python=self.python)
