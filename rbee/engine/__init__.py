"""The llama.cpp engine as rbee builds, ships, proves and loads it on every host.

One build runs on every CPU of its platform: llama.cpp's CPU kernels are compiled once per
instruction-set level (``GGML_CPU_ALL_VARIANTS``) and the level a worker uses is picked at run
time (``GGML_BACKEND_DL``). ``cpu`` reads what a CPU offers and ranks the levels, ``build`` makes
and caches that build, ``backends`` loads the chosen level into a process, ``proof`` decodes a few
tokens in a child process to prove a level really runs here, ``crash`` explains a worker that a
signal killed.
"""
