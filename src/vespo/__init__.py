"""vespo: stable off-policy reinforcement learning of language models (VESPO, arXiv 2602.10693)."""

__version__ = "0.2.0"
