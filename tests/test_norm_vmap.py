"""``ops/norm_vmap.py`` on its own: the statistics rebuilt as functions of x, the plain twins against the
fused stages, and the batching rules (rows folded, or the plain twin for batched weights) against a
loop over the batch, in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import ofa_kernels
from ofa_kernels.ops import norm_vmap
from ofa_kernels.ops.norm_autograd import norm_call
from ofa_kernels.reference import layer_norm_ref, rms_norm_ref


@pytest.mark.parametrize("is_rms", [True, False])
def test_stats_of_keeps_the_saved_values_and_differentiates_like_the_recomputed_ones(is_rms):
    x = torch.randn(5, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    eps = 1e-5
    var = x.pow(2).mean(-1) if is_rms else x.var(-1, unbiased=False)
    want_rstd = (var + eps).rsqrt()
    want_mean = torch.zeros(5, dtype=torch.float64, device=DEVICE) if is_rms else x.mean(-1)
    mean, rstd = norm_vmap.stats_of(x, want_mean.detach(), want_rstd.detach(), is_rms)
    torch.testing.assert_close(rstd, want_rstd, rtol=1e-12, atol=0)
    if not is_rms:
        torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-15)
    g_got, = torch.autograd.grad((rstd * torch.arange(5.0, dtype=torch.float64)).sum(), x, retain_graph=True)
    g_want, = torch.autograd.grad((want_rstd * torch.arange(5.0, dtype=torch.float64)).sum(), x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("is_rms", [True, False])
def test_the_plain_forward_twin_is_the_reference(is_rms):
    x = torch.randn(4, 9, dtype=torch.float64, device=DEVICE)
    w = torch.randn(9, dtype=torch.float64, device=DEVICE)
    b = None if is_rms else torch.randn(9, dtype=torch.float64, device=DEVICE)
    call = norm_call(is_rms, 0.0, "llama" if is_rms else "none", "auto")
    got = norm_vmap.plain_fwd(x, w, b, 1e-6, call, torch.float64)
    y = got[0] if isinstance(got, tuple) else got
    want = rms_norm_ref(x, w, 1e-6) if is_rms else layer_norm_ref(x, w, b, 1e-6)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched_weight", [False, True], ids=["rows-folded", "weight-batched"])
def test_vmap_of_the_norm_and_its_gradients_equals_a_loop(batched_weight):
    B, M, N = 3, 4, 10
    x = torch.randn(B, M, N, dtype=torch.float64, device=DEVICE)
    w = torch.randn(B, N, dtype=torch.float64, device=DEVICE) if batched_weight else \
        torch.randn(N, dtype=torch.float64, device=DEVICE)

    def loss(x_, w_):
        return (ofa_kernels.rms_norm(x_, w_, 1e-6) * torch.linspace(-1, 1, N, dtype=torch.float64)).sum()

    grad = torch.func.grad(loss, argnums=(0, 1))
    in_dims = (0, 0 if batched_weight else None)
    got_y = torch.func.vmap(lambda a, c: ofa_kernels.rms_norm(a, c, 1e-6), in_dims=in_dims)(x, w)
    got_gx, got_gw = torch.func.vmap(grad, in_dims=in_dims)(x, w)
    for i in range(B):
        wi = w[i] if batched_weight else w
        torch.testing.assert_close(got_y[i], rms_norm_ref(x[i], wi, 1e-6), rtol=1e-12, atol=1e-12)
        gx, gw = grad(x[i], wi)
        torch.testing.assert_close(got_gx[i], gx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_gw[i], gw, rtol=1e-10, atol=1e-12)
