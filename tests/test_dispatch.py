"""Backend choice: ``use_backend``, modules that carry their backend, and what overrides what."""

from __future__ import annotations

import functools
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


# ------------------------------------------------------------------ the measured backend table (moved from test_norm_ops)


def test_the_backend_table_picks_the_nearest_measured_width_at_or_below():
    from ofa_kernels.ops.dispatch import pick

    table = {"sm90": {"rms": {"fwd": {"bfloat16": {"2048": "cuda", "8192": "triton"}}}}}
    assert [pick(table, "sm90", "rms", "fwd", "bfloat16", n) for n in (1024, 2048, 4096, 8192, 65536)] == \
        ["cuda", "cuda", "cuda", "triton", "triton"]
    assert pick(table, "sm90", "rms", "bwd", "bfloat16", 4096) is None
    assert pick(table, "sm80", "rms", "fwd", "bfloat16", 4096) is None
    assert pick(table, "sm90", "layer", "fwd", "bfloat16", 4096) is None


def test_auto_runs_each_stage_on_the_backend_measured_for_it(monkeypatch):
    """CUDA tensors under "auto": each (op, stage, dtype, width) takes the table's backend, Triton where
    nothing was measured or the measured one is missing; the op layer asks per stage."""
    from ofa_kernels.ops import dispatch

    table = {"sm90": {"rms": {"fwd": {"bfloat16": {"4096": "cuda"}}, "bwd": {"bfloat16": {"4096": "triton"}}}}}
    monkeypatch.setattr(dispatch, "auto_table", lambda: table)
    monkeypatch.setattr(dispatch, "gpu_arch", lambda device: "sm90")
    built = {"cuda", "triton", "torch"}
    monkeypatch.setattr(dispatch, "_load", lambda name, family="norm": (name, "") if name in built else (None, "no"))
    gpu = torch.device("cuda", 0)
    auto = functools.partial(dispatch._auto, gpu, "norm")
    assert auto(4096, torch.bfloat16, "rms.fwd") == "cuda"
    assert auto(5120, torch.bfloat16, "rms.fwd") == "cuda"  # nearest measured width below
    assert auto(4096, torch.bfloat16, "rms.bwd") == "triton"
    assert auto(4096, torch.bfloat16, "rms.bwd_bwd") == "triton"  # not measured
    assert auto(4096, torch.float32, "rms.fwd") == "triton"
    assert auto(4096, torch.bfloat16, "layer.fwd") == "triton"
    built.discard("cuda")
    assert auto(4096, torch.bfloat16, "rms.fwd") == "triton"  # measured winner not built here


def test_the_op_layer_resolves_each_stage_with_its_table_key(monkeypatch):
    from ofa_kernels.ops import dispatch

    seen, resolve = [], dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda *a: seen.append(a[3:]) or resolve(*a))
    for norm, kind in ((lambda x, w: ofa_kernels.rms_norm(x, w), "rms"),
                       (lambda x, w: ofa_kernels.layer_norm(x, w, None), "layer")):
        seen.clear()
        x = torch.randn(3, 10, device=DEVICE, dtype=torch.float64, requires_grad=True)
        w = torch.rand(10, device=DEVICE, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(norm(x, w).square().sum(), [x], create_graph=True)
        gx.sum().backward()
        assert set(seen) == {(10, torch.float64, f"{kind}.{stage}") for stage in ("fwd", "bwd", "bwd_bwd")}
