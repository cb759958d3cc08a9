"""Model output on a terminal: control sequences are shown, not obeyed."""

from __future__ import annotations

import io

from rbee.keeper.render import JobPrinter, printable
from rbee.link import events

HOSTILE = "ok\x1b]0;pwned\x07 \x1b[2J\x1b[31mred\x9b\x7f\r done\n\ttabbed"


def test_control_characters_are_escaped_but_text_and_newlines_stay() -> None:
    shown = printable(HOSTILE)
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown and "\r" not in shown
    assert "\\x1b]0;pwned\\x07" in shown and "\\x1b[2J" in shown
    assert shown.endswith(" done\n\ttabbed")
    assert printable("héllo wörld ✓ 日本") == "héllo wörld ✓ 日本"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_escaped_tokens_a_pipe_or_raw_gets_them_as_they_are() -> None:
    cases = ((Tty(), False, printable(HOSTILE)), (Tty(), True, HOSTILE), (io.StringIO(), False, HOSTILE))
    for out, raw, expect in cases:
        JobPrinter(out=out, raw=raw, quiet=True).show(events.token(0, HOSTILE))
        assert out.getvalue() == expect


def test_logprobs_are_shown_after_the_answer_with_the_alternatives() -> None:
    from rich.console import Console

    err = io.StringIO()
    printer = JobPrinter(out=io.StringIO(), err=Console(file=err, width=120), quiet=True)
    entry = {"token": " blue", "logprob": -1.913, "bytes": [32, 98, 108, 117, 101],
             "top_logprobs": [{"token": " the", "logprob": -0.81, "bytes": []}]}
    printer.show(events.token(0, " blue", logprobs=[entry]))
    printer.show(events.end(1, 0.1, "length", prompt_tokens=4, logprobs=[{**entry, "token": "\x1b[2J"}]))
    shown = err.getvalue()
    assert "' blue'" in shown and "-1.913" in shown and "' the' -0.81" in shown
    assert "\x1b[2J" not in shown  # a token is shown escaped there too
