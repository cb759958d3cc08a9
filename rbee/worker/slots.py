"""Which sequence slot a request gets, how much of its prompt is already in the KV cache,
and whether the context has room: pure bookkeeping for the batching engine, tested
without llama.cpp.

The engine's KV cache is unified: ``n_ctx`` cells shared by every sequence. A running
request reserves ``prompt + max_tokens`` cells, so a step can never run out of room
mid-generation; a request that does not fit waits in the FIFO queue. A finished
sequence keeps its cells (its tokens stay "resident") until they are needed, so a
later prompt that starts the same way skips that prefix (``seq_cp`` from any slot that
holds it, active or idle).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cells hold, in order
    busy: bool = False
    reserved: int = 0  # cells a running request may still grow to
    last_used: int = 0  # a step counter, for evicting idle caches oldest first


@dataclass(frozen=True)
class Assignment:
    slot: int  # seq id the request runs in
    reuse_from: int | None  # seq id whose first ``reused`` tokens are copied (None: nothing reused)
    reused: int  # prompt tokens already in the cache; prefill starts there
    evict: tuple[int, ...]  # idle sequences whose cells must be dropped first


class SlotTable:
    def __init__(self, n_slots: int, n_ctx: int) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]
        self.n_ctx = n_ctx
        self.clock = 0

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    def resident(self, slot: Slot) -> int:
        """Cells a slot holds now or may hold: a running request its reservation, an idle one its cache."""
        return max(slot.reserved, len(slot.tokens)) if slot.busy else len(slot.tokens)

    def assign(self, prompt: list[int], max_new: int) -> Assignment | None:
        """A slot for a request of ``prompt`` that may add ``max_new`` tokens, or None if it must wait."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        need = len(prompt) + max_new
        # the best resident prefix anywhere (idle or running), but always leave one prompt token to decode
        donor, reused = None, 0
        for slot in self.slots:
            n = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
            if n > reused:
                donor, reused = slot, n
        if donor is not None and not donor.busy:
            target = donor  # run in the idle slot that holds the prefix: no copy needed
        else:
            target = min(free, key=lambda s: (len(s.tokens), s.last_used))  # the emptiest, oldest idle cache
        evict: list[int] = []
        used = sum(self.resident(s) for s in self.slots if s is not target)
        if used + need > self.n_ctx:
            for slot in sorted((s for s in self.slots if not s.busy and s is not target and s.tokens),
                               key=lambda s: s.last_used):
                if slot is donor:
                    continue
                evict.append(slot.seq_id)
                used -= len(slot.tokens)
                if used + need <= self.n_ctx:
                    break
        if used + need > self.n_ctx:
            return None
        reuse_from = None if reused == 0 else donor.seq_id if donor is not None else None
        return Assignment(target.seq_id, reuse_from, reused, tuple(evict))

    def start(self, assignment: Assignment, prompt: list[int], max_new: int) -> None:
        for seq_id in assignment.evict:
            self.slots[seq_id].tokens = []
        slot = self.slots[assignment.slot]
        slot.tokens = list(prompt[: assignment.reused])
        slot.busy, slot.reserved = True, len(prompt) + max_new
        self.clock += 1
        slot.last_used = self.clock

    def finish(self, seq_id: int, cells: list[int]) -> None:
        """The request in ``seq_id`` ended; ``cells`` (the tokens its KV cells hold) stay as a cache."""
        slot = self.slots[seq_id]
        slot.busy, slot.reserved, slot.tokens = False, 0, cells
        self.clock += 1
        slot.last_used = self.clock
