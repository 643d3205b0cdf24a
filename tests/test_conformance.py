"""Drop-in conformance with ``F.rms_norm`` / ``F.layer_norm`` under every autograd pattern users write.

Cases: PyTorch's own sample inputs for both functionals (``op_db``), values and first and second
derivatives in fp64, fp32 and bf16; gradcheck / gradgradcheck with batched, forward-mode and
forward-over-reverse checks; gradient outputs and inputs of every layout (expanded from ``sum`` /
``mean``, transposed, sliced, zero-size); ``torch.func`` transforms; the registered ops' vmap rules;
the Hessian of a patched tiny Llama's loss in its norm weights. Every backend reachable here runs
them: ``torch``, ``cpu`` (the compiled extension), ``triton`` (interpreter) and ``cuda-emu`` (the CUDA
kernels on the CPU emulation).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, available_backends
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import ofa_kernels
from ofa_kernels.native import norm as native_norm
from ofa_kernels.ops import dispatch
from ofa_kernels.ops import norm as ops
from ofa_kernels.ops import norm_library

BACKENDS = available_backends()
EMULATED = DEVICE.type == "cpu" and "cpu" in BACKENDS and shutil.which("g++") is not None
ALL = BACKENDS + ["cuda-emu"] * EMULATED


@pytest.fixture(params=ALL)
def backend(request, monkeypatch):
    """A backend name for the ops; "cuda-emu" runs the CUDA kernels through the compiled backend's wrappers."""
    if request.param == "cuda-emu":
        monkeypatch.setattr(native_norm, "_LOADED", [request.getfixturevalue("emulated")])
        return "cpu"
    return request.param


# ------------------------------------------------------------------------- PyTorch's sample inputs


OP_DB_MISSING = None


def _op_db_samples():
    """(id, op name, sample) for PyTorch's samples of both functionals; [] where the installed torch cannot
    give them (``OP_DB_MISSING`` says why; CI installs what they need: the ``test`` extra)."""
    global OP_DB_MISSING
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except Exception as exc:  # depends on the installed torch (and expecttest, which it imports)
        OP_DB_MISSING = f"torch.testing._internal's op_db does not import here: {exc}"
        return []
    out = []
    for info in op_db:
        if info.name in ("nn.functional.rms_norm", "nn.functional.layer_norm"):
            for i, sample in enumerate(info.sample_inputs("cpu", torch.float64, requires_grad=False)):
                out.append((f"{info.name.split('.')[-1]}-{i}", info.name, sample))
    return out


SAMPLES = _op_db_samples()


def test_op_db_supplies_samples_of_both_functionals():
    if OP_DB_MISSING:
        pytest.skip(OP_DB_MISSING)
    names = {name for _, name, _ in SAMPLES}
    assert names == {"nn.functional.rms_norm", "nn.functional.layer_norm"} and len(SAMPLES) >= 8


def _bind(name, sample, dtype):
    """(x, weight, bias, ours(x, w, b, backend), theirs(x, w, b)) for one op_db sample, in ``dtype``."""
    args, kwargs = list(sample.args), dict(sample.kwargs)
    shape = tuple(args.pop(0))
    rms = name.endswith("rms_norm")
    weight = args.pop(0) if args else kwargs.pop("weight", None)
    bias = None if rms else (args.pop(0) if args else kwargs.pop("bias", None))
    eps = args.pop(0) if args else kwargs.pop("eps", None)
    assert not args and not kwargs, f"unhandled sample arguments {args} {kwargs}"
    x = sample.input.detach().to(DEVICE, dtype)
    weight, bias = (None if t is None else t.detach().to(DEVICE, dtype) for t in (weight, bias))
    if rms:
        eps_ours = torch.finfo(dtype).eps if eps is None else eps  # F.rms_norm's default

        def ours(x, w, b, backend):
            return ofa_kernels.rms_norm(x, w, eps_ours, normalized_shape=shape, backend=backend)

        def theirs(x, w, b):
            return F.rms_norm(x, shape, w, eps_ours)
    else:
        eps_ours = 1e-5 if eps is None else eps

        def ours(x, w, b, backend):
            return ofa_kernels.layer_norm(x, w, b, eps_ours, normalized_shape=shape, backend=backend)

        def theirs(x, w, b):
            return F.layer_norm(x, shape, w, b, eps_ours)
    return x, weight, bias, ours, theirs


