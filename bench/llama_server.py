"""``python -m bench.llama_server ARGS``: llama-cpp-python's own OpenAI server, the baseline, run
on the same engine build as rbee. A portable build registers no backend by itself, so its CPU
variant is loaded first (``rbee.engine.backends``), as any program using that build must."""

from __future__ import annotations

import runpy

from rbee.engine.backends import load

if __name__ == "__main__":
    load()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
