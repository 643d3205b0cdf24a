"""The norm ops against the float64 reference, on every available backend and kernel path."""

from __future__ import annotations

import gc
import random

import pytest
import torch
from conftest import DEVICE, available_backends

import ofa_kernels
from ofa_kernels.precision import norm_spec
from ofa_kernels.reference import layer_norm_ref, rms_norm_ref

BACKENDS = available_backends()
# (backend, path): Triton runs its register path and, with a tiny chunk cap, its looped wide-row path.
PATHS = [(b, "registers") for b in BACKENDS] + [("triton", "looped")] * ("triton" in BACKENDS)


def _use_path(name, path, monkeypatch):
    if path == "looped":
        import ofa_kernels.triton.norm as tnorm

        monkeypatch.setattr(tnorm, "MAX_BLOCK_N", 16)
    return name


@pytest.fixture(params=PATHS, ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request, monkeypatch):
    return _use_path(*request.param, monkeypatch)


SHAPES = [(9, 1), (33, 7), (6, 129), (4, 3, 1000)]
# The looped path (16-column chunks) runs where it loops: width 129 (9 chunks); the interpreter
# makes every chunk cost milliseconds, so the other widths run on the register paths only.
LOW_PRECISION_CASES = [(b, p, s) for b, p in PATHS for s in SHAPES if p == "registers" or s == (6, 129)]


@pytest.fixture(params=["eager", "op"])
def entry(request, monkeypatch):
    """Eager calls use autograd.Functions; "op" forces the registered torch.library ops."""
    from ofa_kernels.ops import norm

    monkeypatch.setattr(norm, "EAGER_FAST_PATH", request.param == "eager")
    return request.param


def make_case(kind, shape, x_dtype, w_dtype, *, affine=True, offset=0.0, cast_mode="llama"):
    """Inputs and two callables: ours(x, w, b, backend) and ref(x, w, b, upcast)."""
    n = shape[-1]
    x = torch.randn(shape, dtype=x_dtype, device=DEVICE) * 2 + 0.5
    w = (torch.rand(n, device=DEVICE) + 0.5).to(w_dtype) if affine else None
    b = (torch.randn(n, device=DEVICE) * 0.1).to(w_dtype) if affine and kind == "layer" else None
    if kind == "rms":
        def ours(x, w, b, backend):
            return ofa_kernels.rms_norm(x, w, 1e-6, offset=offset, cast_mode=cast_mode, backend=backend)

        def ref(x, w, b, upcast):
            return rms_norm_ref(x, w, 1e-6, offset=offset, cast_mode=cast_mode, upcast=upcast)
    else:
        def ours(x, w, b, backend):
            return ofa_kernels.layer_norm(x, w, b, 1e-5, backend=backend)

        def ref(x, w, b, upcast):
            return layer_norm_ref(x, w, b, 1e-5, upcast=upcast)
    return x, w, b, ours, ref


VARIANTS = [
    pytest.param("rms", {"cast_mode": "llama"}, id="rms-llama"),
    pytest.param("rms", {"cast_mode": "gemma", "offset": 1.0}, id="rms-gemma"),
    pytest.param("rms", {"cast_mode": "none", "offset": 0.25}, id="rms-none"),
    pytest.param("rms", {"affine": False}, id="rms-noweight"),
    pytest.param("layer", {}, id="layer"),
    pytest.param("layer", {"affine": False}, id="layer-noaffine"),
]


def _grads(out, inputs, dy):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], dy)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------- fp64 exact checks