def _stages(fn, x, w, b, dy, probe_seed):
    """Value, first derivatives (x, w, b) and second derivatives (x, w, b, dy) of ``fn`` for cotangent dy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    dy = dy.detach().clone().requires_grad_()
    y = fn(*leaves)
    diff = [t for t in leaves if t is not None]
    firsts = torch.autograd.grad(y, diff, dy, create_graph=True)
    gen = torch.Generator().manual_seed(probe_seed)
    probe = sum((g * torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g)).sum() for g in firsts)
    seconds = torch.autograd.grad(probe, [*diff, dy], materialize_grads=True, allow_unused=True)
    return [y.detach(), *(g.detach() for g in firsts), *(g.detach() for g in seconds)]


def _within(got, low, exact, floor):
    """``got`` as close to the exact (fp64) value as PyTorch's own result ``low`` in the same dtype, twice
    its error plus ``floor`` times the value's scale."""
    assert got.dtype == low.dtype and got.shape == low.shape
    if not got.numel():
        return
    err = (got.double() - exact).abs().max().item()
    theirs = (low.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    assert err <= 2 * theirs + floor * scale, f"error {err:.3g}, PyTorch's own {theirs:.3g}, scale {scale:.3g}"


FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("case", SAMPLES, ids=[c[0] for c in SAMPLES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_op_db_samples_match_pytorch_in_values_and_two_derivatives(backend, case, dtype):
    _, name, sample = case
    x, w, b, ours, theirs = _bind(name, sample, dtype)
    dy = torch.randn(x.shape, dtype=dtype, device=DEVICE)
    got = _stages(lambda *t: ours(*t, backend), x, w, b, dy, 1)
    low = _stages(theirs, x, w, b, dy, 1)
    if dtype == torch.float64:
        for g, t in zip(got, low, strict=True):
            torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-10)
        return
    exact = _stages(theirs, *(None if t is None else t.double() for t in (x, w, b)), dy.double(), 1)
    for g, t, e in zip(got, low, exact, strict=True):
        _within(g, t, e, FLOOR[dtype])


@pytest.mark.parametrize("case", SAMPLES, ids=[c[0] for c in SAMPLES])
def test_op_db_samples_pass_gradcheck_and_gradgradcheck_in_every_mode(backend, case):
    """Reverse, forward (jvp), batched (vmap over the backward and over jvp) and forward-over-reverse."""
    _, name, sample = case
    x, w, b, ours, _ = _bind(name, sample, torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    has_w, has_b = w is not None, b is not None

    def fn(*args):
        it = iter(args)
        xx = next(it)
        return ours(xx, next(it) if has_w else None, next(it) if has_b else None, backend)

    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, check_forward_ad=True,
                                    check_backward_ad=True, check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True, check_fwd_over_rev=True,
                                        check_rev_over_rev=True)


# --------------------------------------------------------------------------- layouts of every input


def _dense(shape):
    return torch.randn(shape, dtype=torch.float64, device=DEVICE)


M, N = 5, 9
LAYOUTS = {  # name -> a [M, N] tensor in that layout
    "dense": lambda: _dense((M, N)),
    "expanded": lambda: _dense(()).expand(M, N),            # y.sum()'s gradient: every stride 0
    "expanded-rows": lambda: _dense((1, N)).expand(M, N),   # row stride 0
    "transposed": lambda: _dense((N, M)).t(),
    "every-other-column": lambda: _dense((M, 2 * N))[:, ::2],
}


def _reference(kind):
    if kind == "rms":
        return lambda x, w, b: F.rms_norm(x, (N,), w, 1e-6)
    return lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5)


def _fused(kind, backend):
    if kind == "rms":
        return lambda x, w, b: ofa_kernels.rms_norm(x, w, 1e-6, backend=backend)
    return lambda x, w, b: ofa_kernels.layer_norm(x, w, b, 1e-5, backend=backend)


def _second_order(fn, x, w, b, dy, cot):
    """(y, first derivatives, the VJP of the first derivatives with cotangents ``cot`` for dx and random ones
    for dw, db): the double backward. ``b`` may be None."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves, *([None] * (3 - len(leaves))))
    firsts = torch.autograd.grad(y, leaves, dy, create_graph=True)
    cots = [cot] + [torch.randn(N, dtype=x.dtype, device=DEVICE) for _ in firsts[1:]]
    seconds = torch.autograd.grad(firsts, leaves, cots, allow_unused=True, materialize_grads=True)
    return [y.detach(), *firsts, *seconds]


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_of_every_layout_reach_every_stage(backend, kind, layout):
    """The upstream gradient, the double backward's cotangent and x itself in each layout. An x expanded
    from one scalar has constant rows, where LayerNorm's statistics are degenerate (rstd = 1/sqrt(eps)
    amplifies rounding: 3e-10 relative between two exact fp64 formulas); LayerNorm's x takes the
    row-expanded layout there (RMSNorm's keeps the scalar one), dy and the cotangent keep the all-zero strides of ``y.sum()``'s gradient."""
    dy, cot = LAYOUTS[layout](), LAYOUTS[layout]()
    x = LAYOUTS["expanded-rows" if layout == "expanded" and kind == "layer" else layout]()
    w, b = torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5, None if kind == "rms" else _dense((N,))
    torch.manual_seed(0)
    got_all = _second_order(_fused(kind, backend), x, w, b, dy, cot)
    torch.manual_seed(0)
    for got, want in zip(got_all, _second_order(_reference(kind), x, w, b, dy, cot), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_the_everyday_double_backward_pattern(backend, kind, reduce):
    """``grad(y.sum(), x, create_graph=True)`` then a gradient of that in the weight (the issue's crash)."""
    x = _dense((2, N)).requires_grad_()
    w = (torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    probe = _dense((2, N))
    results = []
    for fn in (_fused(kind, backend), _reference(kind)):
        y = fn(x, w, None)
        gx, = torch.autograd.grad(getattr(y, reduce)(), x, create_graph=True)
        results.append((gx, *torch.autograd.grad((gx * probe).sum(), [x, w])))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("param_layout", ["expanded", "every-other", "dense"])
def test_weights_and_bias_of_any_layout(backend, kind, param_layout):
    make = {"expanded": lambda: (torch.rand((), dtype=torch.float64, device=DEVICE) + 0.5).expand(N),
            "every-other": lambda: (torch.rand(2 * N, dtype=torch.float64, device=DEVICE) + 0.5)[::2],
            "dense": lambda: torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5}[param_layout]
    x = _dense((3, 4, N)).permute(1, 0, 2)  # non-collapsible leading dims: a copy into rows
    w, b = make(), make() if kind == "layer" else None
    dy = _dense((4, 3, N))
    cot = _dense((4, 3, N))

    def stages(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
        y = fn(*leaves, *([None] * (3 - len(leaves))))
        firsts = torch.autograd.grad(y, leaves, dy, create_graph=True)
        return [y, *firsts, *torch.autograd.grad(firsts[0], leaves, cot, allow_unused=True, materialize_grads=True)]
    for got, want in zip(stages(_fused(kind, backend)), stages(_reference(kind)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("shape", [(0, N), (3, 0), (2, 0, N)], ids=["no-rows", "zero-width", "empty-middle"])
def test_zero_size_inputs_work_in_every_stage(backend, kind, shape):
    n = shape[-1]
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.rand(n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = ((lambda: ofa_kernels.rms_norm(x, w, 1e-6, backend=backend)) if kind == "rms" else
          (lambda: ofa_kernels.layer_norm(x, w, b, 1e-5, backend=backend)))
    y = fn()
    assert y.shape == x.shape
    gx, gw = torch.autograd.grad(y.sum(), [x, w], create_graph=True)
    assert gx.shape == x.shape and gw.shape == w.shape and not gw.abs().sum()
    hx, = torch.autograd.grad((gx.sum() + gw.sum()), [x], allow_unused=True, materialize_grads=True)
    assert hx.shape == x.shape


@pytest.mark.parametrize("shape,dims", [((3, 4, 6), (4, 6)), ((2, 3, 2, 5), (3, 2, 5)), ((4, 6), (4, 6))],
                         ids=["2-dims", "3-dims", "all-dims"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_normalized_shape_of_several_trailing_dims(backend, kind, shape, dims):
    x = _dense(shape)
    w = torch.rand(dims, dtype=torch.float64, device=DEVICE) + 0.5
    b = _dense(dims) if kind == "layer" else None
    if kind == "rms":
        ours = lambda x, w, b: ofa_kernels.rms_norm(x, w, 1e-6, normalized_shape=dims, backend=backend)  # noqa: E731
        ref = lambda x, w, b: F.rms_norm(x, dims, w, 1e-6)  # noqa: E731
    else:
        ours = lambda x, w, b: ofa_kernels.layer_norm(x, w, b, 1e-5, normalized_shape=dims, backend=backend)  # noqa: E731
        ref = lambda x, w, b: F.layer_norm(x, dims, w, b, 1e-5)  # noqa: E731
    dy = _dense(shape)
    for got, want in zip(_stages(ours, x, w, b, dy, 3), _stages(ref, x, w, b, dy, 3), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the weight's shape alone says which dims are normalised
    inferred = (ofa_kernels.rms_norm(x, w, 1e-6, backend=backend) if kind == "rms" else
                ofa_kernels.layer_norm(x, w, b, 1e-5, backend=backend))
    torch.testing.assert_close(inferred, ref(x, w, b), rtol=1e-10, atol=1e-10)


def test_modules_and_patch_model_take_norms_over_several_dims():
    from torch import nn

    model = nn.Sequential(nn.LayerNorm((4, 6)), nn.RMSNorm((4, 6), eps=1e-6), nn.Linear(6, 6))
    for p in model.parameters():
        p.data.uniform_(0.5, 1.5)
    model.double().to(DEVICE)
    x = _dense((3, 4, 6))
    want = model(x)
    assert ofa_kernels.patch_model(model) == ["0", "1"]
    assert isinstance(model[0], ofa_kernels.FusedLayerNorm) and isinstance(model[1], ofa_kernels.FusedRMSNorm)
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 7])
def test_width_one_layer_norm_gradients_are_exactly_zero(backend, rows):
    """A width-1 LayerNorm outputs its bias: dx and dW are exactly 0 (PyTorch's 0), db is sum(dy)."""
    x = torch.randn(rows, 1, dtype=torch.float32, device=DEVICE, requires_grad=True)
    w = torch.randn(1, device=DEVICE, requires_grad=True)
    b = torch.randn(1, device=DEVICE, requires_grad=True)
    dy = torch.randn(rows, 1, device=DEVICE)
    y = ofa_kernels.layer_norm(x, w, b, 1e-5, backend=backend)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], dy)
    assert torch.equal(y.detach(), b.detach().expand(rows, 1))
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))
    torch.testing.assert_close(db, dy.sum(0))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_third_derivatives_under_saved_tensor_hooks(backend, kind):
    """The gradient of an HVP inside ``save_on_cpu`` (activation offloading): torch.func refuses saved-tensor
    hooks, so plain autograd must carry the third order there."""
    x, v = _dense((4, N)), _dense((4, N))
    w = (torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    results = []
    for fn in (_fused(kind, backend), _reference(kind)):
        xx = x.clone().requires_grad_()
        with torch.autograd.graph.save_on_cpu():
            gx, = torch.autograd.grad((fn(xx, w, None) * v).sum().sin(), xx, create_graph=True)
            hvp, = torch.autograd.grad((gx * v).sum(), xx, create_graph=True)
            results.append(torch.autograd.grad(hvp.pow(2).sum(), w))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------ torch.func


def _func_cases(f, x, w, b, v):
    """name -> a function of the norm ``f(x, w, b)`` under one torch.func pattern."""
    def loss(x, w, b):
        return (f(x, w, b) * v).sum().sin()
    e = torch.eye(w.numel(), dtype=w.dtype, device=w.device)[:3]
    return {
        "grad": lambda: grad(loss, argnums=(0, 1, 2))(x, w, b),
        "vjp": lambda: vjp(lambda x, w: f(x, w, b), x, w)[1](v),
        "jvp": lambda: jvp(f, (x, w, b), (v, w * 0.3, b * 0.2)),
        "jacrev": lambda: jacrev(lambda x, w: f(x, w, b), argnums=(0, 1))(x[0], w),
        "jacfwd": lambda: jacfwd(lambda x, w: f(x, w, b), argnums=(0, 1))(x[0], w),
        "hessian-w": lambda: hessian(lambda w: loss(x, w, b))(w),
        "hessian-x": lambda: hessian(lambda x: (f(x, w, b) * v[0, :2]).sum().sin())(x[0, :2]),
        "vmap": lambda: vmap(lambda x: f(x, w, b))(x),
        "vmap-over-weights": lambda: vmap(lambda w, b: f(x[0], w, b))(torch.stack([w, 2 * w]), torch.stack([b, b])),
        "per-sample-grads": lambda: vmap(grad(lambda w, x: (f(x, w, b) * v[0]).sum().sin()), in_dims=(None, 0))(w, x),
        "vmap-of-hvp": lambda: vmap(lambda t: jvp(grad(lambda w: loss(x, w, b)), (w,), (t,))[1])(e),
        "jacfwd-of-jacfwd": lambda: jacfwd(jacfwd(lambda w: (f(x[0, :2], w, b) * v[0, :2]).sum()))(w),
        "third-order": lambda: grad(lambda w: grad(lambda w2: grad(lambda x: loss(x, w2, b))(x).pow(2).sum())(w)
                                    .sum())(w),
    }


FUNC_CASES = list(_func_cases(None, *(torch.zeros(1, 1),) * 4))


@pytest.mark.parametrize("case", FUNC_CASES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_torch_func_transforms_match_pytorchs_own_norm(backend, kind, case):
    x, v = _dense((3, 5, 7)), _dense((3, 5, 7))
    w, b = torch.rand(7, dtype=torch.float64, device=DEVICE) + 0.5, _dense((7,))
    if kind == "rms":
        ours = lambda x, w, b: ofa_kernels.rms_norm(x, w, 1e-6, backend=backend)  # noqa: E731
        ref = lambda x, w, b: F.rms_norm(x, (7,), w, 1e-6)  # noqa: E731
    else:
        ours = lambda x, w, b: ofa_kernels.layer_norm(x, w, b, 1e-5, backend=backend)  # noqa: E731
        ref = lambda x, w, b: F.layer_norm(x, (7,), w, b, 1e-5)  # noqa: E731
    got = _func_cases(ours, x, w, b, v)[case]()
    want = _func_cases(ref, x, w, b, v)[case]()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


class _Counting:
    """A backend module wrapper that records the row count of every stage call."""

    def __init__(self, module, calls):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def call(*args, **kwargs):
            self._calls.append((name, tuple(args[1].shape) if name != "norm_fwd" else tuple(args[0].shape)))
            return fn(*args, **kwargs)
        return call


@pytest.fixture
def stage_calls(monkeypatch):
    calls = []
    resolve = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda *a, **k: _Counting(resolve(*a, **k), calls))
    return calls


@pytest.mark.parametrize("entry", ["eager", "op"])
def test_vmap_folds_the_batch_into_one_fused_call(stage_calls, entry, monkeypatch):
    """vmap of the forward and per-sample gradients run each fused stage once on [B*M, N], no loop."""
    monkeypatch.setattr(ops, "EAGER_FAST_PATH", entry == "eager")
    B, rows = 6, 4
    x, w = _dense((B, rows, N)), torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5
    vmap(lambda x: ofa_kernels.rms_norm(x, w))(x)
    assert stage_calls == [("norm_fwd", (B * rows, N))]
    stage_calls.clear()
    vmap(grad(lambda w, x: ofa_kernels.rms_norm(x, w).pow(3).sum(), argnums=(0, 1)), in_dims=(None, 0))(w, x)
    assert [c for c in stage_calls if c[0] == "norm_fwd"] == [("norm_fwd", (B * rows, N))]
    assert ("norm_bwd", (B * rows, N)) in stage_calls and len(stage_calls) == 2  # dx fused; dw per sample: plain


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_registered_ops_have_batching_rules(kind):
    """torch.vmap of each registered op equals the op on each batch entry (fold and plain-twin paths)."""
    is_rms, B = kind == "rms", 3
    x, dy, a = _dense((B, 4, N)), _dense((B, 4, N)), _dense((B, 4, N))
    w, b = torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5, _dense((N,))
    ws = torch.rand(B, N, dtype=torch.float64, device=DEVICE) + 0.5
    bias = None if is_rms else b
    fwd = lambda x, w: norm_library.norm_fwd(x, w, bias, 1e-5, 0.0, is_rms, "none", "auto")  # noqa: E731
    for in_dims, args in (((0, None), (x, w)), ((0, 0), (x, ws)), ((None, 0), (x[0], ws))):
        got = vmap(fwd, in_dims=in_dims)(*args)
        want = [torch.stack(t) for t in zip(*(fwd(*(arg if d is None else arg[i] for arg, d in zip(args, in_dims, strict=True)))
                                             for i in range(B)), strict=True)]
        for g, t in zip(got, want, strict=True):
            torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12)
    stats = [fwd(x[i], w) for i in range(B)]
    mean, rstd = (torch.stack([s[k] for s in stats]) for k in (1, 2))

    def bwd(dy, x, mean, rstd):
        return norm_library.norm_bwd(dy, x, w, mean, rstd, 0.0, is_rms, "none", True, True, not is_rms, "auto")

    def bwd_bwd(dy, x, mean, rstd, a):
        return norm_library.norm_bwd_bwd(dy, x, w, mean, rstd, a, b, None, 0.0, is_rms, True, True, True, "auto")
    for fn, args in ((bwd, (dy, x, mean, rstd)), (bwd_bwd, (dy, x, mean, rstd, a))):
        got = vmap(fn)(*args)
        want = [torch.stack(t) for t in zip(*(fn(*(arg[i] for arg in args)) for i in range(B)), strict=True)]
        for g, t in zip(got, want, strict=True):
            torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_registered_ops_pass_opcheck_on_pytorchs_sample_shapes(kind):
    is_rms = kind == "rms"
    for _, name, sample in SAMPLES:
        if name.endswith("rms_norm") != is_rms:
            continue
        x, w, b, _, _ = _bind(name, sample, torch.float64)
        width = math.prod(sample.args[0])
        rows = x.reshape(-1, width).requires_grad_()
        w, b = (None if t is None else t.reshape(width) for t in (w, b))
        torch.library.opcheck(norm_library.norm_fwd, (rows, w, b, 1e-5, 0.0, is_rms, "llama" if is_rms else "none", "auto"))
        _, mean, rstd = norm_library.norm_fwd(rows.detach(), w, b, 1e-5, 0.0, is_rms, "none", "auto")
        dy = torch.randn_like(rows)
        torch.library.opcheck(norm_library.norm_bwd, (dy, rows.detach(), w, mean, rstd, 0.0, is_rms, "none", True, True,
                                              not is_rms, "auto"))


# ------------------------------------------------------------------- a whole model under torch.func


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=12, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, attn_implementation="eager")  # SDPA: no jvp
    model = LlamaForCausalLM(cfg).double().to(DEVICE).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.6, 1.4)
    return model


@pytest.mark.slow
def test_hessian_of_a_patched_tiny_llama_loss_in_its_norm_weights(backend, monkeypatch):
    """torch.func.hessian of the label-word CE in every norm weight: patched equals unpatched.

    HF's LlamaRMSNorm computes in fp32 even for an fp64 model (``hidden_states.to(torch.float32)``), so
    the unpatched Hessian is fp32-accurate (measured: 2e-7 relative where ours, in fp64, differs): the
    bound is fp32's, 2e-6 relative."""
    monkeypatch.setenv("OFA_BACKEND", backend)
    model = _tiny_llama()
    ids = torch.randint(0, 40, (2, 5), device=DEVICE)
    label = torch.tensor([3, 7], device=DEVICE)
    names = [n for n, _ in model.named_parameters() if "norm" in n]

    def hessian_of(m):
        params = dict(m.named_parameters())

        def loss(*norm_weights):
            logits = torch.func.functional_call(m, {**params, **dict(zip(names, norm_weights, strict=True))}, (ids,)).logits
            return F.cross_entropy(logits[:, -1], label)
        return hessian(loss, argnums=tuple(range(len(names))))(*(params[n].detach() for n in names))

    want = hessian_of(model)
    assert len(ofa_kernels.patch_model(model)) == len(names) == 5
    got = hessian_of(model)
    for row_got, row_want in zip(got, want, strict=True):
        for g, t in zip(row_got, row_want, strict=True):
            torch.testing.assert_close(g, t, rtol=2e-6, atol=1e-9)
