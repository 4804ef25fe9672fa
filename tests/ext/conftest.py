"""Fixtures of the extension tests: run a kernel test on every CPU vector path this machine has."""

from __future__ import annotations

import pytest
import torch

from mrlhf.ops import kv_ops

ORDER = ["portable", "avx2", "avx512"]


def supported_isas() -> list[str]:
    """The CPU paths mrlhf._C can run here: portable, and up to the best the CPU supports."""
    if "cpu" not in kv_ops.EXT_DEVICES:
        return []
    before = torch.ops.mrlhf.cpu_isa()
    best = torch.ops.mrlhf.cpu_isa("best")
    torch.ops.mrlhf.cpu_isa(before)
    return ORDER[: ORDER.index(best) + 1]


ISAS = supported_isas() or ["none"]


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Switch mrlhf._C's CPU kernels to one vector path for the test, then back."""
    if request.param == "none":
        yield None
        return
    before = torch.ops.mrlhf.cpu_isa()
    torch.ops.mrlhf.cpu_isa(request.param)
    try:
        yield request.param
    finally:
        torch.ops.mrlhf.cpu_isa(before)
