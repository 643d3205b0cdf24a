"""RMSNorm and LayerNorm as ``torch.library`` ops with first and second derivatives.

Three ops, each differentiable by the next (the double-backward pattern of PyTorch's custom
function tutorial): ``ofa::norm_fwd`` -> ``ofa::norm_bwd`` -> ``ofa::norm_bwd_bwd``. Saved
statistics (mean, rstd) are never differentiated as constants: ``norm_bwd_bwd`` carries their
dependence on x in closed form. Every op hands its work to the backend that ``dispatch.resolve``
picks; fake implementations let ``torch.compile`` trace models that use them without graph breaks.

Third and higher derivatives (the gradient of an HVP-based sharpness with respect to the norm
weights needs them) go through the plain double backward with mean and rstd rebuilt as functions
of x (``norm_vmap``'s plain twins): correct to any order, not fused. Forward mode is fused: the
forward stage's JVP is the double backward's ``d_dy``, the backward stage's is the double backward
applied to the tangents (see "forward-mode rules" below).

Eager calls skip the op boundary: the same three stages as ``torch.autograd.Function``s (in the
``setup_context`` style, with ``jvp`` and ``vmap`` staticmethods, so torch.func transforms them)
that call the backend directly; the op boundary's host cost is in benchmarks/RESULTS.md ("Launch-
bound shape"). Nothing to record (grad mode off, no input requiring grad, no transform, no
tangent) calls the backend with no Function at all, and a backward that builds no graph
(``create_graph=False``) calls it directly too. Under ``torch.compile`` the registered ops are
used. Both entry points run the same backend functions. Every input may have any layout: the op
boundary makes a tensor row-major once, where its last dim is not unit-stride (the kernels read
any row stride), and a backward's incoming gradient before it is saved for the double backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ..precision import acc_dtype, check_cast_mode, norm_spec
from ..reference import layer_norm_ref, rms_norm_ref
from . import dispatch, norm_vmap

_OPS = {True: ("rms.fwd", "rms.bwd", "rms.bwd_bwd"), False: ("layer.fwd", "layer.bwd", "layer.bwd_bwd")}  # table keys
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def output_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype | None, is_rms: bool, cast_mode: str) -> torch.dtype:
    """HF's result dtype: "llama"/"none" RMSNorm promote x with the weight; others keep x's."""
    if is_rms and cast_mode != "gemma" and w_dtype is not None:
        return torch.promote_types(x_dtype, w_dtype)
    return x_dtype


def _row_major(t: Tensor) -> Tensor:
    """The kernels need unit stride along the last dim; any row stride is fine. An empty tensor (its
    strides can be anything, e.g. the zero strides of an expanded gradient, and ``contiguous()`` keeps
    them) is cloned to standard strides, for free (and still differentiable)."""
    if t.numel() == 0:
        return t.clone(memory_format=torch.contiguous_format)
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _none_if_empty(t: Tensor | None) -> Tensor | None:
    return None if t is None or t.numel() == 0 else _row_major(t)


def _nothing(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh 0-element tensor standing for an output that was not asked for (ops return tensors)."""
    return x.new_empty(0, dtype=dtype)


# ------------------------------------------- backend calls and stage backwards, shared by both entries


def _call_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, backend):
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, is_rms, cast_mode)
    impl = dispatch.resolve(backend, x.device, "norm", x.shape[-1], x.dtype, _OPS[is_rms][0])
    return impl.norm_fwd(x, weight, bias, eps, norm_spec(is_rms, offset, cast_mode), out_dtype)


def _call_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend,
              dw_dtype=None, db_dtype=None):
    """(dx, dw, db); None where not needed. dw/db in the accumulation dtype, or in the dtypes given where
    the backend writes those directly (``_fwd_stage_backward`` casts the rest). ``dy`` is row-major: every
    caller made it so once (``_fwd_stage_backward``, the registered op's body, the batching rules)."""
    impl = dispatch.resolve(backend, x.device, "norm", x.shape[-1], x.dtype, _OPS[is_rms][1])
    return impl.norm_bwd(dy, x, weight, mean, rstd, norm_spec(is_rms, offset, cast_mode), need_dx,
                         need_dw and weight is not None, need_db, dw_dtype=dw_dtype, db_dtype=db_dtype)


