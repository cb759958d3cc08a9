"""Continuous batching on llama.cpp's own low-level API (llama-cpp-python's ctypes bindings).

One engine thread owns one llama context with ``n_seq_max = slots`` and a unified KV
cache. Each step is a single ``llama_decode`` holding one token for every sequence that
is generating, plus a chunk of the prompt of each sequence still prefilling (so a long
new prompt never stalls the streams already running). After the step every sequence
that asked for logits samples with its own llama.cpp sampler chain, and its text goes
out the moment it is sampled. A finished or cancelled sequence frees its slot at once;
its cells stay as a prefix cache until the room is needed (see rbee/worker/slots.py).
"""

from __future__ import annotations

import codecs
import ctypes
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rbee.errors import RbeeError, RequestError
from rbee.link.bounds import ENGINE_STACK_BYTES
from rbee.link.schemas import JobRequest
from rbee.worker.backends.base import Piece
from rbee.worker.backends.engine_queue import EngineQueue
from rbee.worker.slots import SlotTable
from rbee.worker.stops import StopMatcher

#: prompt tokens one step may prefill, over all sequences (the rest waits for the next step)
PREFILL_CHUNK = 256
PENALTY_LAST_N = 64
DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: a random seed
#: special tokens that only mark where an image goes (Gemma 3, Qwen-VL, Llama 4, Pixtral). rbee
#: serves text, so they are never sampled: a base model such as the default one otherwise writes
#: runs of ``<start_of_image>`` into its text (decision 64)
IMAGE_MARKERS = (
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|image_start|>", "<|image_end|>", "<|image|>",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
)


Emit = Callable[[object], None]


@dataclass
class Sequence:
    request: JobRequest
    prompt: list[int]
    max_new: int
    emit: Emit  # called from the engine thread with a Piece, or an exception
    cancelled: threading.Event
    on_start: Callable[[int], None] | None = None  # with the prompt tokens found in the cache
    seq_id: int = -1
    sampler: Any = None
    done_prompt: int = 0  # prompt tokens already in the KV cache
    fed: int = 0  # generated tokens already in the KV cache
    produced: int = 0
    last: int = -1  # the last sampled token, fed in the next step
    out_index: int = -1  # its logits row in the current batch, -1 when it asked for none
    text: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    stops: StopMatcher = field(default_factory=lambda: StopMatcher([]))
    generated: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.done_prompt < len(self.prompt)

    @property
    def cells(self) -> list[int]:
        """The tokens this sequence's KV cells hold, in order."""
        return self.prompt[: self.done_prompt] + self.generated[: self.fed]


