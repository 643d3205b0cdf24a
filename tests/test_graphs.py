"""Captured steps (``graphs.py``): the mode names, why a run cannot capture, the shape key."""

from __future__ import annotations

import torch

from ofa_kernels.fewshot import graphs


def test_modes_and_refusals():
    assert "on cpu" in graphs.unsupported_reason(torch.device("cpu"), 1, False)
    assert "data-parallel" in graphs.unsupported_reason(torch.device("cuda"), 2, False)
    assert "PEFT" in graphs.unsupported_reason(torch.device("cuda"), 1, True)
    assert graphs.unsupported_reason(torch.device("cuda"), 1, False) is None


def test_the_shape_key_separates_what_a_captured_graph_cannot_share():
    a = {"input_ids": torch.zeros(2, 64, dtype=torch.long), "mask": torch.ones(2, 64)}
    same = {"mask": torch.zeros(2, 64), "input_ids": torch.ones(2, 64, dtype=torch.long)}  # values and order differ
    assert graphs.shape_key(a) == graphs.shape_key(same)
    assert graphs.shape_key(a) != graphs.shape_key({**a, "mask": torch.ones(2, 128)})
    assert graphs.shape_key(a) != graphs.shape_key({**a, "mask": torch.ones(2, 64, dtype=torch.float64)})