def _call_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms,
                  need_ddy, need_dx, need_dw, backend):
    """(d_dy, d_x, d_w); d_dy/d_x are zeros when needed but no cotangent reached them, d_w may be None. The
    spec has cast mode "none": the double backward differentiates the norm without its rounding."""
    d_dy, d_x, d_w = dispatch.resolve(backend, x.device, "norm", x.shape[-1], x.dtype, _OPS[is_rms][2]).norm_bwd_bwd(
        dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, norm_spec(is_rms, offset), need_ddy, need_dx,
        need_dw and weight is not None)
    if need_ddy and d_dy is None:
        d_dy = torch.zeros_like(dy)
    if need_dx and d_x is None:
        d_x = torch.zeros_like(x)
    return d_dy, d_x, d_w


def _fwd_stage_backward(bwd, ctx, dy, in_param_dtypes: bool = False):
    """Gradients of the forward stage: runs ``bwd`` (the op, the eager Function, or with
    ``in_param_dtypes`` the backend itself, which then writes dw/db in the parameters' dtypes) and casts
    dw/db where still needed. ``dy`` is made row-major here, once: autograd hands ``y.sum()``'s gradient
    over expanded (zero strides), and the backward stage saves its dy for the double backward."""
    x, weight, mean, rstd = ctx.saved_tensors
    offset, is_rms, cast_mode, backend, bias_dtype = ctx.meta
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    args = (_row_major(dy), x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend)
    if in_param_dtypes:
        dx, dw, db = bwd(*args, dw_dtype=None if weight is None else weight.dtype, db_dtype=bias_dtype)
    else:
        dx, dw, db = bwd(*args)
    return (dx if need_dx else None, _cast(dw, weight.dtype) if need_dw else None,
            _cast(db, bias_dtype) if need_db else None, None, None, None, None, None)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _bwd_stage_backward(bwd_bwd, ctx, grad_dx, grad_dw, grad_db):
    """Gradients of the backward stage (the double backward) through ``bwd_bwd``."""
    dy, x, weight, mean, rstd = ctx.saved_tensors
    offset, is_rms, backend = ctx.meta
    need_ddy, need_dx, need_dw = ctx.needs_input_grad[:3]
    d_dy, d_x, d_w = bwd_bwd(dy, x, weight, mean, rstd, _none_if_empty(grad_dx), _none_if_empty(grad_dw),
                             _none_if_empty(grad_db), offset, is_rms, need_ddy, need_dx, need_dw, backend)
    if need_dw:  # no cotangent of dx reached the weight: its second derivative is zero
        d_w = torch.zeros_like(weight) if d_w is None or d_w.numel() == 0 else d_w.to(weight.dtype)
    return (d_dy if need_ddy else None, d_x if need_dx else None, d_w if need_dw else None,
            None, None, None, None, None, None, None, None, None)


def _save_fwd(ctx, x, weight, bias, offset, is_rms, cast_mode, backend, mean, rstd):
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.meta = (offset, is_rms, cast_mode, backend, None if bias is None else bias.dtype)


def _save_bwd(ctx, dy, x, weight, mean, rstd, offset, is_rms, backend):
    ctx.save_for_backward(dy, x, weight, mean, rstd)
    ctx.meta = (offset, is_rms, backend)


def _save_bwd_bwd(ctx, inputs) -> None:
    dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms, *_rest = inputs
    ctx.save_for_backward(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db)
    ctx.meta = (offset, is_rms)


_BWD_BWD_DIFFERENTIABLE = (0, 1, 2, 5, 6, 7)  # dy, x, weight, grad_dx, grad_dw, grad_db


