"""Issue 23: no model reference, however it is written, yields a path outside its parent."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbee.errors import BadModelRefError
from rbee.hive.refs import entry_name, inside, parse_ref, safe_name

#: characters that matter to paths, plus some letters
PATHISH = st.lists(st.sampled_from([*"./\\~:-_ aZ09\x00\n", "..", "gguf", ".gguf"]), max_size=12).map("".join)


def refs() -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(lambda org, repo, file: f"hf:{org}/{repo}:{file}", PATHISH, PATHISH, PATHISH),
        st.builds(lambda org, repo: f"hf:{org}/{repo}", PATHISH, PATHISH),
        st.builds(lambda path: f"file:{path}", PATHISH),
        PATHISH,
        st.text(max_size=40),
    )


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=refs())
def test_no_ref_names_a_place_outside_the_catalog(text: str, tmp_path: Path) -> None:
    try:
        ref = parse_ref(text)
        name = entry_name(ref)
    except BadModelRefError:
        return
    if ref.kind == "file":  # an absolute path the owner named; never joined to the catalog
        assert Path(ref.value).is_absolute() and ".." not in Path(ref.value).parts
        return
    root = tmp_path / "models"
    for parent in (root, root / ".staging"):
        path = inside(parent, name)
        assert path.resolve().parent == parent.resolve()
        assert name not in (".", "..") and not name.startswith(".")
    if ref.kind == "hf" and ref.file:
        assert inside(root, ref.file).resolve().is_relative_to(root.resolve())


@pytest.mark.parametrize("name", ["..", ".", "", ".staging", "a/b", "../x", "x\x00", "-x", "a" * 129])
def test_the_name_rule_refuses(name: str) -> None:
    with pytest.raises(BadModelRefError):
        safe_name(name, "test")


def test_inside_refuses_the_parent_itself_and_links_out(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "out")
    for parts in (("..",), (".",), ("link",), ("link", "x"), ("a", "..", "..", "out")):
        with pytest.raises(BadModelRefError):
            inside(tmp_path / "root", *parts)
    assert inside(tmp_path / "root", "ok") == tmp_path / "root" / "ok"
