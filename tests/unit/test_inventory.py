from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbee.errors import InventoryError
from rbee.inventory import parse

GOOD = """\
[queen]
port = 7833

[[hive]]
name = "mac-studio"
ssh = "alice@mac-studio.local"
identity_file = "~/.ssh/id_ed25519"
models = ["gemma3-270m", "hf:ggml-org/gemma-3-270m-it-GGUF", "file:/models/x.gguf"]

[[hive]]
name = "localhost"
"""


def test_good_inventory() -> None:
    inventory = parse(GOOD, "inv.toml")
    assert inventory.names == ["mac-studio", "localhost"]
    mac = inventory.get("mac-studio")
    assert mac is not None and mac.remote and mac.target.user == "alice" and mac.target.port is None
    assert not inventory.get("localhost").remote  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[[hive]]\nname = "a"\nsssh = "x@y"\n', "inv.toml:3: hive.0.sssh: unknown key 'sssh'"),
        ('[[hive]]\nname = "a"\n\n[[hive]]\nname = "a"\n', "inv.toml:5: hive.1.name: duplicate hive name 'a'"),
        ('[[hive]]\nname = "a"\nssh = "al ice@host"\n', "inv.toml:3: hive.0.ssh:"),
        ('[[hive]]\nname = "a"\nssh = "a@h:99999"\n', "inv.toml:3: hive.0.ssh:"),
        ('[[hive]]\nname = "a"\nmodels = ["hf:only-org"]\n', "inv.toml:3: hive.0.models"),
        ('[[hive]]\nname = "a"\nmodels = ["file:/m/../../etc/passwd"]\n', "inv.toml:3: hive.0.models"),
        ('[queen]\nport = "high"\n', "inv.toml:2: queen.port"),
        ('[queen]\nport = 1\ncolour = "red"\n', "inv.toml:3: queen.colour: unknown key"),
        ('[[hive]]\nname = "a;rm -rf /"\n', "inv.toml:2: hive.0.name"),
        ('[[hive]\nname = "a"\n', "inv.toml: not valid TOML"),
        ('[[hive]]\nssh = "a@b"\n', "inv.toml:1: hive.0.name: Field required"),
        ('[[hive]]\nname = "a"\ngpu_layers = -2\n', "inv.toml:3: hive.0.gpu_layers"),
        ('[[hive]]\nname = "a"\nbuild = "wheel"\n', "inv.toml:3: hive.0.build"),
        ('[[hive]]\nname = "a"\nmemory = "lots"\n', "inv.toml:3: hive.0.memory"),
        ('[[hive]]\nname = "a"\nmemory = 0\n', "inv.toml:3: hive.0.memory: must be more than 0 bytes"),
        ('[[hive]]\nname = "a"\nmemory = "12 parsecs"\n', "inv.toml:3: hive.0.memory"),
        ('[models.m]\ngguf = "hf:a/b"\nctx = 100\n', "inv.toml:3: models.m.ctx"),
        ('[models.m]\ngguf = "hf:a/b"\n[aliases]\nm = "hf:c/d"\n', "aliases.m: 'm' is also a [models] name"),
        ('[aliases]\na = "b"\nb = "hf:c/d"\n', "aliases.a: must name a model"),
        ('[models.m]\ngguf = "hf:a/b"\nsplit = ["a"]\n[[hive]]\nname = "a"\n', "models.m.split"),
        ('[models.m]\ngguf = "hf:a/b"\nsplit = ["a", "z"]\n[[hive]]\nname = "a"\n',
         "models.m.split: z is not a [[hive]] name; hives: a"),
        ('[models.m]\nmlx = "hf:a/b"\nsplit = ["a", "b"]\n[[hive]]\nname = "a"\n[[hive]]\nname = "b"\n',
         "models.m.split: a split runs on llama.cpp, so give the model a gguf form"),
    ],
)
def test_errors_name_file_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(InventoryError) as info:
        parse(text, "inv.toml")
    assert expected in str(info.value)