def _bwd_bwd_stage_backward(ctx, *grads) -> tuple:
    """Third derivative: the VJP of the plain double backward, statistics rebuilt from x (any order,
    unfused). Under torch.func transforms through ``torch.func.vjp``; under plain autograd through
    ``torch.autograd.grad``, which (unlike torch.func) works inside saved-tensor hooks (activation
    offloading, checkpointing)."""
    saved = ctx.saved_tensors
    offset, is_rms = ctx.meta
    dy, x, weight, mean, rstd, a, bw, e = saved
    needs = [ctx.needs_input_grad[i] and saved[i] is not None for i in _BWD_BWD_DIFFERENTIABLE]
    fixed = [dy, x, weight, a, bw, e]
    # outputs that exist and received a cotangent (the stage returns zeros / empties for the others)
    mask = (grads[0] is not None and grads[0].numel() > 0, grads[1] is not None and grads[1].numel() > 0,
            grads[2] is not None and grads[2].numel() > 0 and weight is not None and a is not None)
    result = [None] * 6
    wrt = [i for i, need in enumerate(needs) if need]
    if wrt and any(mask):
        fn = norm_vmap.plain_bwd_bwd_in(fixed, wrt, mean, rstd, offset, is_rms, mask)
        cotangents = tuple(g for g, keep in zip(grads, mask) if keep)
        if _transforms_active():
            _, pullback = torch.func.vjp(fn, *[fixed[i] for i in wrt])
            found = pullback(cotangents)
        else:
            higher = torch.is_grad_enabled()  # a fourth order is being recorded
            with torch.enable_grad():
                leaves = [fixed[i].detach().requires_grad_() for i in wrt]
                found = torch.autograd.grad(fn(*leaves), leaves, cotangents, allow_unused=True, create_graph=higher)
        for i, g in zip(wrt, found):
            result[i] = g
    for i, t in enumerate(fixed):
        if needs[i] and result[i] is None:
            result[i] = torch.zeros_like(t)
    d_dy, d_x, d_w, d_a, d_bw, d_e = result
    return (d_dy, d_x, d_w, None, None, d_a, d_bw, d_e) + (None,) * 6


# ------------------------------------------------- forward-mode (jvp) rules, shared by both entries
#
# The forward stage's JVP is the norm's Jacobian applied to the tangents: exactly the d_dy output of
# the double backward with cotangents (x_t, w_t, b_t). The backward stage is the gradient of
# L = <dy, y(x, w, b)>: linear in dy, and its Jacobian in (x, w) is L's Hessian, which is symmetric,
# so its JVP is the double backward's (d_x, d_w) with cotangents (x_t, w_t). Both run fused. The
# double backward's own JVP (third order) is forward-mode through its plain twin.


_transforms_active = torch._C._are_functorch_transforms_active
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_has_storage = torch._C._has_storage


def _legacy_batched(*tensors: Tensor | None) -> bool:
    """Tangents batched by the legacy ``torch._vmap_internals`` (gradcheck's batched forward-grad check) have
    no storage and no functorch level on the stack: only the plain twins can take them."""
    return any(t is not None and not _has_storage(t) and not _functorch_wrapped(t) for t in tensors)


def _plain_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, _backend):
    return norm_vmap.plain_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db)


def _plain_bwd_bwd(dy, x, weight, mean, rstd, a, bw, e, offset, is_rms, need_ddy, need_dx, need_dw, _backend):
    return norm_vmap.plain_bwd_bwd(dy, x, weight, mean, rstd, a, bw, e, offset, is_rms, need_ddy, need_dx, need_dw)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _fwd_jvp(bwd_bwd, x, weight, mean, rstd, x_t, w_t, b_t, offset, is_rms, backend, out_dtype):
    w_t = None if weight is None else w_t
    if x_t is None and w_t is None and b_t is None:
        return None
    if _legacy_batched(x_t, w_t, b_t):
        bwd_bwd = _plain_bwd_bwd
    else:
        x_t, w_t, b_t = (None if t is None else _row_major(t) for t in (x_t, w_t, b_t))
    d_dy = bwd_bwd(x.detach(), x, weight, mean, rstd, x_t, w_t, b_t, offset, is_rms, True, False, False, backend)[0]
    return _cast(d_dy, out_dtype)


