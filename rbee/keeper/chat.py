"""`rbee chat`: a multi-turn conversation in the terminal.

Each turn sends the whole history as chat ``messages``; the worker renders them with the
model's own chat template (or a fallback for a model without one). Ctrl+C while an answer
streams cancels that answer (down to the worker) and the session goes on; Ctrl+C or Ctrl+D
at the prompt, or ``/exit``, ends it. The history is a plain class, tested without a queen.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console

from rbee.keeper.render import JobPrinter
from rbee.link import events
from rbee.link.client import LinkClient
from rbee.link.schemas import parse_job_request

HELP = "/reset forgets the conversation, /exit ends it; Ctrl+C stops an answer."


@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def asking(self, text: str) -> list[dict[str, str]]:
        """The messages for a new user turn (the history is changed only once it is answered)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": text}]

    def answered(self, question: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.turns.clear()


def command(line: str) -> str | None:
    """``reset``, ``exit``, ``help`` or ``unknown`` for a slash command; None for a message."""
    if not line.startswith("/"):
        return None
    word = line[1:].split(maxsplit=1)[0].lower() if line[1:].strip() else ""
    return {"reset": "reset", "clear": "reset", "exit": "exit", "quit": "exit", "bye": "exit",
            "help": "help", "?": "help"}.get(word, "unknown")


async def lines(stream: TextIO) -> AsyncIterator[str]:
    """stdin line by line without a thread: a pipe or a terminal through the event loop, a
    regular file (``< file``) read directly, as it never blocks."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stream)
    except ValueError:  # a regular file
        for line in stream:
            yield line.rstrip("\n")
        return
    while raw := await reader.readline():
        yield raw.decode(errors="replace").rstrip("\n")


@dataclass
class Turn:
    """One answer as it streams: its text, and whether it ended well."""

    printer: JobPrinter
    text: list[str] = field(default_factory=list)

    def show(self, event: events.Event) -> None:
        if event.type == events.TOKEN:
            self.text.append(event["text"])
        self.printer.show(event)


async def chat(client: LinkClient, fields: dict[str, Any], conversation: Conversation,
               make_printer: Callable[[], JobPrinter], err: Console, source: AsyncIterator[str] | None = None,
               prompt: bool | None = None) -> bool:
    """Run the session; True if every turn asked was answered (the exit code's basis)."""
    prompt = sys.stdin.isatty() if prompt is None else prompt
    source = source or lines(sys.stdin)
    loop = asyncio.get_running_loop()
    answering: asyncio.Task[None] | None = None
    leave = asyncio.Event()

    def interrupted() -> None:
        if answering is not None and not answering.done():
            answering.cancel()
        else:
            leave.set()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupted)
    all_answered = True
    try:
        while not leave.is_set():
            if prompt:
                err.print(">>> ", end="")
            line = await _next_line(source, leave)
            if line is None:
                break
            if not line.strip():
                continue
            kind = command(line.strip())
            if kind == "exit":
                break
            if kind == "reset":
                conversation.reset()
                err.print("[dim]the conversation is forgotten[/dim]")
                continue
            if kind is not None:
                err.print(("" if kind == "help" else f"unknown command {line.split()[0]!r}. ") + HELP)
                continue
            body = parse_job_request({**fields, "messages": conversation.asking(line)}).downstream()
            turn = Turn(make_printer())
            answering = asyncio.create_task(_stream(client, body, turn))
            try:
                await answering
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():  # this session is cancelled, not the answer
                    raise
                turn.printer.show_cancelled()
                continue
            finally:
                answering = None
            if turn.printer.succeeded:
                conversation.answered(line, "".join(turn.text))
            else:
                all_answered = False
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    return all_answered


async def _stream(client: LinkClient, body: dict[str, Any], turn: Turn) -> None:
    async with contextlib.aclosing(client.run(body)) as stream:
        async for event in stream:
            turn.show(event)


async def _next_line(source: AsyncIterator[str], leave: asyncio.Event) -> str | None:
    """The next line, or None at the end of input or when the operator leaves (Ctrl+C)."""
    reading = asyncio.ensure_future(anext(source, None))
    leaving = asyncio.ensure_future(leave.wait())
    done, _ = await asyncio.wait({reading, leaving}, return_when=asyncio.FIRST_COMPLETED)
    leaving.cancel()
    if reading not in done:
        reading.cancel()
        return None
    return reading.result()
