"""``ofa check`` (``selfcheck.py``): its pass rule and what it leaves behind (real models: ``test_models.py``)."""

from __future__ import annotations

import os

import torch

from ofa_kernels.ops import dispatch


def _module_for(label: str):
    """The module that ``backend="auto"`` resolves to now (``label`` only names the moment)."""
    return dispatch.resolve("auto", torch.device("cpu"), "norm", 64, torch.float32, "rms.fwd")


def test_selfcheck_leaves_the_environment_as_it_found_it(monkeypatch):
    from ofa_kernels.fewshot import selfcheck

    monkeypatch.delenv("OFA_BACKEND", raising=False)
    seen = []
    monkeypatch.setattr(selfcheck, "_run", lambda device, backend, name: seen.append(_module_for("inside").__name__) or 0)
    after = _module_for("before")
    assert selfcheck.run_selfcheck(backend="torch") == 0
    assert seen == ["ofa_kernels.eager.norm"] and "OFA_BACKEND" not in os.environ and _module_for("after") is after


def test_the_bounds_are_relative_and_the_answers_must_agree():
    from ofa_kernels.fewshot import selfcheck

    assert 0 < selfcheck.LOGIT_BOUND <= 1e-5 and 0 < selfcheck.GRAD_BOUND <= 1e-4
    logits = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    assert selfcheck._answers(logits, [0, 1]) == ["positive", "negative"]