def _bwd_jvp(bwd, bwd_bwd, dy, x, weight, mean, rstd, dy_t, x_t, w_t, offset, is_rms, cast_mode, flags, backend):
    need_dx, need_dw, need_db = flags
    need_dw = need_dw and weight is not None
    t_dx = t_dw = t_db = None
    legacy = _legacy_batched(dy_t, x_t, w_t)
    if legacy:
        bwd, bwd_bwd = _plain_bwd, _plain_bwd_bwd
    if dy_t is not None:
        t_dx, t_dw, t_db = bwd(dy_t if legacy else _row_major(dy_t), x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw,
                               need_db, backend)
    w_t = None if weight is None else w_t
    if (x_t is not None or w_t is not None) and (need_dx or need_dw):
        if not legacy:
            x_t, w_t = (None if t is None else _row_major(t) for t in (x_t, w_t))
        _, d_x, d_w = bwd_bwd(dy, x, weight, mean, rstd, x_t, w_t, None, offset, is_rms, False, need_dx,
                              need_dw and x_t is not None, backend)
        t_dx, t_dw = _add(t_dx, d_x if need_dx else None), _add(t_dw, d_w if need_dw else None)
    # an output whose inputs carried no tangent has a zero one (None there trips autograd's forward grad)
    if need_dx and t_dx is None:
        t_dx = torch.zeros_like(x)
    if need_dw and t_dw is None:
        t_dw = torch.zeros(x.shape[-1], dtype=acc_dtype(x.dtype), device=x.device)
    if need_db and t_db is None:
        t_db = torch.zeros(x.shape[-1], dtype=acc_dtype(x.dtype), device=x.device)
    return t_dx, t_dw, t_db


def _bwd_bwd_jvp(saved, tangents, offset, is_rms, flags):
    """Forward-mode through the plain double backward (the primal outputs' tangents)."""
    dy, x, weight, mean, rstd, a, bw, e = saved
    need_ddy, need_dx, need_dw = flags
    mask = (need_ddy, need_dx, need_dw and weight is not None and a is not None)
    if not any(mask):
        return None, None, None
    fixed = [dy, x, weight, a, bw, e]
    where = [i for i, p in enumerate(fixed) if p is not None]
    primals = tuple(fixed[i] for i in where)
    tans = tuple(torch.zeros_like(fixed[i]) if tangents[i] is None else tangents[i].to(fixed[i].dtype) for i in where)
    fn = norm_vmap.plain_bwd_bwd_in(fixed, where, mean, rstd, offset, is_rms, mask)
    _, out_t = torch.func.jvp(fn, primals, tans)
    return tuple(norm_vmap.scatter(out_t, mask))


# ----------------------------------------------------- registered ops (torch.compile entry)


@torch.library.custom_op("ofa::norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, offset: float,
    is_rms: bool, cast_mode: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _call_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, backend)


@_norm_fwd.register_fake
def _(x, weight, bias, eps, offset, is_rms, cast_mode, backend):
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, is_rms, cast_mode)
    acc = acc_dtype(x.dtype)
    M = x.shape[0]
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(0 if is_rms else M, dtype=acc), x.new_empty(M, dtype=acc)


def _fwd_setup(ctx, inputs, output):
    x, weight, bias, _eps, offset, is_rms, cast_mode, backend = inputs
    _save_fwd(ctx, x, weight, bias, offset, is_rms, cast_mode, backend, output[1], output[2])


_norm_fwd.register_autograd(lambda ctx, dy, _dmean, _drstd: _fwd_stage_backward(_norm_bwd, ctx, dy),
                            setup_context=_fwd_setup)


@torch.library.custom_op("ofa::norm_bwd", mutates_args=())
def _norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, offset: float,
    is_rms: bool, cast_mode: str, need_dx: bool, need_dw: bool, need_db: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _call_bwd(_row_major(dy), x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw,
                           need_db, backend)  # the op may be called with any layout
    acc = acc_dtype(x.dtype)
    return (dx if dx is not None else _nothing(x), dw if dw is not None else _nothing(x, acc),
            db if db is not None else _nothing(x, acc))


@_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend):
    acc = acc_dtype(x.dtype)
    N = x.shape[-1]
    return (x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(N if need_dw and weight is not None else 0, dtype=acc),
            x.new_empty(N if need_db else 0, dtype=acc))


