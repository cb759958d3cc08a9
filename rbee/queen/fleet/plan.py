"""What `fleet up` would do on each host: pure functions over facts, so the rules
are unit-tested without SSH and `fleet plan` shows exactly what `up` does:
the action (install, upgrade, start, …) and the install path (where the wheels come
from, and whether llama-cpp-python is built on the host, with which accelerator)."""

from __future__ import annotations

from dataclasses import dataclass

from rbee.engine import build as engine_build
from rbee.engine.cpu import parse as parse_cpu
from rbee.engine.cpu import ranked
from rbee.link.schemas import HostProbe
from rbee.queen.fleet.wheelhouse import Platform

INSTALL = "install"
UPGRADE = "upgrade"
START = "start"
NOTHING = "nothing"
STOP = "stop"
UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class InstallPath:
    """How a host gets rbee and its engine."""

    tag: str  # the host's platform, e.g. cp311-linux-x86_64
    same_platform: bool  # as the queen: its own packages serve; else binary wheels from the package index
    build: str | None  # llama-cpp-python built on the host from the pushed source: "cpu" | "cuda" | "metal"
    note: str = ""

    @property
    def cmake_args(self) -> str:
        """Every build on a host is the portable one (rbee.engine.build), plus its accelerator."""
        return engine_build.cmake_args(self.build or "cpu")

    @property
    def marker(self) -> str:
        """What install.json records, so a later upgrade skips a build that is already there and
        a host installed with other build flags gets the engine again."""
        return f"{f'source+{self.build}' if self.build else 'wheel'}:{engine_build.BUILD_ID}"

    def describe(self) -> str:
        wheels = ("wheels from this queen's own packages" if self.same_platform
                  else f"binary wheels for {self.tag} from the package index")
        if self.build:
            accel = {"cuda": "CUDA", "metal": "Metal", "cpu": "the CPU only"}[self.build]
            engine = f"llama-cpp-python built on the host for {accel}"
        else:
            engine = "llama-cpp-python as this queen's portable wheel"
        return f"{wheels}; {engine}" + (f" ({self.note})" if self.note else "")


def install_path(queen: Platform, host: Platform, *, nvidia: bool, nvcc: bool, build: str = "auto") -> InstallPath:
    """The one rule for how a host is installed.

    - Same platform as the queen: the queen's own wheels (llama-cpp-python included).
    - Another OS, machine or Python: binary wheels for the host's tags from the package index,
      cached here. llama-cpp-python publishes source only, so the host builds it.
    - An NVIDIA host with the CUDA toolkit builds llama-cpp-python with CUDA; Apple Silicon
      builds with Metal; ``build = "source"`` in the inventory forces a build on the host.
    """
    same = queen == host
    note = ""
    if nvidia and nvcc:
        accel = "cuda"
    elif host.apple_silicon:
        accel = "metal"
    else:
        accel = "cpu"
        if nvidia:
            note = ("NVIDIA GPU but no CUDA toolkit (nvcc): llama.cpp will run on the CPU; install the toolkit and "
                    "run `rbee fleet up` again")
    builds = build == "source" or not same or accel == "cuda"
    return InstallPath(host.tag, same, accel if builds else None, note)


@dataclass(frozen=True)
class Step:
    name: str
    action: str
    reason: str
    path: str = ""  # InstallPath.describe() for a reachable host
    cpu: str = ""  # cpu_line(): the CPU features llama.cpp cares about and the variant that will run

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "action": self.action, "reason": self.reason, "path": self.path, "cpu": self.cpu}


def cpu_line(probe: HostProbe) -> str:
    """What the host's CPU offers llama.cpp and which CPU variant will run there: the one its
    kept proof chose, else the best its features advertise (the proof at install decides)."""
    if not probe.cpu:
        return "CPU not reported"
    cpu = parse_cpu(probe.system, probe.machine, probe.cpu)
    kept = (probe.engine or {}).get("variant")
    if kept:
        variant = f"variant {kept} (proven there)"
    else:
        best = ranked(cpu)
        variant = f"variant {best[0].name} (by its features; proven at install)" if best else "no variant fits"
    return f"{cpu.model}: {cpu.summary()}; {variant}"


def plan_host(name: str, probe: HostProbe | None, digest: str, error: str = "",
              path: InstallPath | None = None) -> Step:
    """``probe`` is what the remote script reported (None when the host could not be reached)."""
    if probe is None:
        return Step(name, UNREACHABLE, error or "the host did not answer")
    step = _action(name, probe, digest)
    return Step(step.name, step.action, step.reason, path.describe() if path else "", cpu_line(probe))


def _action(name: str, probe: HostProbe, digest: str) -> Step:
    installed = probe.installed or {}
    hive = probe.hive or {}
    running = bool(hive.get("alive"))
    if not installed.get("digest") or not probe.venv:
        return Step(name, INSTALL, "rbee is not installed there")
    if installed["digest"] != digest:
        return Step(
            name, UPGRADE,
            f"installed {installed.get('version')} ({installed['digest'][:8]}) differs from this queen's "
            f"({digest[:8]})" + ("; the running hive will be restarted" if running else ""),
        )
    if not running:
        return Step(name, START, "installed, hive not running")
    return Step(name, NOTHING, f"hive running (pid {hive.get('pid')}), up to date")


def plan_removed(names_in_inventory: set[str], launched: set[str]) -> list[Step]:
    """Hives the fleet launched that the inventory no longer lists are stopped."""
    return [Step(name, STOP, "no longer in the inventory") for name in sorted(launched - names_in_inventory)]
