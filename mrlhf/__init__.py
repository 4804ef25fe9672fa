"""Megatron-style RLHF toolkit."""

__version__ = "0.1.0"