def _bwd_setup(ctx, inputs, output):
    dy, x, weight, mean, rstd, offset, is_rms, _cast_mode, *_rest, backend = inputs
    _save_bwd(ctx, dy, x, weight, mean, rstd, offset, is_rms, backend)


_norm_bwd.register_autograd(lambda ctx, *grads: _bwd_stage_backward(_norm_bwd_bwd, ctx, *grads),
                            setup_context=_bwd_setup)


@torch.library.custom_op("ofa::norm_bwd_bwd", mutates_args=())
def _norm_bwd_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    grad_dx: Optional[Tensor], grad_dw: Optional[Tensor], grad_db: Optional[Tensor], offset: float,
    is_rms: bool, need_ddy: bool, need_dx: bool, need_dw: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    d_dy, d_x, d_w = _call_bwd_bwd(_row_major(dy), x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms,
                                   need_ddy, need_dx, need_dw, backend)
    return (d_dy if need_ddy else _nothing(dy), d_x if need_dx else _nothing(x),
            d_w if d_w is not None else _nothing(x, acc_dtype(x.dtype)))


@_norm_bwd_bwd.register_fake
def _(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms, need_ddy, need_dx, need_dw, backend):
    N = x.shape[-1]
    has_dw = need_dw and weight is not None and grad_dx is not None
    return (dy.new_empty(dy.shape if need_ddy else (0,)), x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(N if has_dw else 0, dtype=acc_dtype(x.dtype)))


_norm_bwd_bwd.register_autograd(_bwd_bwd_stage_backward,
                                setup_context=lambda ctx, inputs, output: _save_bwd_bwd(ctx, inputs))


def _with_placeholders(outs: list, size: int, like: list) -> tuple[tuple, tuple]:
    """Registered ops return empty tensors for outputs not asked for: here ``[B, 0]`` ones, as stacking
    the per-entry results would give."""
    return tuple(o if o is not None else t.new_empty((size, 0), dtype=dt) for o, (t, dt) in zip(outs, like)), (0,) * 3


def _op_fwd_vmap(info, in_dims, x, weight, bias, eps, offset, is_rms, cast_mode, backend):
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, is_rms, cast_mode)
    return norm_vmap.fwd_rule(_norm_fwd, info.batch_size, in_dims, x, weight, bias, eps, offset, is_rms, cast_mode,
                              backend, out_dtype)


def _op_bwd_vmap(info, in_dims, dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db,
                 backend):
    outs, _ = norm_vmap.bwd_rule(_norm_bwd, info.batch_size, in_dims, dy, x, weight, mean, rstd, offset, is_rms,
                                 cast_mode, need_dx, need_dw, need_db, backend)
    acc = acc_dtype(x.dtype)
    return _with_placeholders(outs, info.batch_size, [(x, x.dtype), (x, acc), (x, acc)])


def _op_bwd_bwd_vmap(info, in_dims, dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms,
                     need_ddy, need_dx, need_dw, backend):
    outs, _ = norm_vmap.bwd_bwd_rule(_norm_bwd_bwd, info.batch_size, in_dims, dy, x, weight, mean, rstd, grad_dx,
                                     grad_dw, grad_db, offset, is_rms, need_ddy, need_dx, need_dw, backend)
    return _with_placeholders(outs, info.batch_size, [(dy, dy.dtype), (x, x.dtype), (x, acc_dtype(x.dtype))])


torch.library.register_vmap("ofa::norm_fwd", _op_fwd_vmap)
torch.library.register_vmap("ofa::norm_bwd", _op_bwd_vmap)
torch.library.register_vmap("ofa::norm_bwd_bwd", _op_bwd_bwd_vmap)


# ------------------------------------------------------------- eager entry: no op boundary


def _forward_mode_possible() -> bool:
    """A jvp can only be asked of a Function called inside a forward-AD level or a torch.func transform:
    only then is saving for it worth its cost."""
    return forward_ad._current_level >= 0 or _transforms_active()

