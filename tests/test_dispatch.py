"""Backend choice: ``use_backend``, modules that carry their backend, and what overrides what."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICE

import ofa_kernels
from ofa_kernels import FusedRMSNorm, patch_model, use_backend
from ofa_kernels.ops import dispatch


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach each backend's RMSNorm forward (the torch one and the native one)."""
    from ofa_kernels.eager import norm as eager_norm

    seen = {"torch": 0}
    real = eager_norm.norm_fwd

    def counted(*args, **kwargs):
        seen["torch"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(eager_norm, "norm_fwd", counted)
    return seen


def _module_for(label: str):
    """The module that ``backend="auto"`` resolves to now (``label`` only names the moment)."""
    return dispatch.resolve("auto", DEVICE, "norm", 64, torch.float32, "rms.fwd")


def test_use_backend_chooses_for_auto_nests_and_restores(monkeypatch):
    monkeypatch.setenv("OFA_BACKEND", "auto")
    before = _module_for("auto")
    with use_backend("torch"):
        assert _module_for("torch").__name__ == "ofa_kernels.eager.norm"
        with use_backend("auto"):
            assert _module_for("auto") is before
        assert _module_for("torch").__name__ == "ofa_kernels.eager.norm"
    assert _module_for("auto") is before
    assert os.environ["OFA_BACKEND"] == "auto"  # the environment is never written


def test_use_backend_wins_over_the_environment_and_an_explicit_argument_over_both(monkeypatch):
    monkeypatch.setenv("OFA_BACKEND", "torch")
    assert _module_for("env").__name__ == "ofa_kernels.eager.norm"
    chosen = "cpu" if ofa_kernels.backends()["cpu"]["available"] and DEVICE.type == "cpu" else "torch"
    with use_backend(chosen):
        want = dispatch.resolve(chosen, DEVICE, "norm", 64, torch.float32, "rms.fwd")
        assert _module_for(chosen) is want
        explicit = dispatch.resolve("torch", DEVICE, "norm", 64, torch.float32, "rms.fwd")
        assert explicit.__name__ == "ofa_kernels.eager.norm"


def test_a_bad_backend_name_is_refused_naming_it():
    with pytest.raises(ValueError, match="backend must be one of .* got 'tpu'"):
        with use_backend("tpu"):
            pass
    with pytest.raises(ValueError, match="backend must be None or one of .* got 'tpu'"):
        FusedRMSNorm(8, backend="tpu")


def test_a_patched_model_runs_on_the_backend_it_was_given(calls, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("OFA_BACKEND", "auto")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).to(DEVICE).eval()
    names = patch_model(model, backend="torch")
    assert calls["torch"] == len(names) == 5  # patch_model's agreement probe, on the module's backend
    ids = torch.randint(0, 64, (1, 5), device=DEVICE)
    with torch.no_grad():
        model(ids)
    assert calls["torch"] == 10  # every norm, once, on the torch backend
    with use_backend("auto"), torch.no_grad():  # the modules' own choice wins over the block's
        model(ids)
    assert calls["torch"] == 15
    assert patch_model(model, backend=None) == [] and {m.backend for m in model.modules() if hasattr(m, "backend")} == {"torch"}


def test_every_backend_meets_its_contract_and_a_broken_one_is_named():
    import types

    from ofa_kernels.ops.contract import unusable_reason
    from ofa_kernels.eager import norm as eager_norm
    from ofa_kernels.eager import probe as eager_probe

    assert unusable_reason(eager_norm, "norm") is None and unusable_reason(eager_probe, "probe") is None
    for name, info in ofa_kernels.backends().items():
        if name != "auto":
            assert "breaks the backend contract" not in info["detail"], (name, info)
    missing = types.ModuleType("fake_missing")
    missing.norm_fwd, missing.norm_bwd_bwd = eager_norm.norm_fwd, eager_norm.norm_bwd_bwd
    assert unusable_reason(missing, "norm") == "fake_missing has no norm_bwd()"
    short = types.ModuleType("fake_short")
    short.norm_fwd, short.norm_bwd_bwd = eager_norm.norm_fwd, eager_norm.norm_bwd_bwd
    short.norm_bwd = lambda dy, x, weight: None  # noqa: E731
    assert "fake_short.norm_bwd() does not take the contract's arguments" in unusable_reason(short, "norm")
