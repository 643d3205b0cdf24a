"""The compute and cast facts every backend shares (``ofa_kernels.precision``): the accumulation dtype,
the cast codes, and the norm spec the ops hand each backend stage."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DEVICE

import ofa_kernels
from ofa_kernels.ops import dispatch
from ofa_kernels.precision import CAST_CODE, CAST_MODES, NormSpec, acc_dtype, norm_spec


def test_accumulation_is_fp32_and_fp64_for_fp64():
    assert {d: acc_dtype(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)} == {
        torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
        torch.float64: torch.float64}


def test_cast_codes_are_the_kernels_constants():
    # the Triton and compiled kernels branch on 0 (llama: round the normalised x first) and 1 (gemma)
    assert CAST_CODE == {"llama": 0, "gemma": 1, "none": 2} and tuple(CAST_CODE) == CAST_MODES
    assert [norm_spec(True, 0.0, m).cast_code for m in CAST_MODES] == [0, 1, 2]


def test_a_spec_is_interned_frozen_and_hashable():
    spec = norm_spec(True, 1, "gemma")
    assert spec is norm_spec(True, 1.0, "gemma") and spec == NormSpec(True, 1.0, "gemma")
    assert isinstance(spec.offset, float) and {spec: 1}[NormSpec(True, 1.0, "gemma")] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.offset = 0.0
    assert spec.unrounded() == NormSpec(True, 1.0, "none") and norm_spec(False) == NormSpec(False, 0.0, "none")


@pytest.mark.parametrize("args, error, message", [
    ((1, 0.0, "llama"), TypeError, "is_rms must be a bool, got 1"),
    ((True, 0.0, "mistral"), ValueError, "cast_mode must be one of"),
    ((True, float("nan"), "none"), ValueError, "offset must be a finite float, got nan"),
    ((False, 1.0, "none"), ValueError, "LayerNorm takes offset 0.0 and cast mode 'none'"),
    ((False, 0.0, "llama"), ValueError, "LayerNorm takes offset 0.0 and cast mode 'none'"),
])
def test_a_bad_spec_is_named(args, error, message):
    with pytest.raises(error, match=message):
        NormSpec(*args)


def test_the_ops_hand_each_stage_its_spec(monkeypatch):
    """Forward and backward get the norm as asked; the double backward gets it unrounded."""
    resolve, seen = dispatch.resolve, []

    class Spy:
        def __init__(self, impl):
            self.impl = impl

        def __getattr__(self, name):
            fn = getattr(self.impl, name)

            def call(*args, **kwargs):
                seen.append((name, next(a for a in args if isinstance(a, NormSpec))))
                return fn(*args, **kwargs)
            return call

    monkeypatch.setattr(dispatch, "resolve", lambda *a, **k: Spy(resolve(*a, **k)))
    x = torch.randn(3, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = ofa_kernels.rms_norm(x, w, 1e-6, offset=1.0, cast_mode="gemma", backend="torch")
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    torch.autograd.grad(gx.sum(), w)
    gemma = NormSpec(True, 1.0, "gemma")
    assert seen == [("norm_fwd", gemma), ("norm_bwd", gemma), ("norm_bwd_bwd", gemma.unrounded())]
    seen.clear()
    ofa_kernels.layer_norm(x, w, None, 1e-5, backend="torch").sum().backward()
    assert seen == [("norm_fwd", NormSpec(False)), ("norm_bwd", NormSpec(False))]


def test_the_kernels_cast_codes_are_precisions():
    """The C++/CUDA kernels name the cast rules by an enum in csrc/ofa_ext.h and the Triton kernels by a
    constexpr: both must number them as ``precision.CAST_CODE`` does (what the backends pass)."""
    import re
    from pathlib import Path

    from ofa_kernels.precision import CAST_CODE
    from ofa_kernels.triton import norm as triton_norm

    header = (Path(__file__).resolve().parents[1] / "csrc" / "ofa_ext.h").read_text()
    enum = dict(re.findall(r"kCast(\w+) = (\d+)", header))
    assert {name.lower(): int(code) for name, code in enum.items()} == CAST_CODE
    assert triton_norm.CAST_LLAMA.value == CAST_CODE["llama"]
    for source in ("csrc/cuda/norm.cu", "csrc/cpu/norm.cpp", "ofa_kernels/triton/norm.py"):
        text = (Path(__file__).resolve().parents[1] / source).read_text()
        assert not re.search(r"(?i)cast_mode == \d", text), source  # no bare cast code left