#
# Written in the ``setup_context`` style, with ``jvp`` and ``vmap`` staticmethods, so that torch.func
# (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) goes through them as through PyTorch's own ops.


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, eps, offset, is_rms, cast_mode, backend):
        return _call_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _eps, offset, is_rms, cast_mode, backend = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # mean and rstd never receive a gradient: no zeros for them
        _save_fwd(ctx, x, weight, bias, offset, is_rms, cast_mode, backend, mean, rstd)
        if _forward_mode_possible():
            ctx.save_for_forward(x, weight, mean, rstd)
        ctx.out_dtype = y.dtype

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        if dy is None:  # y received no gradient (grads are not materialised as zeros)
            return (None,) * 8
        if not _has_storage(dy) and not _functorch_wrapped(dy):  # legacy vmap over the backward (gradcheck)
            return _fwd_stage_backward(_plain_bwd, ctx, dy)
        # Grad mode is on in a backward only when it builds a graph (create_graph=True): then the backward
        # is itself differentiable (_NormBwdFn); else the backend is called directly, with no Function.
        if torch.is_grad_enabled() or _transforms_active():  # vmap over the backward (batched gradients) too
            return _fwd_stage_backward(_apply_bwd, ctx, dy)
        return _fwd_stage_backward(_call_bwd, ctx, dy, in_param_dtypes=True)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        x, weight, mean, rstd = ctx.saved_tensors
        offset, is_rms, _cast_mode, backend, _ = ctx.meta
        return _fwd_jvp(_NormBwdBwdFn.apply, x, weight, mean, rstd, x_t, w_t, b_t, offset, is_rms, backend,
                        ctx.out_dtype), None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps, offset, is_rms, cast_mode, backend):
        out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, is_rms, cast_mode)
        return norm_vmap.fwd_rule(_NormFn.apply, info.batch_size, in_dims, x, weight, bias, eps, offset, is_rms,
                                  cast_mode, backend, out_dtype)


class _NormBwdFn(torch.autograd.Function):
    @staticmethod
    def forward(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend):
        return _call_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend = inputs
        _save_bwd(ctx, dy, x, weight, mean, rstd, offset, is_rms, backend)
        ctx.set_materialize_grads(False)  # an output no cotangent reached costs no work in the double backward
        if _forward_mode_possible():
            ctx.save_for_forward(dy, x, weight, mean, rstd)
        ctx.fwd_meta = (cast_mode, (need_dx, need_dw, need_db))

    @staticmethod
    def backward(ctx, grad_dx, grad_dw, grad_db):
        bwd_bwd = _plain_bwd_bwd if _legacy_batched(grad_dx, grad_dw, grad_db) else _apply_bwd_bwd
        return _bwd_stage_backward(bwd_bwd, ctx, grad_dx, grad_dw, grad_db)

    @staticmethod
    def jvp(ctx, dy_t, x_t, w_t, *_):
        dy, x, weight, mean, rstd = ctx.saved_tensors
        offset, is_rms, backend = ctx.meta
        cast_mode, flags = ctx.fwd_meta
        return _bwd_jvp(_NormBwdFn.apply, _NormBwdBwdFn.apply, dy, x, weight, mean, rstd, dy_t, x_t, w_t, offset,
                        is_rms, cast_mode, flags, backend)

    @staticmethod
    def vmap(info, in_dims, *args):
        outs, dims = norm_vmap.bwd_rule(_NormBwdFn.apply, info.batch_size, in_dims, *args)
        return tuple(outs), dims


class _NormBwdBwdFn(torch.autograd.Function):
    @staticmethod
    def forward(*args):
        return _call_bwd_bwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_bwd_bwd(ctx, inputs)
        ctx.set_materialize_grads(False)
        if _forward_mode_possible():
            ctx.save_for_forward(*inputs[:8])
        ctx.fwd_meta = inputs[10:13]

    @staticmethod
    def backward(ctx, *grads):
        return _bwd_bwd_stage_backward(ctx, *grads)

    @staticmethod
    def jvp(ctx, *tangents):
        offset, is_rms = ctx.meta
        return _bwd_bwd_jvp(ctx.saved_tensors, tangents[:3] + tangents[5:8], offset, is_rms, ctx.fwd_meta)

    @staticmethod
    def vmap(info, in_dims, *args):
        outs, dims = norm_vmap.bwd_bwd_rule(_NormBwdBwdFn.apply, info.batch_size, in_dims, *args)
        return tuple(outs), dims


