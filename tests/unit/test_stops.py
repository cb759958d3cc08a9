from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rbee.worker.stops import StopMatcher


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_split_across_pieces_is_never_emitted() -> None:
    assert run(["Hello <end", "_of_turn> more"], ["<end_of_turn>"]) == ("Hello ", True)


def test_false_start_is_released() -> None:
    matcher = StopMatcher(["<end>"])
    assert matcher.feed("a <e") == ("a ", False)
    assert matcher.feed("xtra") == ("<extra", False)


def test_no_stops_passes_through() -> None:
    assert run(["a", "b"], []) == ("ab", False)


@given(st.lists(st.text(alphabet="ab<>", max_size=5), max_size=12), st.text(alphabet="ab<>", min_size=1, max_size=3))
def test_output_is_the_text_before_the_first_stop(pieces: list[str], stop: str) -> None:
    whole = "".join(pieces)
    out, hit = run(pieces, [stop])
    if stop in whole:
        assert hit and out == whole[: whole.find(stop)]
    else:
        assert not hit and out == whole
