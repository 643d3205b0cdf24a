"""The references (``ofa_kernels.reference``) every kernel is checked against, checked themselves: against
PyTorch's own norms in float64, against the formulas written out by hand, and for the rounding each
cast mode places where Hugging Face's modules place it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ofa_kernels.reference import layer_norm_ref, rms_norm_ref


def test_rms_reference_is_torch_rms_norm_in_float64_and_the_formula_by_hand():
    x, w = torch.randn(7, 13, dtype=torch.float64), torch.randn(13, dtype=torch.float64)
    got = rms_norm_ref(x, w, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (13,), w, 1e-5), rtol=1e-14, atol=1e-14)
    by_hand = torch.stack([w * row / (row.pow(2).sum() / 13 + 1e-5).sqrt() for row in x])
    torch.testing.assert_close(got, by_hand, rtol=1e-13, atol=1e-13)


def test_layer_norm_reference_is_torch_layer_norm_in_float64():
    x = torch.randn(6, 11, dtype=torch.float64)
    w, b = torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    torch.testing.assert_close(layer_norm_ref(x, w, b, 1e-5), F.layer_norm(x, (11,), w, b, 1e-5), rtol=1e-14,
                               atol=1e-14)
    torch.testing.assert_close(layer_norm_ref(x, None, None, 1e-5), F.layer_norm(x, (11,), eps=1e-5), rtol=1e-14,
                               atol=1e-14)


def test_offsets_add_to_the_weight_and_gemma_zeros_are_the_plain_norm():
    x, w = torch.randn(4, 9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    plain = rms_norm_ref(x, None)
    for mode in ("llama", "gemma", "none"):
        torch.testing.assert_close(rms_norm_ref(x, w, offset=0.5, cast_mode=mode), rms_norm_ref(x, w + 0.5),
                                   rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rms_norm_ref(x, torch.zeros(9, dtype=torch.float64), offset=1.0, cast_mode="gemma"),
                               plain, rtol=0, atol=0)


def test_each_cast_mode_rounds_where_its_hf_module_does():
    x = torch.randn(5, 64).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(64)).to(torch.bfloat16)
    xhat = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    llama = w * xhat.to(torch.bfloat16)  # LlamaRMSNorm: the normalised x rounded to bf16, then the weight
    gemma = (xhat * w.float()).to(torch.bfloat16)  # GemmaRMSNorm: the weight applied in fp32, rounded once
    assert torch.equal(rms_norm_ref(x, w, cast_mode="llama"), llama)
    assert torch.equal(rms_norm_ref(x, w, cast_mode="gemma"), gemma)
    assert not torch.equal(llama, gemma)  # the two roundings differ on these inputs, so the cases can tell
    none = rms_norm_ref(x, w.float(), cast_mode="none")
    assert none.dtype == torch.float32 and torch.equal(none, xhat * w.float())  # promoted, never rounded


def test_upcast_computes_in_float64_from_any_dtype():
    x, w, b = torch.randn(3, 16).half(), torch.randn(16).half(), torch.randn(16).half()
    rms, ln = rms_norm_ref(x, w, upcast=True), layer_norm_ref(x, w, b, upcast=True)
    assert rms.dtype == ln.dtype == torch.float64
    torch.testing.assert_close(rms, F.rms_norm(x.double(), (16,), w.double(), 1e-6), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ln, F.layer_norm(x.double(), (16,), w.double(), b.double(), 1e-5), rtol=1e-14,
                               atol=1e-14)
    assert layer_norm_ref(x, w, b).dtype == torch.float16  # without upcast: x's dtype


def test_the_references_are_differentiable_twice():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: rms_norm_ref(x, w, 1e-5), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w, b: layer_norm_ref(x, w, b, 1e-5), (x, w, b))


def test_a_bad_cast_mode_is_named():
    with pytest.raises(ValueError, match="cast_mode must be 'llama', 'gemma' or 'none', got 'mistral'"):
        rms_norm_ref(torch.randn(2, 4), torch.ones(4), cast_mode="mistral")