class BatchEngine(EngineQueue[Sequence]):
    def __init__(self, llama_cpp: Any, model: Any, *, n_ctx: int, slots: int, threads: int, queue_limit: int) -> None:
        super().__init__(slots, queue_limit)
        self.ll = llama_cpp
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.banned = special_tokens(llama_cpp, self.vocab, IMAGE_MARKERS)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = max(PREFILL_CHUNK + slots, 512)
        params.n_ubatch = params.n_batch
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RbeeError(f"llama.cpp could not create a context of {n_ctx} tokens for {slots} sequences")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.n_batch = int(params.n_batch)
        self.slots = SlotTable(slots, self.n_ctx)
        self.active: dict[int, Sequence] = {}
        self._piece = ctypes.create_string_buffer(256)
        self._thread = start_with_stack(self._run, "batch-engine", ENGINE_STACK_BYTES)

    # the event loop's side ---------------------------------------------------------------

    def busy_slots(self) -> int:
        return self.slots.busy

    def retry_after(self) -> float:
        rate = self.rate()
        running = list(self.active.values())  # a snapshot: the engine thread changes the dict
        backlog = sum(s.max_new for s in self.waiting) + sum(s.max_new - s.produced for s in running)
        return max(1.0, min(60.0, backlog / rate)) if rate > 0 else 2.0

    def close(self) -> None:
        self.stop(self._thread)
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)

    # the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while self.wait_for_work(len(self.active)):
            self._drop_cancelled()
            self._admit()
            if self.active:
                try:
                    self._step()
                except Exception as exc:  # a failed decode ends every running sequence, never the engine
                    for seq in list(self.active.values()):
                        self._end(seq, error=RbeeError(f"llama.cpp failed: {exc}"), keep=False)
        for seq in [*self.active.values(), *self.waiting]:
            seq.emit(RbeeError("the model was unloaded"))

    def _drop_cancelled(self) -> None:
        with self._lock:
            for seq in [s for s in self.waiting if s.cancelled.is_set()]:
                self.waiting.remove(seq)
                seq.emit(Piece("", "cancelled", 0, len(seq.prompt)))
        for seq in [s for s in self.active.values() if s.cancelled.is_set()]:
            self._end(seq, "cancelled")

    def _admit(self) -> None:
        """Start waiting sequences, first come first served, while a slot and room are free."""
        while True:
            with self._lock:
                if not self.waiting:
                    return
                seq = self.waiting[0]
                assignment = self.slots.assign(seq.prompt, seq.max_new)
                if assignment is None:
                    return
                self.waiting.popleft()
                self.slots.start(assignment, seq.prompt, seq.max_new)
            ll, mem, target = self.ll, self.memory, assignment.slot
            for evicted in assignment.evict:
                ll.llama_memory_seq_rm(mem, evicted, -1, -1)
            if assignment.reuse_from == target:
                ll.llama_memory_seq_rm(mem, target, assignment.reused, -1)
            else:
                ll.llama_memory_seq_rm(mem, target, -1, -1)
                if assignment.reuse_from is not None:
                    ll.llama_memory_seq_cp(mem, assignment.reuse_from, target, 0, assignment.reused)
            seq.seq_id, seq.done_prompt = target, assignment.reused
            try:
                seq.sampler = self._sampler(seq.request)
            except RbeeError as exc:
                self._end(seq, error=exc, keep=False)
                continue
            seq.stops = StopMatcher(seq.request.stop)
            self.active[target] = seq
            if seq.on_start is not None:
                seq.on_start(assignment.reused)

    def _sampler(self, request: JobRequest) -> Any:
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            ll.llama_sampler_chain_add(chain, sampler)

        outside = [token for token in request.logit_bias or {} if not 0 <= token < self.n_vocab]
        if outside:
            ll.llama_sampler_free(chain)
            raise RequestError(f"logit_bias: token ids {outside[:5]} are outside this model's vocabulary "
                               f"(0 to {self.n_vocab - 1})")
        bias = {**(request.logit_bias or {}), **dict.fromkeys(self.banned, -100.0)}
        if bias:
            biases = (ll.llama_logit_bias * len(bias))(
                *(ll.llama_logit_bias(token, -math.inf if value <= -100 else value) for token, value in bias.items()))
            add(ll.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases))
        if request.grammar:
            grammar = ll.llama_sampler_init_grammar(self.vocab, request.grammar.encode(), b"root")
            if not grammar:
                ll.llama_sampler_free(chain)
                raise RequestError("the grammar does not parse (llama.cpp GBNF)")
            add(grammar)
        if request.repeat_penalty != 1.0 or request.frequency_penalty or request.presence_penalty:
            add(ll.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, request.repeat_penalty,
                                                request.frequency_penalty, request.presence_penalty))
        if request.temperature <= 0:
            add(ll.llama_sampler_init_greedy())
            return chain
        if request.top_k > 0:
            add(ll.llama_sampler_init_top_k(request.top_k))
        add(ll.llama_sampler_init_top_p(request.top_p, 1))
        add(ll.llama_sampler_init_min_p(request.min_p, 1))
        add(ll.llama_sampler_init_temp(request.temperature))
        add(ll.llama_sampler_init_dist(DEFAULT_SEED if request.seed is None else request.seed))
        return chain

    def _step(self) -> None:
        batch, n = self.batch, 0
        for seq in self.active.values():
            seq.out_index = -1
            if not seq.prefilling:
                self._add(n, seq.last, seq.seq_id, len(seq.prompt) + seq.fed, True)
                seq.fed += 1
                seq.out_index = n
                n += 1
        budget = min(PREFILL_CHUNK, self.n_batch - n)
        for seq in self.active.values():
            if budget <= 0:
                break
            if seq.prefilling:
                take = min(budget, len(seq.prompt) - seq.done_prompt)
                for i in range(seq.done_prompt, seq.done_prompt + take):
                    last = i == len(seq.prompt) - 1
                    self._add(n, seq.prompt[i], seq.seq_id, i, last)
                    if last:
                        seq.out_index = n
                    n += 1
                seq.done_prompt += take
                budget -= take
        batch.n_tokens = n
        code = self.ll.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        with self._lock:
            self.slots.clock += 1
        for seq in list(self.active.values()):
            if seq.out_index >= 0:
                self._sample(seq)
        self.stepped()

    def _add(self, i: int, token: int, seq_id: int, pos: int, logits: bool) -> None:
        batch = self.batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _sample(self, seq: Sequence) -> None:
        ll = self.ll
        token = int(ll.llama_sampler_sample(seq.sampler, self.ctx, seq.out_index))
        if seq.fed == 0:  # the prompt is in the cache now: later prompts may share it
            with self._lock:
                self.slots.slots[seq.seq_id].tokens = list(seq.prompt)
        if ll.llama_vocab_is_eog(self.vocab, token):
            self._end(seq, "stop")
            return
        seq.generated.append(token)
        seq.last = token
        seq.produced += 1
        self.tokens_generated += 1
        raw = self._token_bytes(token)
        text, hit = seq.stops.feed(seq.text.decode(raw))
        scored = None if seq.request.logprobs is None else [self._logprobs(seq, token, raw)]
        if hit:
            seq.emit(Piece(text, logprobs=scored))
            self._end(seq, "stop")
        elif seq.produced >= seq.max_new:
            seq.emit(Piece(text + seq.stops.flush(), logprobs=scored))
            self._end(seq, "length")
        else:
            seq.emit(Piece(text, logprobs=scored))

    def _token_bytes(self, token: int) -> bytes:
        size = self.ll.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return bytes(self._piece.raw[: max(size, 0)])

    def _logprobs(self, seq: Sequence, token: int, raw: bytes) -> dict[str, Any]:
        """OpenAI's entry for a sampled token: its log-probability under the model's own
        distribution (before temperature, penalties, bias and grammar) and the likeliest others."""
        import numpy as np

        row = self.ll.llama_get_logits_ith(self.ctx, seq.out_index)
        logits = np.ctypeslib.as_array(row, shape=(self.n_vocab,)).astype(np.float64)
        top = float(logits.max())
        normaliser = top + math.log(float(np.exp(logits - top).sum()))

        def entry(tok: int, data: bytes) -> dict[str, Any]:
            return {"token": data.decode(errors="replace"), "logprob": float(logits[tok]) - normaliser,
                    "bytes": list(data)}

        k = int(seq.request.logprobs or 0)
        best: Any = np.argpartition(-logits, k)[:k] if k else []
        ranked = sorted((int(t) for t in best), key=lambda t: -logits[t])
        return {**entry(token, raw), "top_logprobs": [entry(t, self._token_bytes(t)) for t in ranked]}

    def _end(self, seq: Sequence, finish: str = "stop", error: BaseException | None = None, keep: bool = True) -> None:
        """Free the slot now; its cells stay as a prefix cache unless ``keep`` is false."""
        self.active.pop(seq.seq_id, None)
        if seq.sampler is not None:
            self.ll.llama_sampler_free(seq.sampler)
            seq.sampler = None
        if not keep:
            self.ll.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
        with self._lock:
            self.slots.finish(seq.seq_id, seq.cells if keep else [])
        if error is not None:
            seq.emit(error)
        else:
            seq.emit(Piece("", finish, seq.produced, len(seq.prompt)))


def special_tokens(llama_cpp: Any, vocab: Any, texts: tuple[str, ...]) -> list[int]:
    """The ids of those of ``texts`` that are one special (control or user-defined) token in ``vocab``."""
    found = []
    special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    ids = (llama_cpp.llama_token * 4)()
    for text in texts:
        data = text.encode()
        if llama_cpp.llama_tokenize(vocab, data, len(data), ids, len(ids), False, True) != 1:
            continue
        if llama_cpp.llama_vocab_get_attr(vocab, ids[0]) & special:
            found.append(int(ids[0]))
    return found


def start_with_stack(target: Callable[[], None], name: str, size: int) -> threading.Thread:
    """Start a daemon thread with a stack of ``size`` bytes: llama.cpp's grammar code recurses
    per nesting level on it (rbee.link.bounds)."""
    with _STACK_SIZE_LOCK:
        previous = threading.stack_size(size)
        try:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    return thread


_STACK_SIZE_LOCK = threading.Lock()
