"""How the keeper shows a job: tokens on stdout as they come, everything else on stderr."""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from rbee.link import events
from rbee.link.events import Event

#: C0 controls but newline and tab, DEL, and C1 controls (ESC starts every terminal escape)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Model output made harmless for a terminal: control characters are shown escaped
    (``\x1b``), so an answer cannot move the cursor, retitle the window or hide text."""
    return CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def remote(text: object) -> str:
    """Any string another machine sent (narration, an error, a hive's reason, a log line, a
    GGUF's metadata), ready for rich: control characters shown escaped, markup escaped.
    rich itself drops BEL and backspace but passes ESC sequences through."""
    return escape(printable(str(text)))


def remote_row(table: Table, *cells: object) -> None:
    table.add_row(*(remote(cell) for cell in cells))


class JobPrinter:
    """Prints one job's events; remembers how it ended for the exit code. Tokens go out as the
    model wrote them only with ``raw`` or when stdout is not a terminal (a pipe, a file)."""

    def __init__(
        self, out: TextIO | None = None, err: Console | None = None, quiet: bool = False, expect_tokens: bool = True,
        raw: bool = False,
    ) -> None:
        self.out = out or sys.stdout
        self.raw = raw or not self.out.isatty()
        self.err = err or Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.expect_tokens = expect_tokens
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self.text_written = False
        self.ended: Event | None = None
        self.scored: list[dict[str, Any]] = []  # logprobs of the answer's tokens, when the job asked

    def show(self, event: Event) -> None:
        kind = event.type
        self.scored += event.get("logprobs") or []
        if kind == events.TOKEN:
            self.out.write(event["text"] if self.raw else printable(event["text"]))
            self.out.flush()
            self.text_written = True
        elif kind == events.NARRATION:
            if event["action"] == "download" and event.get("total"):
                self._download(event)
            elif not self.quiet:
                self._finish_download()
                self.err.print(f"[dim]{remote(event['actor'])}[/dim] {remote(event['message'])}")
        elif kind in events.TERMINAL:
            self._finish_download()
            self.ended = event
            self._newline_after_text()
            if kind == events.END:
                self._scores()
                self._summary(event)
            else:
                self.err.print(
                    f"[bold red]error[/] from [bold]{remote(event['actor'])}[/] ({remote(event['code'])}): "
                    f"{remote(event['message'])}"
                )

    def _download(self, event: Event) -> None:
        """A live bar (size, percent, speed, ETA) from the hive's download narration."""
        if self.quiet:
            return
        if self._bar is None:
            self._bar = Progress(
                TextColumn("[dim]{task.fields[actor]}[/dim] {task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=self.err,
            )
            self._bar.start()
            self._task = self._bar.add_task("download", total=event["total"], actor=event["actor"])
        assert self._task is not None
        self._bar.update(self._task, completed=event.get("bytes", 0), total=event["total"])

    def _finish_download(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _summary(self, event: Event) -> None:
        if not self.expect_tokens:
            self.err.print(f"[green]done[/] in {event['duration_ms'] / 1000:.1f} s")
            return
        if event["tokens"] == 0:
            self.err.print(
                f"[bold red]error[/] the model produced no text (finish_reason={remote(event['finish_reason'])}); "
                "try another prompt or a higher temperature"
            )
            return
        prompt = f", prompt {event['prompt_tokens']} tokens" if event.get("prompt_tokens") else ""
        self.err.print(
            f"[green]done[/]: {event['tokens']} tokens in {event['duration_ms'] / 1000:.2f} s "
            f"({event['tokens_per_s']:.1f} tokens/s, finish_reason={remote(event['finish_reason'])}{prompt})"
        )

    def _scores(self) -> None:
        """Each token's log-probability and the likeliest alternatives (``rbee infer --logprobs N``)."""
        if not self.scored:
            return
        table = Table("token", "logprob", "likeliest instead", box=None, title="logprobs")
        for entry in self.scored:
            others = ", ".join(f"{printable(repr(alt['token']))} {alt['logprob']:.2f}" for alt in entry["top_logprobs"])
            table.add_row(escape(printable(repr(entry["token"]))), f"{entry['logprob']:.3f}", escape(others))
        self.err.print(table)

    def show_cancelled(self) -> None:
        self._finish_download()
        self._newline_after_text()
        self.err.print("[yellow]stopped[/]: the answer was cancelled")

    def _newline_after_text(self) -> None:
        if self.text_written:
            self.out.write("\n")
            self.out.flush()
            self.text_written = False

    @property
    def succeeded(self) -> bool:
        ended = self.ended
        return ended is not None and ended.type == events.END and (ended["tokens"] > 0 or not self.expect_tokens)
