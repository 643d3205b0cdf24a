"""The probe kernels against the host generator and plain PyTorch, on every available backend."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, available_backends

from ofa_kernels import rng
from ofa_kernels.rng import ProbeStream
from ofa_kernels.ops.probe import perturb, probe_dot, probe_rows

BACKENDS = available_backends()
DISTS = ["rademacher", "gaussian"]


def _close(dist):
    # Rademacher numbers are bit-identical everywhere; Gaussian ones differ in the last ulps of log/cos.
    return dict(rtol=0, atol=0) if dist == "rademacher" else dict(rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_in_kernel_probes_equal_the_host_generator(backend, dist, dtype):
    K, B, T, d = 3, 2, 5, 37
    x = torch.randn(K * B, T, d, device=DEVICE, dtype=dtype)
    gamma = torch.rand(d, device=DEVICE) + 0.5
    seed, layer = int(torch.randint(0, 2**31, ())), 4
    noise, scale = perturb(x, gamma, 0.5, stream=ProbeStream(seed, layer, 2, K), distribution=dist,
                           noise_only=True, backend=backend)
    assert torch.all(scale == 0.5)
    for k in range(K):
        nu = rng.probes((B, T, d), seed, dist, layer=layer, probe=2 + k, device=DEVICE, dtype=torch.float64)
        want = (0.5 * gamma.double() * nu).to(dtype)
        torch.testing.assert_close(noise[k * B:(k + 1) * B], want, **(_close(dist) if dtype != torch.bfloat16 else
                                                                     dict(rtol=8e-3, atol=1e-6)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
def test_a_row_offset_draws_the_rows_of_a_larger_slab(backend, dist):
    K, B, T, d = 2, 5, 3, 19
    x = torch.randn(K, B, T, d, device=DEVICE)
    gamma = torch.rand(d, device=DEVICE) + 0.5
    whole, _ = perturb(x.reshape(K * B, T, d), gamma, 0.1, stream=ProbeStream(9, 2, 0, K), distribution=dist,
                       backend=backend)
    shard, _ = perturb(x[:, 2:4].reshape(K * 2, T, d), gamma, 0.1, stream=ProbeStream(9, 2, 0, K), distribution=dist,
                       row_offset=2 * T, backend=backend)
    torch.testing.assert_close(shard.view(K, 2, T, d), whole.view(K, B, T, d)[:, 2:4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="row_offset"):
        perturb(x, gamma, 0.1, stream=ProbeStream(9, 2), row_offset=-1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
def test_perturbation_scaled_by_row_rms(backend, dist):
    x = torch.randn(4, 3, 29, device=DEVICE) * torch.rand(4, 3, 1, device=DEVICE) * 10
    gamma = torch.rand(29, device=DEVICE)
    y, s = perturb(x, gamma, 1e-2, stream=ProbeStream(3, 1, 0, 2), distribution=dist, scale_by_rms=True,
                   backend=backend)
    rms = x.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(s, 1e-2 * rms)
    nu = torch.cat([rng.probes((2, 3, 29), 3, dist, layer=1, probe=k, device=DEVICE) for k in range(2)])
    torch.testing.assert_close(y, x + s[..., None] * gamma * nu, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(perturb(x.requires_grad_(), gamma, 1e-2, stream=ProbeStream(3, 1), backend=backend)[0].sum(),
                               x)
    assert torch.all(g == 1)


def _rows_case(K, B, T, d, dtype):
    positions = torch.randint(0, T, (B,), device=DEVICE)
    probe = torch.arange(K, device=DEVICE).repeat_interleave(B)
    base = ((torch.arange(B, device=DEVICE) * T + positions) * d).repeat(K)
    keys = rng.key_table(9, 2, 0, K, DEVICE)
    a, b = (torch.randn(K * B, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    c, e = (torch.randn(B, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    scale = torch.rand(K * B, device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.1
    nu = torch.stack([rng.probes((B, T, d), 9, "rademacher", layer=2, probe=k, device=DEVICE)[
        torch.arange(B, device=DEVICE), positions] for k in range(K)]).reshape(K * B, d)
    return a, b, c, e, scale, keys, probe, base, nu


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_dot_and_its_backward_match_plain_pytorch(backend):
    K, B, T, d = 3, 2, 4, 19
    a, b, c, e, scale, keys, probe, base, nu = _rows_case(K, B, T, d, torch.float64)
    q = probe_dot(a, b, c, e, scale, keys, probe, base, "rademacher", backend=backend)
    delta = (a - b) - (c - e).repeat(K, 1)
    want = -(nu.double() * delta).sum(-1) / scale
    torch.testing.assert_close(q, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b, c, e: probe_dot(a, b, c, e, scale, keys, probe, base, "rademacher", backend=backend),
        (a, b, c, e))
    rows = probe_rows(scale, None, keys, probe, base, d, "rademacher", backend)
    torch.testing.assert_close(rows, scale[:, None] * nu.double(), rtol=0, atol=0)


def test_perturb_rejects_bad_arguments():
    x = torch.randn(3, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="num_probes=2"):
        perturb(x, torch.ones(8, device=DEVICE), 1e-3, stream=ProbeStream(0, 0, 0, 2))
    with pytest.raises(ValueError, match="gamma must have shape"):
        perturb(x, torch.ones(7, device=DEVICE), 1e-3, stream=ProbeStream(0, 0))
    with pytest.raises(ValueError, match="distribution"):
        rng.probes((3,), 0, "uniform")


@pytest.mark.parametrize("backend", available_backends())
def test_perturb_with_a_seed_tensor_draws_the_same_probes(backend):
    x, gamma = torch.randn(2 * 3, 37, device=DEVICE), torch.rand(37, device=DEVICE) + 0.5
    kwargs = dict(distribution="gaussian", backend=backend)
    want, _ = perturb(x, gamma, 1e-2, stream=ProbeStream(123457, 4, 1, 2), **kwargs)
    got, _ = perturb(x, gamma, 1e-2, stream=ProbeStream(torch.tensor(123457, device=DEVICE), 4, 1, 2), **kwargs)
    assert torch.equal(got, want)
    other, _ = perturb(x, gamma, 1e-2, stream=ProbeStream(torch.tensor(123458, device=DEVICE), 4, 1, 2), **kwargs)
    assert not torch.equal(other, want)