def test_offload_context_and_build_settings() -> None:
    inventory = parse('[models.m]\ngguf = "hf:a/b"\nctx = 8192\ngpu_layers = 20\n\n[[hive]]\nname = "gpu"\n'
                      'ssh = "bob@gpu"\ngpu_layers = -1\ngpu_split = true\nbuild = "source"\n', "inv.toml")
    model, hive = inventory.models["m"], inventory.get("gpu")
    assert (model.ctx, model.gpu_layers, model.split) == (8192, 20, None)
    assert hive is not None and (hive.gpu_layers, hive.gpu_split, hive.build) == (-1, True, "source")


def test_memory_caps_take_sizes_or_bytes() -> None:
    inventory = parse('[[hive]]\nname = "localhost"\nmemory = "12GB"\n\n[[hive]]\nname = "b"\nssh = "x@b"\n'
                      'memory = "512MiB"\n\n[[hive]]\nname = "c"\nssh = "x@c"\nmemory = 1000\n\n'
                      '[[hive]]\nname = "d"\nssh = "x@d"\n', "inv.toml")
    assert [inventory.memory(name) for name in ("localhost", "b", "c", "d", "nowhere")] == [
        12 * 10**9, 512 * 2**20, 1000, None, None]


def test_the_lower_of_the_env_budget_and_the_hosts_memory_applies() -> None:
    from rbee.config import memory_budget

    assert memory_budget(0, None) == 0 and memory_budget(0, 5) == 5 and memory_budget(7, None) == 7
    assert memory_budget(7, 5) == 5 and memory_budget(3, 5) == 3


@given(st.text(max_size=300))
def test_parser_only_ever_raises_inventory_errors(text: str) -> None:
    try:
        parse(text, "fuzz.toml")
    except InventoryError:
        pass


def test_an_inventory_others_can_write_is_refused(tmp_path: Path) -> None:
    """Another user who can edit it could make the queen run their program with the operator's keys."""
    from rbee.inventory import load

    path = tmp_path / "inventory.toml"
    path.write_text('[[hive]]\nname = "gpu"\nssh = "me@gpu"\n')
    path.chmod(0o666)
    with pytest.raises(InventoryError, match=r"writable by other users.*chmod go-w"):
        load(path)
    path.chmod(0o644)
    assert load(path).names == ["gpu"]


def test_an_alias_stands_for_its_model() -> None:
    inventory = parse('[aliases]\ncoder = "hf:org/coder-GGUF"\n', "inv.toml")
    assert inventory.resolve_alias("coder") == "hf:org/coder-GGUF"
    assert inventory.resolve_alias("gemma3-270m") == "gemma3-270m" and inventory.resolve_alias(None) is None


def test_the_working_directorys_inventory_is_never_read_unless_named(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23.15: a cloned repository's ./inventory.toml chose the SSH targets and the
    known_hosts that `fleet trust` appends to."""
    import subprocess
    import sys

    from rbee.inventory import default_path

    repo = tmp_path / "cloned-repo"
    repo.mkdir()
    (repo / "inventory.toml").write_text('[[hive]]\nname = "evil"\nssh = "me@attacker.example"\n')
    home = tmp_path / "home"
    env = {"RBEE_HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": str(tmp_path)}
    monkeypatch.chdir(repo)
    assert default_path(env) is None
    home.mkdir()
    (home / "inventory.toml").write_text('[[hive]]\nname = "localhost"\n')
    assert default_path(env) == home / "inventory.toml"
    (home / "inventory.toml").unlink()
    done = subprocess.run([sys.executable, "-m", "rbee.keeper", "fleet", "plan"], cwd=repo, capture_output=True,
                          text=True, timeout=60, env={**env, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "is not read unless named" in done.stderr, done.stderr
    assert "attacker" not in done.stdout + done.stderr
