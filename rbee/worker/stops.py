"""Stop sequences over a stream of text pieces, for engines without their own (MLX).

Text that might be the start of a stop sequence is held back until it is clear
either way, so a stop string never reaches the client, and everything else is
released as soon as it is safe.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit now, whether a stop sequence was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(stop), stop) for stop in self.stops if stop in self.pending]
        if hits:
            index = min(hits)[0]
            out, self.pending = self.pending[:index], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:size]):
                    keep = max(keep, size)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
