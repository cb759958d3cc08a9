"""Issue 23.4: the engine thread's stack holds llama.cpp's deepest grammar recursion for any
grammar the size bound lets through, so a construct the gate does not know still cannot
kill the worker. The control (a thread with the default stack) shows the check can fail."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rbee.link.bounds import MAX_GRAMMAR_CHARS

CHILD = textwrap.dedent("""
    import sys, threading
    import llama_cpp  # before the backends: the CPU variants need libggml mapped
    from rbee.engine.backends import load
    load()
    from rbee.link.bounds import ENGINE_STACK_BYTES, MAX_GRAMMAR_CHARS
    from rbee.worker.backends.loop import start_with_stack
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    depth = (MAX_GRAMMAR_CHARS - 20) // 2  # as deep as the size bound allows
    grammar = "root ::= " + "(" * depth + '"a"' + ")" * depth
    result = []
    run = lambda: result.append(bool(llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")))
    if sys.argv[2] == "engine":
        start_with_stack(run, "engine", ENGINE_STACK_BYTES).join()
    else:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    print("parsed", result)
""")


@pytest.mark.parametrize("stack", ["engine", "default"])
def test_the_deepest_grammar_the_size_bound_allows_parses_on_the_engine_thread(models_dir: Path,
                                                                                stack: str) -> None:
    assert MAX_GRAMMAR_CHARS <= 100_000
    model = next(models_dir.glob("gemma3-270m/*.gguf"))
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), stack], capture_output=True,
                          text=True, timeout=120)
    if stack == "engine":
        assert done.returncode == 0 and "parsed [True]" in done.stdout, done.stderr[-2000:]
    else:  # the control: without the engine's stack llama.cpp overflows its thread's
        assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stdout)
