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


def test_narration_errors_and_tables_from_other_machines_reach_the_terminal_escaped() -> None:
    """Issue 23.14: a hive (or a GGUF's chat template it quotes) could send escape sequences
    in narration and error text; only tokens were escaped."""
    from rich.console import Console
    from rich.table import Table

    from rbee.keeper.render import remote_row

    evil = "ok \x1b]0;pwned\x07 \x1b[2J\x1b[31m [bold]x[/bold] \x9b1A"
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, highlight=False, soft_wrap=True, width=400)
    printer = JobPrinter(out=io.StringIO(), err=console)
    printer.show(events.narration("hive:a\x1b[8m", "load", evil))
    printer.show(events.error("bad_model\x1b[5m", evil, "hive:a"))
    table = Table("hive", "reason")
    remote_row(table, "a\x1b[41m", evil)
    console.print(table)
    shown = buffer.getvalue()
    for raw in ("\x1b]0;pwned", "\x1b[2J", "\x1b[31m ", "\x9b", "\x1b[8m", "\x1b[5m", "\x1b[41m"):
        assert raw not in shown, (raw, shown)
    assert shown.count("\\x1b]0;pwned") == 3 and "[bold]x[/bold]" in shown  # visible, and not markup