def _direct_apply(cls):
    """``cls.apply`` without ``autograd.Function.apply``'s Python prologue, which binds the arguments
    through ``inspect.signature`` for every setup_context-style Function (tens of microseconds per call).
    Taken only outside torch.func transforms and for plain tensors (no functorch wrapper, dead or alive);
    every argument is passed positionally, so there are no defaults to bind."""
    c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)

    def apply(*args):
        a, b, c = args[:3]  # the first three arguments are each Function's tensors (or None): spelled out, hot path
        if (_transforms_active() or _functorch_wrapped(a) or (b is not None and _functorch_wrapped(b))
                or (c is not None and _functorch_wrapped(c))):
            return cls.apply(*args)
        return c_apply(*args)
    return apply


def _has_tangent(*tensors: Tensor | None) -> bool:
    """True inside a forward-AD level when any input carries a tangent."""
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


_apply_norm, _apply_bwd, _apply_bwd_bwd = (_direct_apply(c) for c in (_NormFn, _NormBwdFn, _NormBwdBwdFn))


def _norm(x, weight, bias, eps, offset, is_rms, cast_mode, backend) -> Tensor:
    """The one call site: registered op under torch.compile, lean autograd.Function in eager.

    Under torch.func transforms the eager Functions run even where the registered ops were asked for
    (``EAGER_FAST_PATH`` off): the autograd.Function that ``torch.library.register_autograd`` generates
    has no ``setup_context``, so grad-type transforms refuse it (pytorch/pytorch#168393). The ops'
    own ``register_vmap`` rules serve ``torch.vmap`` of the ops called directly."""
    if torch.compiler.is_compiling() or not (EAGER_FAST_PATH or _transforms_active()):
        if _has_tangent(x, weight, bias):  # torch.library ops have no forward-mode AD: the plain reference
            if is_rms:
                return rms_norm_ref(x, weight, eps, offset=offset, cast_mode=cast_mode)
            return layer_norm_ref(x, weight, bias, eps)
        return _norm_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, backend)[0]
    if not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                         or (bias is not None and bias.requires_grad))) \
            and not _transforms_active() and not _has_tangent(x, weight, bias):
        return _call_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, backend)[0]  # nothing to record
    return _apply_norm(x, weight, bias, eps, offset, is_rms, cast_mode, backend)[0]


EAGER_FAST_PATH = True  # tests flip it to run the registered ops eagerly too


# ------------------------------------------------------------------------------- public API


