"""Continuous batching on llama.cpp's own low-level API (llama-cpp-python's ctypes bindings),
as the step of the batch loop (rbee/worker/backends/loop.py).

The loop's engine thread owns one llama context with ``n_seq_max = slots`` and a unified
KV cache. Each step is a single ``llama_decode`` holding one token for every sequence that
is generating, plus a chunk of the prompt of each sequence still prefilling (so a long
new prompt never stalls the streams already running). After the step every sequence
that asked for logits samples: greedy ones by an argmax on llama.cpp's logits buffer,
the others with their own llama.cpp sampler chain. A finished or cancelled sequence frees
its slot at once; its cells stay as a prefix cache until the room is needed (see
rbee/worker/slots.py).
"""

from __future__ import annotations

import codecs
import ctypes
import math
import time
from dataclasses import dataclass, field
from typing import Any

from rbee.engine import rpc
from rbee.errors import RbeeError, RequestError
from rbee.link.schemas import JobRequest
from rbee.worker.backends.loop import Sequence, Token
from rbee.worker.slots import SlotTable

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


#: llama.cpp calls of a few µs that the step makes per token or per admission. ctypes releases and
#: retakes the GIL around every foreign call; for these the engine thread keeps it, so the event
#: loop cannot slip in between (and hold the engine up for its whole turn) on every token
HELD_GIL_CALLS = ("llama_get_logits_ith", "llama_token_to_piece", "llama_vocab_is_eog", "llama_memory_seq_rm",
                  "llama_memory_seq_cp", "llama_sampler_free")


class HeldGil:
    """llama.cpp's small calls through ``ctypes.PyDLL`` on the same loaded library (same handle,
    same signatures as llama-cpp-python declares them): called without releasing the GIL.
    ``llama_decode`` and the sampler chain keep llama-cpp-python's own bindings, which let the
    event loop run while the engine computes.

    ``hold=False`` keeps the usual bindings: in a split worker any of these calls may wait on a
    helper's RPC server, whose bytes this process's own bridge (Python, on the event loop)
    carries; holding the GIL there would deadlock."""

    def __init__(self, library: ctypes.CDLL, hold: bool = True) -> None:
        held = ctypes.PyDLL(library._name, handle=library._handle)
        for name in HELD_GIL_CALLS:
            declared, call = getattr(library, name), getattr(held, name)
            call.argtypes, call.restype = declared.argtypes, declared.restype
            setattr(self, name, call if hold else declared)

    llama_get_logits_ith: Any
    llama_token_to_piece: Any
    llama_vocab_is_eog: Any
    llama_memory_seq_rm: Any
    llama_memory_seq_cp: Any
    llama_sampler_free: Any


@dataclass(eq=False)
class LlamaState:
    """What the llama.cpp step keeps for one sequence."""

    seq_id: int
    sampler: Any  # llama.cpp's sampler chain; None for plain greedy
    greedy: bool  # argmax over the logits row, no sampler (a chain would do exactly that)
    done_prompt: int = 0  # prompt tokens already in the KV cache
    fed: int = 0  # generated tokens already in the KV cache
    last: int = -1  # the last sampled token, fed in the next step
    out_index: int = -1  # its logits row in the current batch, -1 when it asked for none
    text: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    generated: list[int] = field(default_factory=list)


def state(seq: Sequence) -> LlamaState:
    assert isinstance(seq.state, LlamaState)
    return seq.state


