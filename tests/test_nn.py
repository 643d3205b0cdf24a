"""The drop-in modules (``ofa_kernels.nn``): the numbers of the reference norms, the state dicts of the
modules they replace, their initialisation and result dtype, and bad arguments named."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, available_backends

from ofa_kernels.nn import FusedLayerNorm, FusedRMSNorm
from ofa_kernels.reference import layer_norm_ref, rms_norm_ref

BACKENDS = available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cast_mode, offset", [("llama", 0.0), ("gemma", 1.0), ("none", 0.5)])
def test_rms_module_computes_the_reference_over_its_trailing_dims(backend, cast_mode, offset):
    norm = FusedRMSNorm((3, 5), eps=1e-5, offset=offset, cast_mode=cast_mode, device=DEVICE, dtype=torch.float64,
                        backend=backend)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 2, 3, 5, device=DEVICE, dtype=torch.float64)
    expected = rms_norm_ref(x.reshape(8, 15), norm.weight.reshape(15), 1e-5, offset=offset,
                            cast_mode=cast_mode).reshape(x.shape)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_module_has_the_state_dict_and_numbers_of_the_modules_it_replaces(backend):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf, torch_norm = LlamaRMSNorm(24, eps=1e-6).to(DEVICE), torch.nn.RMSNorm(24, eps=1e-6, device=DEVICE)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    fused = FusedRMSNorm(24, eps=1e-6, device=DEVICE, backend=backend)
    fused.load_state_dict(hf.state_dict())
    torch_norm.load_state_dict(fused.state_dict())
    x = torch.randn(3, 7, 24, device=DEVICE)
    torch.testing.assert_close(fused(x), hf(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(x), torch_norm(x), rtol=1e-5, atol=1e-5)
    assert fused.variance_epsilon == fused.eps == hf.variance_epsilon


def test_rms_module_initialises_its_weight_to_the_identity_of_its_offset():
    assert torch.equal(FusedRMSNorm(6).weight.detach(), torch.ones(6))
    assert FusedRMSNorm([2, 3]).weight.shape == FusedRMSNorm(torch.Size([2, 3])).weight.shape == (2, 3)
    assert torch.equal(FusedRMSNorm(6, offset=1.0, cast_mode="gemma").weight.detach(), torch.zeros(6))
    bare = FusedRMSNorm(6, elementwise_affine=False)
    assert bare.weight is None and list(bare.state_dict()) == []
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(bare(x), rms_norm_ref(x, None, 1e-6), rtol=1e-12, atol=1e-12)


def test_output_dtype_fixes_the_result_dtype_of_fp32_master_weights_in_a_bf16_model():
    norm = FusedRMSNorm(16, device=DEVICE)
    x = torch.randn(4, 16, device=DEVICE, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.float32  # HF's promotion rule: bf16 activations times an fp32 weight
    norm.output_dtype = torch.bfloat16
    assert norm(x).dtype == torch.bfloat16
    layer = FusedLayerNorm(16, device=DEVICE)
    assert layer(x).dtype == torch.bfloat16  # LayerNorm keeps x's dtype
    layer.output_dtype = torch.float32
    assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=8, cast_mode="mistral"), "cast_mode must be one of"),
    (dict(hidden_size=()), "hidden_size must be an int or a non-empty tuple"),
    (dict(hidden_size=(4, -1)), "hidden_size must be an int or a non-empty tuple"),
    (dict(hidden_size=8.0), "hidden_size must be an int or a non-empty tuple"),
    (dict(hidden_size="8"), "hidden_size must be an int or a non-empty tuple"),
    (dict(hidden_size=True), "hidden_size must be an int or a non-empty tuple"),
    (dict(hidden_size=8, backend="cudnn"), "backend must be None or one of"),
])
def test_bad_rms_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedRMSNorm(**kwargs)


def test_a_bad_layer_norm_backend_is_named():
    with pytest.raises(ValueError, match="backend must be None or one of"):
        FusedLayerNorm(8, backend="cudnn")


def test_the_repr_names_what_is_not_the_llama_default():
    assert repr(FusedRMSNorm(8)) == "FusedRMSNorm(8, eps=1e-06)"
    assert repr(FusedRMSNorm(8, offset=1.0, cast_mode="gemma")) == "FusedRMSNorm(8, eps=1e-06, offset=1.0, cast_mode='gemma')"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, affine, bias", [(24, True, True), ((3, 8), True, True), (24, True, False),
                                                 (24, False, False)])
def test_layer_norm_module_matches_torch_in_values_and_gradients(backend, shape, affine, bias):
    eager = torch.nn.LayerNorm(shape, eps=1e-5, elementwise_affine=affine, bias=bias, device=DEVICE,
                               dtype=torch.float64)
    if affine:
        with torch.no_grad():
            eager.weight.normal_()
            if bias:
                eager.bias.normal_()
    fused = FusedLayerNorm(shape, eps=1e-5, elementwise_affine=affine, bias=bias, device=DEVICE,
                           dtype=torch.float64, backend=backend)
    fused.load_state_dict(eager.state_dict())
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = torch.randn(5, 2, *((shape,) if isinstance(shape, int) else shape), device=DEVICE, dtype=torch.float64)
    dy = torch.randn_like(x)
    outs = []
    for module in (eager, fused):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(dy)
        outs.append((y, xi.grad, *(p.grad for p in module.parameters())))
    assert len(outs[0]) == len(outs[1])
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    flat = layer_norm_ref(x.reshape(10, -1), None if not affine else fused.weight.reshape(-1),
                          fused.bias.reshape(-1) if bias else None, 1e-5).reshape(x.shape)
    torch.testing.assert_close(outs[1][0], flat, rtol=1e-12, atol=1e-12)
