"""The public CLI surface, pinned: a change here is a change users see."""

from __future__ import annotations

from typing import Any

import typer

from rbee.keeper.cli import app

EXPECTED = {
    "rbee infer": ["prompt", "--model", "--node", "--max-tokens", "--temperature", "--top-p", "--seed", "--top-k",
                   "--min-p", "--repeat-penalty", "--presence-penalty", "--frequency-penalty", "--logit-bias",
                   "--logprobs", "--stop",
                   "--backend", "--ctx", "--gpu-layers", "--quiet", "--raw", "--no-template", "--keep-alive",
                   "--queen-url", "--inventory"],
    "rbee chat": ["--model", "--node", "--system", "--max-tokens", "--temperature", "--seed", "--verbose", "--raw",
                  "--keep-alive", "--queen-url", "--inventory"],
    "rbee embed": ["texts", "--model", "--node", "--json", "--quiet", "--queen-url", "--inventory"],
    "rbee version": [],
    "rbee dashboard": ["--queen-url", "--inventory", "--no-open"],
    "rbee queen start": ["--queen-url", "--inventory"],
    "rbee queen stop": ["--queen-url"],
    "rbee queen status": ["--queen-url"],
    "rbee queen key": [],
    "rbee fleet up": ["--queen-url", "--inventory"],
    "rbee fleet down": ["--queen-url", "--inventory"],
    "rbee fleet plan": ["--queen-url", "--inventory"],
    "rbee fleet status": ["--queen-url", "--inventory"],
    "rbee fleet logs": ["name", "--lines", "--queen-url", "--inventory"],
    "rbee fleet trust": ["name", "--inventory", "--yes"],
    "rbee models list": ["--node", "--queen-url", "--inventory"],
    "rbee models pull": ["ref", "--node", "--queen-url", "--inventory"],
    "rbee models rm": ["name", "--node", "--queen-url", "--inventory"],
    "rbee keys add": ["name", "--models"],
    "rbee keys list": [],
    "rbee keys revoke": ["name"],
    "rbee workers list": ["--queen-url", "--inventory"],
    "rbee workers stop": ["worker_id", "--node", "--queen-url", "--inventory"],
}


def surface(command: Any, path: str) -> dict[str, list[str]]:
    if hasattr(command, "commands"):
        found: dict[str, list[str]] = {}
        for name, sub in command.commands.items():
            found.update(surface(sub, f"{path} {name}"))
        return found
    names = []
    for param in command.params:
        if param.name == "help":
            continue
        names.append(param.opts[0] if param.param_type_name == "option" else str(param.name))
    return {path: names}


def test_cli_surface_is_pinned() -> None:
    assert surface(typer.main.get_command(app), "rbee") == EXPECTED
