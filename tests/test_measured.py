"""The lookup rules of the measured tables (``measured.py``), on tables made here."""

from __future__ import annotations

import pytest
import torch

from ofa_kernels.measured import gpu_arch, nearest_measured
from ofa_kernels.ops.dispatch import pick


def test_the_nearest_measured_width_is_the_largest_at_or_below_else_the_smallest():
    widths = [576, 4096, 1024]
    assert [nearest_measured(widths, w) for w in (64, 576, 577, 1023, 1024, 5000)] == [576, 576, 576, 576, 1024, 4096]
    with pytest.raises(ValueError, match="nothing was measured"):
        nearest_measured([], 8)


def test_the_backend_table_and_the_launch_table_follow_the_same_rule(monkeypatch):
    from ofa_kernels.triton import tuning

    backends = {"sm90": {"rms": {"fwd": {"bfloat16": {"576": "cuda", "4096": "triton"}}}}}
    assert [pick(backends, "sm90", "rms", "fwd", "bfloat16", w) for w in (100, 2000, 8192)] == ["cuda", "cuda", "triton"]
    assert pick(backends, "sm80", "rms", "fwd", "bfloat16", 576) is None
    launches = {"sm90": {"fwd": {"bfloat16": {"576": {"num_warps": 2}, "4096": {"num_warps": 8}}}}}
    monkeypatch.setattr(tuning, "table", lambda: launches)
    tuning.knobs.cache_clear()
    try:
        assert [tuning.knobs("sm90", "fwd", torch.bfloat16, w)["num_warps"] for w in (100, 2000, 8192)] == [2, 2, 8]
    finally:
        tuning.knobs.cache_clear()


def test_off_cuda_the_architecture_is_the_interpreter():
    assert gpu_arch(torch.device("cpu")) == "interpreter"