def _normalized_shape(x: Tensor, normalized_shape) -> tuple[int, ...]:
    """``normalized_shape`` (an int or a sequence of ints) checked against x's trailing dims."""
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    try:
        shape = tuple(normalized_shape)
    except TypeError:
        shape = None
    if shape is None or not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"normalized_shape must be an int or a non-empty sequence of ints >= 0, got {normalized_shape!r}")
    if tuple(x.shape[-len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"normalized_shape {shape} must equal x's trailing dims; x has shape {tuple(x.shape)}")
    return shape


def _check(x: Tensor, eps: float, normalized_shape, **params: Tensor | None) -> tuple[int, ...]:
    """Validates inputs; returns the normalised shape: ``normalized_shape``, else the weight's (or bias's)
    shape where it equals x's trailing dims, else x's last dim. Errors name the argument and what was
    expected."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised last dim), got a scalar")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")  # negative is allowed, as in F.layer_norm
    # the common case (x's last dim) first, without the general resolution's cost
    shape = (x.shape[-1],) if normalized_shape is None else _normalized_shape(x, normalized_shape)
    for name, p in params.items():
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        if p.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
        if tuple(p.shape) != shape:
            if normalized_shape is None and p.dim() > 1 and tuple(x.shape[-p.dim():]) == tuple(p.shape):
                return _check(x, eps, tuple(p.shape), **params)  # the parameter's shape names the dims
            raise ValueError(f"{name} must have shape {shape} to match x's normalised dims, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}; expected the same device")
    return shape


def _as_rows(x: Tensor, width: int) -> Tensor:
    """[..., N] -> [M, N] as a view when the leading dims collapse (any row stride), else a copy."""
    x = _row_major(x)
    return x if x.dim() == 2 else x.reshape(-1, width)


def _param(p: Tensor | None) -> Tensor | None:
    return None if p is None else _row_major(p)


def _run(x: Tensor, shape: tuple[int, ...], weight, bias, eps, offset, is_rms, cast_mode, backend) -> Tensor:
    """Flattens the normalised dims onto the kernels' rows and back."""
    if len(shape) == 1:
        y = _norm(_as_rows(x, shape[0]), _param(weight), _param(bias), float(eps), float(offset), is_rms, cast_mode,
                  backend or "auto")
        return y if y.dim() == x.dim() else y.view(x.shape)  # rows of a 2-D x are its rows already
    width = math.prod(shape)
    flat = (None if p is None else p.reshape(width) for p in (weight, bias))
    y = _norm(_row_major(x).reshape(-1, width), *map(_param, flat), float(eps), float(offset), is_rms, cast_mode,
              backend or "auto")
    return y.view(x.shape)


def _empty_rows(x, shape, weight, bias, eps, offset, is_rms, cast_mode) -> Tensor | None:
    """Zero-width rows have nothing to launch: the plain reference gives the (empty) result, still
    differentiable."""
    xr = x.reshape(*x.shape[:x.dim() - len(shape)], 0)
    w = None if weight is None else weight.reshape(0)
    if is_rms:
        y = rms_norm_ref(xr, w, eps, offset=offset, cast_mode=cast_mode)
    else:
        y = layer_norm_ref(xr, w, None if bias is None else bias.reshape(0), eps)
    return y.reshape(x.shape)


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float = 1e-6,
    *,
    normalized_shape: int | Sequence[int] | None = None,
    offset: float = 0.0,
    cast_mode: str = "llama",
    backend: str | None = None,
) -> Tensor:
    """RMSNorm over the trailing dims: ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``.

    The normalised dims are ``normalized_shape`` (as ``F.rms_norm``'s), else the weight's shape, else
    x's last dim; the weight has that shape. Statistics are fp32. ``cast_mode``: "llama" rounds the
    normalised x to x's dtype before the weight multiply and returns the promoted dtype
    (bit-compatible with HF ``LlamaRMSNorm``); "gemma" computes all in fp32 and returns x's dtype (HF
    Gemma, with ``offset=1``); "none" does no intermediate rounding and returns the promoted dtype.
    Any layout of x and weight (strided, expanded, empty). Differentiable in x, weight and the
    upstream gradient (second order fused; higher orders in plain PyTorch), in reverse and forward
    mode, and under ``torch.func`` (grad, jvp, vmap, hessian, ...). ``backend``: "auto" (default, or
    ``OFA_BACKEND``), "torch", "triton", "cpu" or "cuda" (the compiled extension); see
    ``ofa_kernels.backends()``.
    """
    shape = _check(x, eps, normalized_shape, weight=weight)
    check_cast_mode(cast_mode)
    if not math.isfinite(offset):
        raise ValueError(f"offset must be finite, got {offset!r}")
    if 0 in shape:
        return _empty_rows(x, shape, weight, None, float(eps), float(offset), True, cast_mode)
    return _run(x, shape, weight, None, eps, offset, True, cast_mode, backend)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    *,
    normalized_shape: int | Sequence[int] | None = None,
    backend: str | None = None,
) -> Tensor:
    """LayerNorm over the trailing dims with fp32 statistics; returns x's dtype.

    The normalised dims as for :func:`rms_norm`; ``weight`` and ``bias`` (either may be None) have
    that shape. Differentiable in x, weight, bias and the upstream gradient, as :func:`rms_norm`.
    ``backend`` as for :func:`rms_norm`.
    """
    shape = _check(x, eps, normalized_shape, weight=weight, bias=bias)
    if 0 in shape:
        return _empty_rows(x, shape, weight, bias, float(eps), 0.0, False, "none")
    return _run(x, shape, weight, bias, eps, 0.0, False, "none", backend)