@pytest.mark.parametrize("kind,opts", VARIANTS)
def test_gradcheck_and_gradgradcheck_fp64(backend, entry, kind, opts):
    x, w, b, ours, _ = make_case(kind, (3, 11), torch.float64, torch.float64, **opts)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return ours(xx, ww, bb, backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("kind,opts", VARIANTS)
def test_fp64_values_and_second_derivatives_match_reference(backend, entry, kind, opts):
    """Forward, gradient and every second derivative (x, w, b, dy) agree with autograd of the reference."""
    x, w, b, ours, ref = make_case(kind, (5, 2, 23), torch.float64, torch.float64, **opts)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    dy = torch.randn(x.shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    results = []
    for f in (lambda: ours(x, w, b, backend), lambda: ref(x, w, b, False)):
        y = f()
        g = torch.autograd.grad(y, params, dy, create_graph=True)
        probe = sum((gi * torch.cos(torch.arange(gi.numel(), device=DEVICE).view_as(gi) * 0.7)).sum() for gi in g)
        results.append((y, *g, *torch.autograd.grad(probe, [*params, dy], materialize_grads=True)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------- low precision vs fp64


DTYPES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16x-fp32w"),
]


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPES)
@pytest.mark.parametrize("kind,opts", VARIANTS)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=lambda c: f"{c[0]}-{c[1]}-" + "x".join(map(str, c[2])))
def test_low_precision_within_twice_pytorchs_own_error(case, kind, opts, x_dtype, w_dtype, monkeypatch):
    """Our error against the fp64 truth is at most 2x PyTorch's own error in the same dtypes
    (the reference run in those dtypes, as HF runs it) plus a small atol; for y, dx, dw and db."""
    backend, path, shape = case
    _use_path(backend, path, monkeypatch)
    x, w, b, ours, ref = make_case(kind, shape, x_dtype, w_dtype, **opts)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = ours(x, w, b, backend)
    y_low = ref(x, w, b, False)
    params64 = [t.detach().double().requires_grad_() for t in params]  # fp64 leaves: grads stay fp64
    x64, w64, b64 = params64[0], *(params64[1:] + [None, None])[:2]
    y_true = ref(x64, w64, b64 if b is not None else None, False)
    assert y.dtype == y_low.dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    got = [y, *_grads(y, params, dy)]
    low = [y_low, *_grads(y_low, params, dy)]
    true = [y_true, *_grads(y_true, params64, dy.double())]
    rows = x.numel() // x.shape[-1]
    for name, g, lo, tr in zip(["y", "dx", "dw", "db"][:len(got)], got, low, true, strict=True):
        atol = 1e-5 if x_dtype == torch.float32 else 2e-3
        if name in ("dw", "db"):  # sums over rows: scale with sqrt(rows), as the error grows
            atol *= rows**0.5
        assert g.dtype == lo.dtype, name
        assert _err(g, tr) <= 2 * _err(lo, tr) + atol * (1 + tr.abs().max().item()), name


def test_llama_mode_is_bit_compatible_with_hf_on_the_torch_backend():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(96, eps=1e-5).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(96) + 0.5)
    x = torch.randn(4, 7, 96, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(ofa_kernels.rms_norm(x, hf.weight, 1e-5, backend="torch"), hf(x))


@pytest.mark.parametrize("kind,opts", VARIANTS[::4])
def test_second_derivatives_in_fp32_match_fp64(backend, kind, opts):
    x, w, b, ours, ref = make_case(kind, (6, 2, 45), torch.float32, torch.float32, **opts)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    dy = torch.randn(x.shape, device=DEVICE, requires_grad=True)

    def second(f, dyy):
        g = torch.autograd.grad(f(), params, dyy, create_graph=True)
        return torch.autograd.grad(sum(gi.square().sum() for gi in g), [*params, dyy], materialize_grads=True)

    got = second(lambda: ours(x, w, b, backend), dy)
    p64 = [t.detach().double().requires_grad_() for t in params]
    dy64 = dy.detach().double().requires_grad_()
    it = iter(p64)
    x64, w64 = next(it), (next(it) if w is not None else None)
    b64 = next(it) if b is not None else None
    g = torch.autograd.grad(ref(x64, w64, b64, False), p64, dy64, create_graph=True)
    want = torch.autograd.grad(sum(gi.square().sum() for gi in g), [*p64, dy64], materialize_grads=True)
    for gg, ww in zip(got, want, strict=True):
        torch.testing.assert_close(gg.double(), ww, rtol=2e-4, atol=2e-4 * ww.abs().max().item())


# --------------------------------------------------------------------------- layouts, sizes


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_strided_rows_are_read_in_place_and_match(backend, kind, monkeypatch):
    """Rows with a row stride (a slice of a wider buffer) are read where they are, never copied, and
    give the fp64 reference; a permuted 3-D input (last-dim stride != 1) is copied and matches too."""
    base = torch.randn(10, 50, device=DEVICE)
    x = base[:, 3:40]  # row stride 50, last-dim stride 1: no copy needed
    w = torch.rand(37, device=DEVICE) + 0.5
    f = (lambda t: ofa_kernels.rms_norm(t, w, backend=backend)) if kind == "rms" else \
        (lambda t: ofa_kernels.layer_norm(t, w, None, backend=backend))
    ref = (lambda t: rms_norm_ref(t.double(), w.double())) if kind == "rms" else \
        (lambda t: layer_norm_ref(t.double(), w.double(), None))
    from ofa_kernels.ops import dispatch

    resolve, received = dispatch.resolve, []

    class Spy:  # records where the rows the backend's forward reads live
        def __init__(self, impl):
            self.impl = impl

        def __getattr__(self, name):
            return getattr(self.impl, name)

        def norm_fwd(self, rows, *args):
            received.append((rows.data_ptr(), rows.stride(0)))
            return self.impl.norm_fwd(rows, *args)

    with monkeypatch.context() as m:
        m.setattr(dispatch, "resolve", lambda *a, **k: Spy(resolve(*a, **k)))
        y = f(x)
    assert received == [(x.data_ptr(), 50)]  # the slice itself, row stride 50: not copied
    torch.testing.assert_close(y.double(), ref(x), rtol=1e-5, atol=1e-5)
    xt = torch.randn(37, 4, 6, device=DEVICE).permute(1, 2, 0)  # last-dim stride != 1: copied
    torch.testing.assert_close(f(xt).double(), ref(xt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_width_past_the_register_path(backend):
    """70000 columns: wider than the default MAX_BLOCK_N (16384), so Triton takes its looped path."""
    x = torch.randn(3, 70000, device=DEVICE, requires_grad=True)
    w = (torch.rand(70000, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(70000, device=DEVICE).requires_grad_()
    cases = [
        (ofa_kernels.rms_norm(x, w, backend=backend), rms_norm_ref(x, w, upcast=True), [x, w]),
        (ofa_kernels.layer_norm(x, w, b, backend=backend), layer_norm_ref(x, w, b, upcast=True), [x, w, b]),
    ]
    for y, yr, params in cases:
        dy = torch.randn_like(y)
        got = [y, *torch.autograd.grad(y, params, dy)]
        want = [yr, *torch.autograd.grad(yr, params, dy.double())]
        for g, t in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), t.double(), rtol=1e-4, atol=1e-4 * (1 + t.abs().max().item()))


@pytest.mark.parametrize("width", [16384, 32768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_wide_rows_run_every_stage(backend, dtype, width):
    """Widths whose register-path plans are widest (the CUDA kernels' 1024-thread CTAs, which their registers
    do not always allow: the plan falls back): forward, backward and double backward (an HVP) of both norms
    against the plain-PyTorch backend on the same inputs."""
    x = torch.randn(2, width, device=DEVICE).to(dtype)
    w, b = torch.rand(width, device=DEVICE) + 0.5, torch.randn(width, device=DEVICE)
    v = torch.randn(2, width, device=DEVICE).to(dtype)

    def stages(name, kind):
        xs, ws, bs = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = (ofa_kernels.rms_norm(xs, ws, backend=name) if kind == "rms"
             else ofa_kernels.layer_norm(xs, ws, bs, backend=name))
        params = (xs, ws) if kind == "rms" else (xs, ws, bs)
        grads = torch.autograd.grad((y.float() * v.float()).sum(), params, create_graph=True)
        hvp = torch.autograd.grad((grads[0].float() * v.float()).sum(), (xs, ws))
        return [y, *grads, *hvp]

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for kind in ("rms", "layer"):
        for got, want in zip(stages(backend, kind), stages("torch", kind), strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * (1 + want.abs().max().item()))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])  # measured: 3e-3, 3e-4
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_low_precision_double_backward_matches_fp32(backend, kind, dtype, tol):
    """The HVP the "hvp" estimator runs on bf16/fp16 models (grad of <grad_x, v> w.r.t. x and weight)
    against the same computation on the fp32 values; tolerance relative to the largest entry."""
    x16 = torch.randn(6, 37, device=DEVICE).to(dtype)
    w16 = (torch.rand(37, device=DEVICE) + 0.5).to(dtype)
    c = torch.randn(6, 37, device=DEVICE).to(dtype)
    v = torch.randn(6, 37, device=DEVICE).to(dtype)

    def hvp(x, w, fn_backend):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = ofa_kernels.rms_norm(x, w, backend=fn_backend) if kind == "rms" else \
            ofa_kernels.layer_norm(x, w, None, backend=fn_backend)
        (gx,) = torch.autograd.grad((y * c.to(y.dtype)).sum(), x, create_graph=True)
        return torch.autograd.grad((gx * v.to(gx.dtype)).sum(), [x, w])

    got = hvp(x16, w16, backend)
    want = hvp(x16.float(), w16.float(), "torch")
    for g, r in zip(got, want, strict=True):
        assert g.dtype == dtype
        err = (g.float() - r).abs().max() / r.abs().max()
        assert err < tol, (float(err), tol)


@pytest.mark.parametrize("shape", [(0, 3, 16), (0, 16)])  # (0, 16): the expanded gradient of .sum() has zero strides
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_zero_rows_give_empty_outputs_and_gradients(backend, shape, kind):
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    y = ofa_kernels.rms_norm(x, w, backend=backend) if kind == "rms" else ofa_kernels.layer_norm(x, w, None,
                                                                                                 backend=backend)
    assert y.shape == shape
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_nan_and_inf_propagate_like_pytorch(backend, kind):
    x = torch.randn(4, 33, device=DEVICE)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    w = torch.rand(33, device=DEVICE)
    if kind == "rms":
        y, r = ofa_kernels.rms_norm(x, w, backend=backend), rms_norm_ref(x, w)
    else:
        y, r = ofa_kernels.layer_norm(x, w, None, backend=backend), layer_norm_ref(x, w, None)
    assert torch.equal(torch.isnan(y), torch.isnan(r))
    assert torch.isfinite(y[[0, 3]]).all()


# ------------------------------------------------------------------ determinism, memory, errors


def test_weight_gradient_is_bitwise_deterministic(backend):
    x = torch.randn(37, 130, device=DEVICE)  # several row tiles per program on every path
    w = (torch.rand(130, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(130, device=DEVICE).requires_grad_()
    dy = torch.randn(37, 130, device=DEVICE)
    first = torch.autograd.grad(ofa_kernels.layer_norm(x, w, b, backend=backend), [w, b], dy)
    for _ in range(3):
        again = torch.autograd.grad(ofa_kernels.layer_norm(x, w, b, backend=backend), [w, b], dy)
        assert all(torch.equal(a, f) for a, f in zip(again, first, strict=True))


class _ShuffledPrograms:
    """Runs each Triton interpreter launch's programs in a fresh random order instead of the grid's
    order, so an order-dependent reduction shows on the CPU as it would on a GPU's concurrent programs."""

    def __init__(self, monkeypatch, seed: int):
        from triton.runtime import interpreter

        builder = type(interpreter.interpreter_builder)
        real, rng = builder.set_grid_idx, random.Random(seed)
        self.launches: list[list[int]] = []

        def set_grid_idx(b, x, y, z):
            if (x, y, z) == (0, 0, 0):  # the first program of a new launch
                self.launches.append(rng.sample(range(b.grid_dim[0]), b.grid_dim[0]))
            real(b, self.launches[-1][x], y, z)

        monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)


needs_interpreter = pytest.mark.interpreter  # deselected on a GPU run (conftest); Triton is a dependency


@needs_interpreter
def test_program_order_changes_an_order_dependent_sum():
    """The harness can fail: float atomics in program order give other bits in another order."""
    import triton
    import triton.language as tl

    @triton.jit
    def _accumulate(X, Out):
        tl.atomic_add(Out, tl.load(X + tl.program_id(0)))

    x = torch.tensor([1e8, 1.0, -1e8, 1.0, 3.0, 1e-3, -7.0, 2.5] * 4)  # sums depend on the order in fp32

    def total():
        out = torch.zeros(1)
        _accumulate[(x.numel(),)](x, out)
        return out

    sequential = total()
    with pytest.MonkeyPatch.context() as mp:
        _ShuffledPrograms(mp, 0)
        shuffled = [total() for _ in range(5)]
    assert any(not torch.equal(s, sequential) for s in shuffled)


@needs_interpreter
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_triton_weight_gradient_does_not_depend_on_program_order(kind, monkeypatch):
    """The partial-row sums and the last program's fixed-order reduction give the same bits whichever
    program finishes last (the sequential interpreter alone cannot show this)."""
    x = torch.randn(301, 130, dtype=torch.float32)  # many row tiles: a multi-program grid
    w = (torch.rand(130) + 0.5).requires_grad_()
    b = torch.randn(130).requires_grad_()
    dy = torch.randn(301, 130)

    def grads():
        if kind == "rms":
            return torch.autograd.grad(ofa_kernels.rms_norm(x, w, backend="triton"), [w], dy)
        return torch.autograd.grad(ofa_kernels.layer_norm(x, w, b, backend="triton"), [w, b], dy)

    sequential = grads()
    order = _ShuffledPrograms(monkeypatch, 1)
    for _ in range(3):
        assert all(torch.equal(a, s) for a, s in zip(grads(), sequential, strict=True))
    multi = [p for p in order.launches if len(p) > 1]
    assert multi and any(p != sorted(p) for p in multi)  # the backward ran several programs, out of order


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_repeated_calls_do_not_grow_memory(backend):
    x = torch.randn(16, 64, device=DEVICE, requires_grad=True)
    w = torch.rand(64, device=DEVICE, requires_grad=True)

    def step():
        y = ofa_kernels.rms_norm(x, w, backend=backend)
        (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        gx.sum().backward()
        x.grad = w.grad = None

    step()
    before = _live_tensors()
    alloc = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
    for _ in range(3):  # anything kept per step shows after the first: three make it plain
        step()
    assert _live_tensors() <= before
    if DEVICE.type == "cuda":
        assert torch.cuda.memory_allocated() <= alloc


@pytest.mark.parametrize("kind,opts", [VARIANTS[0], VARIANTS[1], VARIANTS[4]])
def test_third_derivatives_match_reference_and_gradcheck(backend, entry, kind, opts):
    """Third order (the gradient of an HVP): autograd through the closed-form double backward."""
    x, w, b, ours, ref = make_case(kind, (3, 7), torch.float64, torch.float64, **opts)
    dy = torch.randn(3, 7, dtype=torch.float64, device=DEVICE)
    v = torch.randn(3, 7, dtype=torch.float64, device=DEVICE)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def third(fn, *args):
        out = (fn(*args).pow(3) * dy).sum()
        g = torch.autograd.grad(out, args[:1], create_graph=True)[0]
        hv = torch.autograd.grad((g * v).sum(), args[:1], create_graph=True)[0]
        return torch.autograd.grad((hv * dy).sum(), list(args))

    def wrap(fn, upcast=None):
        return lambda *t: fn(*t, *([None] * (3 - len(t))), upcast) if upcast is not None else \
            fn(*t, *([None] * (3 - len(t))), backend)

    got = third(wrap(ours), *inputs)
    want = third(wrap(ref, True), *inputs)
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_, rtol=1e-9, atol=1e-10)

    def hvp(*args):  # differentiable HVP; gradcheck of it checks the third derivative numerically
        out = (wrap(ours)(*args).pow(3) * dy).sum()
        g = torch.autograd.grad(out, args[:1], create_graph=True)[0]
        return torch.autograd.grad((g * v).sum(), args[:1], create_graph=True)[0]

    if backend == "torch":  # the third order recomputes in PyTorch on every backend: check it once
        assert torch.autograd.gradcheck(hvp, inputs)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, w: ofa_kernels.rms_norm(x, w[:-1]), ValueError, r"weight must have shape \(16,\)"),
        (lambda x, w: ofa_kernels.rms_norm(x, w.to("meta")), ValueError, "weight is on meta"),
        (lambda x, w: ofa_kernels.rms_norm(x.long(), w), TypeError, "x must be float16"),
        (lambda x, w: ofa_kernels.rms_norm(x, w.int()), TypeError, "weight must be a floating"),
        (lambda x, w: ofa_kernels.rms_norm(x, w, normalized_shape=(8,)), ValueError, r"normalized_shape \(8,\) must equal x.s trailing dims"),
        (lambda x, w: ofa_kernels.layer_norm(x, w, None, normalized_shape=[1.5]), ValueError, "normalized_shape"),
        (lambda x, w: ofa_kernels.rms_norm(x, w, float("nan")), ValueError, "eps must be a finite"),
        (lambda x, w: ofa_kernels.layer_norm(x, w, float("inf")), TypeError, "bias must be a torch.Tensor"),
        (lambda x, w: ofa_kernels.layer_norm(x, w, None, eps=float("inf")), ValueError, "eps must be"),
        (lambda x, w: ofa_kernels.rms_norm(x, w, cast_mode="fp8"), ValueError, "cast_mode must be one of"),
        (lambda x, w: ofa_kernels.rms_norm(x, w, backend="cuda-graphs"), ValueError, "backend must be one of"),
    ],
    ids=["shape", "device", "int-x", "int-w", "normalized-shape", "normalized-shape-type", "nan-eps", "bias-type", "inf-eps", "cast", "backend"],
)
def test_bad_input_is_named_in_the_error(call, error, match):
    x = torch.randn(4, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    with pytest.raises(error, match=match):
        call(x, w)


def test_registered_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration, via torch.library.opcheck."""
    from ofa_kernels.ops import norm_library as ops

    x = torch.randn(5, 12, device=DEVICE, requires_grad=True)
    w = torch.rand(12, device=DEVICE, requires_grad=True)
    b = torch.randn(12, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.norm_fwd, (x, w, None, 1e-6, 0.0, True, "llama", "auto"))
    torch.library.opcheck(ops.norm_fwd, (x, w, b, 1e-5, 0.0, False, "none", "auto"))
    _, mean, rstd = ops.norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5, 0.0, False, "none", "auto")
    dy = torch.randn(5, 12, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.norm_bwd, (dy, x, w, mean, rstd, 0.0, False, "none", True, True, True, "auto"))
    a = torch.randn(5, 12, device=DEVICE)
    torch.library.opcheck(
        ops.norm_bwd_bwd, (dy.detach(), x.detach(), w.detach(), mean, rstd, a, None, None, 0.0, False,
                            True, True, True, "auto"),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.parametrize("in_kernel", [True, False], ids=["last-program-sums", "separate-sum"])
def test_weight_gradients_summed_in_the_kernel_or_apart_match_the_reference(in_kernel, monkeypatch):
    """Triton's dW/dB (and the double backward's d_w): summed by the backward kernel's last program, or
    by a separate sum where the partial rows are many. Both match fp64, and the ticket counter is back
    at zero after every launch (else the next call's last program would never sum)."""
    import ofa_kernels.triton.norm as tnorm

    monkeypatch.setattr(tnorm, "IN_KERNEL_REDUCE_MAX", 1 << 30 if in_kernel else -1)
    separate_sums = []
    monkeypatch.setattr(tnorm, "_reduce", lambda p, f=tnorm._reduce: separate_sums.append(1) or f(p))
    x = torch.randn(37, 130, device=DEVICE, dtype=torch.float64)  # 10 row tiles over 4 programs
    v = torch.randn_like(x)
    w = (torch.rand(130, device=DEVICE, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(130, device=DEVICE, dtype=torch.float64).requires_grad_()
    for norm, ref, params in ((lambda x: ofa_kernels.layer_norm(x, w, b, backend="triton"),
                               lambda x: layer_norm_ref(x, w, b), [w, b]),
                              (lambda x: ofa_kernels.rms_norm(x, w, backend="triton"), lambda x: rms_norm_ref(x, w), [w])):
        for _ in range(2):  # the second call reuses the counter the first one reset
            xs = x.clone().requires_grad_()
            got = torch.autograd.grad(norm(xs), params, v)
            (gx,) = torch.autograd.grad(norm(xs), [xs], v, create_graph=True)
            got_hvp = torch.autograd.grad(gx, [w], v)  # d_w of the double backward
            want = torch.autograd.grad(ref(x), params, v)
            xr = x.clone().requires_grad_()
            (rx,) = torch.autograd.grad(ref(xr), [xr], v, create_graph=True)
            want_hvp = torch.autograd.grad(rx, [w], v)
            for g, t in zip([*got, *got_hvp], [*want, *want_hvp], strict=True):
                torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-10)
            assert all(int(c.item()) == 0 for c in tnorm._counters.values())
    assert bool(separate_sums) != in_kernel


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_weight_gradients_arrive_in_the_parameters_dtype_rounded_once(backend, w_dtype, monkeypatch):
    """A backward that builds no graph returns dW/dB in the parameters' dtype: the backend's fp32 sum
    rounded once (Triton writes it so from the kernel that sums the partials, or casts a separate sum),
    bit for bit."""
    import ofa_kernels.triton.norm as tnorm

    for in_kernel in (True, False) if backend == "triton" else (None,):
        if in_kernel is not None:
            monkeypatch.setattr(tnorm, "IN_KERNEL_REDUCE_MAX", 1 << 30 if in_kernel else -1)
        _check_param_dtype_grads(backend, w_dtype)


def _check_param_dtype_grads(backend, w_dtype):
    from ofa_kernels.ops.dispatch import resolve

    x = torch.randn(9, 40, device=DEVICE) * 3  # 9 rows over 4 programs; 3 chunks on the looped path
    dy = torch.randn_like(x)
    w = (torch.rand(40, device=DEVICE) + 0.5).to(w_dtype).requires_grad_()
    b = (torch.randn(40, device=DEVICE) * 0.1).to(w_dtype).requires_grad_()
    impl = resolve(backend, x.device, "norm", 40)
    for is_rms in (True, False):
        params = [w] if is_rms else [w, b]
        y = (ofa_kernels.rms_norm(x, w, 1e-6, backend=backend) if is_rms
             else ofa_kernels.layer_norm(x, w, b, 1e-5, backend=backend))
        got = torch.autograd.grad(y, params, dy)
        spec = norm_spec(is_rms, 0.0, "llama" if is_rms else "none")
        _, mean, rstd = impl.norm_fwd(x, w, None if is_rms else b, 1e-6 if is_rms else 1e-5, spec, y.dtype)
        _, dw32, db32 = impl.norm_bwd(dy, x, w, mean, rstd, spec, (False, True, not is_rms))
        assert dw32.dtype == torch.float32
        for g, want in zip(got, [dw32, db32][:len(got)], strict=True):
            assert g.dtype == w_dtype
            assert torch.equal(g, want.to(w_dtype)), (g - want.to(w_dtype)).abs().max()