class LlamaStep:
    """llama.cpp's low-level API as one step of the batch loop: one ``llama_decode`` for every
    running sequence (one token each, plus prompt chunks), then each samples."""

    name = "llama.cpp"

    def __init__(self, llama_cpp: Any, model: Any, *, n_ctx: int, slots: int, threads: int) -> None:
        self.ll = llama_cpp
        self.held = HeldGil(llama_cpp.llama_cpp._lib, hold=not rpc.attached())
        self.model = model
        self.requested_ctx = n_ctx
        self.n_slots = slots
        self.threads = threads
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.banned = special_tokens(llama_cpp, self.vocab, IMAGE_MARKERS)
        self.n_ctx = 0
        self.decode_s = 0.0
        self._piece = ctypes.create_string_buffer(256)
        #: per token id: its bytes and whether it ends generation (asked of llama.cpp once)
        self._tokens: dict[int, tuple[bytes, bool]] = {}

    def open(self) -> None:
        import numpy as np

        #: the banned ids as a numpy index, made once: the greedy path masks them every token
        self.banned_rows = np.asarray(self.banned, dtype=np.intp)
        self._scratch = np.empty(self.n_vocab, dtype=np.float32)  # the logprobs' exp row
        ll = self.ll
        params = ll.llama_context_default_params()
        params.n_ctx = self.requested_ctx
        params.n_batch = max(PREFILL_CHUNK + self.n_slots, 512)
        params.n_ubatch = min(params.n_batch, rpc.SPLIT_UBATCH) if rpc.attached() else params.n_batch
        params.n_seq_max = self.n_slots
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True
        params.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RbeeError(f"llama.cpp could not create a context of {self.requested_ctx} tokens for "
                            f"{self.n_slots} sequences")
        self.n_ctx = int(ll.llama_n_ctx(self.ctx))
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(params.n_batch, 0, 1)
        self.n_batch = int(params.n_batch)
        self.slots = SlotTable(self.n_slots, self.n_ctx)

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)

    def admit(self, seq: Sequence) -> int | None:
        """A slot and room for ``seq`` (reusing the longest cached prefix), and its sampler."""
        assignment = self.slots.assign(seq.prompt, seq.max_new)
        if assignment is None:
            return None
        sampler, greedy = self._sampler(seq.request)  # may refuse the request: before any slot changes
        self.slots.start(assignment, seq.prompt, seq.max_new)
        ll, mem, target = self.held, self.memory, assignment.slot
        for evicted in assignment.evict:
            ll.llama_memory_seq_rm(mem, evicted, -1, -1)
        if assignment.reuse_from == target:
            ll.llama_memory_seq_rm(mem, target, assignment.reused, -1)
        else:
            ll.llama_memory_seq_rm(mem, target, -1, -1)
            if assignment.reuse_from is not None:
                ll.llama_memory_seq_cp(mem, assignment.reuse_from, target, 0, assignment.reused)
        seq.state = LlamaState(target, sampler, greedy, done_prompt=assignment.reused)
        return assignment.reused

    def _sampler(self, request: JobRequest) -> tuple[Any, bool]:
        """llama.cpp's sampler chain for ``request``, and whether it is plain greedy (argmax with
        the banned tokens masked), which the step does itself without copying the vocabulary."""
        outside = [token for token in request.logit_bias or {} if not 0 <= token < self.n_vocab]
        if outside:
            raise RequestError(f"logit_bias: token ids {outside[:5]} are outside this model's vocabulary "
                               f"(0 to {self.n_vocab - 1})")
        penalties = request.repeat_penalty != 1.0 or request.frequency_penalty or request.presence_penalty
        if request.temperature <= 0 and not (request.logit_bias or request.grammar or penalties):
            return None, True
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            ll.llama_sampler_chain_add(chain, sampler)

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
        if penalties:
            add(ll.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, request.repeat_penalty,
                                                request.frequency_penalty, request.presence_penalty))
        if request.temperature <= 0:
            add(ll.llama_sampler_init_greedy())
            return chain, False
        if request.top_k > 0:
            add(ll.llama_sampler_init_top_k(request.top_k))
        add(ll.llama_sampler_init_top_p(request.top_p, 1))
        add(ll.llama_sampler_init_min_p(request.min_p, 1))
        add(ll.llama_sampler_init_temp(request.temperature))
        add(ll.llama_sampler_init_dist(DEFAULT_SEED if request.seed is None else request.seed))
        return chain, False

    def step(self, running: list[Sequence]) -> list[tuple[Sequence, Token]]:
        batch, n = self.batch, 0
        for seq in running:
            st = state(seq)
            st.out_index = -1
            if st.done_prompt >= len(seq.prompt):
                self._add(n, st.last, st.seq_id, len(seq.prompt) + st.fed, True)
                st.fed += 1
                st.out_index = n
                n += 1
        budget = min(PREFILL_CHUNK, self.n_batch - n)
        for seq in running:
            if budget <= 0:
                break
            st = state(seq)
            if st.done_prompt < len(seq.prompt):
                take = min(budget, len(seq.prompt) - st.done_prompt)
                for i in range(st.done_prompt, st.done_prompt + take):
                    last = i == len(seq.prompt) - 1
                    self._add(n, seq.prompt[i], st.seq_id, i, last)
                    if last:
                        st.out_index = n
                    n += 1
                st.done_prompt += take
                budget -= take
        batch.n_tokens = n
        started = time.perf_counter()
        code = self.ll.llama_decode(self.ctx, batch)
        self.decode_s += time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        self.slots.clock += 1
        return [(seq, self._sample(seq)) for seq in running if state(seq).out_index >= 0]

    def _add(self, i: int, token: int, seq_id: int, pos: int, logits: bool) -> None:
        batch = self.batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _logits(self, index: int) -> Any:
        """The logits row of batch entry ``index``: a numpy view on llama.cpp's buffer, no copy."""
        import numpy as np

        return np.ctypeslib.as_array(self.held.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))

    def _sample(self, seq: Sequence) -> Token:
        st = state(seq)
        if st.greedy:
            row = self._logits(st.out_index)
            banned = self.banned_rows
            kept = row[banned]  # a copy of a few values; logprobs read the row as the model made it
            row[banned] = -math.inf  # what the chain's logit-bias sampler does
            token = int(row.argmax())  # the first of equal maxima, as llama.cpp's greedy sampler
            row[banned] = kept
        else:
            token = int(self.ll.llama_sampler_sample(st.sampler, self.ctx, st.out_index))
        if st.fed == 0:  # the prompt is in the cache now: later prompts may share it
            self.slots.slots[st.seq_id].tokens = list(seq.prompt)
        raw, eog = self._token(token)
        if eog:
            return Token(end=True)
        st.generated.append(token)
        st.last = token
        scored = None if seq.request.logprobs is None else self._logprobs(seq, token, raw)
        return Token(st.text.decode(raw), logprobs=scored)

    def _token(self, token: int) -> tuple[bytes, bool]:
        known = self._tokens.get(token)
        if known is None:
            held = self.held
            size = held.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
            known = (bytes(self._piece.raw[: max(size, 0)]), bool(held.llama_vocab_is_eog(self.vocab, token)))
            self._tokens[token] = known
        return known

    def _logprobs(self, seq: Sequence, token: int, raw: bytes) -> dict[str, Any]:
        """OpenAI's entry for a sampled token: its log-probability under the model's own
        distribution (before temperature, penalties, bias and grammar) and the likeliest others.
        In float32 on the logits view, into one scratch row: no copy of the vocabulary per token."""
        import numpy as np

        logits = self._logits(state(seq).out_index)
        top = float(logits.max())
        scratch = self._scratch
        np.subtract(logits, top, out=scratch)
        np.exp(scratch, out=scratch)
        normaliser = top + math.log(float(scratch.sum(dtype=np.float64)))

        def entry(tok: int, data: bytes) -> dict[str, Any]:
            return {"token": data.decode(errors="replace"), "logprob": float(logits[tok]) - normaliser,
                    "bytes": list(data)}

        ranked = sorted((int(t) for t in top_ids(logits, top, int(seq.request.logprobs or 0))),
                        key=lambda t: -float(logits[t]))
        return {**entry(token, raw), "top_logprobs": [entry(t, self._token(t)[0]) for t in ranked]}

    def release(self, seq: Sequence, keep: bool) -> None:
        """Free the slot now; its cells stay as a prefix cache unless ``keep`` is false."""
        st = state(seq)
        if st.sampler is not None:
            self.held.llama_sampler_free(st.sampler)
            st.sampler = None
        if not keep:
            self.held.llama_memory_seq_rm(self.memory, st.seq_id, -1, -1)
        cells = seq.prompt[: st.done_prompt] + st.generated[: st.fed] if keep else []
        self.slots.finish(st.seq_id, cells)


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


def top_ids(logits: Any, top: float, k: int) -> Any:
    """The ids of the ``k`` largest logits (any order). Only those within a few nats of the top
    are partitioned when at least ``k`` are (then the k largest are among them): a compare is
    ~20× cheaper than a partition of a 262k vocabulary."""
    import numpy as np

    if k <= 0:
        return []
    near = np.flatnonzero(logits >= top - 8.0)
    if len(near) >= k:
        return near[np.argpartition(logits[near], -k)[-k:]]
    return np.argpartition(logits, -k)[-k:]
