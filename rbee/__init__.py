"""rbee: the machines you own as one LLM inference fleet."""

__version__ = "0.1.0"
