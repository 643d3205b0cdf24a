"""torch.compile traces models using the ops without graph breaks (CPU inductor) and matches eager."""

import torch
from conftest import DEVICE

import ofa_kernels


def test_compiled_function_matches_eager_without_graph_breaks():
    def f(x, w, b):
        h = ofa_kernels.rms_norm(x, w, 1e-6) * 2.0
        return ofa_kernels.layer_norm(h, w, b, 1e-5).square().sum()

    x = torch.randn(6, 5, 40, device=DEVICE, requires_grad=True)
    w = (torch.rand(40, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(40, device=DEVICE).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)  # fullgraph: a graph break is an error
    want = f(x, w, b)
    got = compiled(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(got, [x, w, b]), torch.autograd.grad(want, [x, w, b]), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
