"""What a llama.cpp worker takes beyond its weights and KV cache, and how its context is chosen
when nobody asks: the figures the hive's placement and the queen's split planner both count with."""

from __future__ import annotations

#: compute buffers and the process itself, beyond weights + KV cache
RUNTIME_OVERHEAD = 64 * 1024 * 1024
#: the smallest context an automatic choice goes down to before refusing
MIN_AUTO_CTX = 2048
#: context for a model that does not say what it was trained for
FALLBACK_CTX = 4096
