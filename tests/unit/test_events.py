from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbee.link import events
from rbee.link.events import Event, EventFormatError, encode_frame


def test_frame_is_one_id_and_one_data_line() -> None:
    frame = encode_frame(events.token(0, "line1\nline2"), 7).decode()
    assert frame.endswith("\n\n")
    lines = frame.strip("\n").split("\n")
    assert lines[0] == "id: 7"
    assert len(lines) == 2 and lines[1].startswith("data: ")
    assert json.loads(lines[1][6:])["text"] == "line1\nline2"


def test_relayed_event_keeps_its_text() -> None:
    raw = '{"type": "token", "index": 1, "text": "hi"}'
    assert Event.from_json(raw).json is raw


@pytest.mark.parametrize(
    "raw",
    ["not json", "[1]", '{"type": "bogus"}', '{"type": "token", "index": 1}', '{"index": 1, "text": "x"}'],
)
def test_malformed_events_are_refused(raw: str) -> None:
    with pytest.raises(EventFormatError):
        Event.from_json(raw)


def test_end_reports_rate() -> None:
    end = events.end(50, 2.0, "length")
    assert end["tokens_per_s"] == 25.0 and end["duration_ms"] == 2000.0 and end.terminal


@given(index=st.integers(min_value=0, max_value=10**9), text=st.text())
def test_token_round_trips(index: int, text: str) -> None:
    event = events.token(index, text)
    assert Event.from_json(event.json) == event


@given(st.text())
def test_decoder_never_crashes_on_garbage(raw: str) -> None:
    try:
        Event.from_json(raw)
    except EventFormatError:
        pass
