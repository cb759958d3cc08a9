"""What `fleet up` would do on each host: one pure function over facts, so the
rule is unit-tested without SSH and `fleet plan` shows exactly what `up` does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INSTALL = "install"
UPGRADE = "upgrade"
START = "start"
NOTHING = "nothing"
STOP = "stop"
UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Step:
    name: str
    action: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "action": self.action, "reason": self.reason}


def plan_host(name: str, probe: dict[str, Any] | None, digest: str, error: str = "") -> Step:
    """``probe`` is what the remote script reported (None when the host could not be reached)."""
    if probe is None:
        return Step(name, UNREACHABLE, error or "the host did not answer")
    installed = probe.get("installed") or {}
    hive = probe.get("hive") or {}
    running = bool(hive.get("alive"))
    if not installed.get("digest") or not probe.get("venv"):
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
