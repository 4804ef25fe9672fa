"""Custom operators (C++/CUDA in csrc/, built into mrlhf._C) with pure-torch twins; see kv_ops for the backend."""

from mrlhf.ops.kv_ops import BACKEND, EXT_DEVICES, decode_attention, describe_backend, kv_append

__all__ = ["BACKEND", "EXT_DEVICES", "decode_attention", "describe_backend", "kv_append"]
