"""The norm's three stages as eager ``torch.autograd.Function``s, with the work both entries share: the
backend calls, the stage backwards and the forward-mode (JVP) rules.

The stages: forward -> backward -> double backward, each differentiable by the next (the double-backward
pattern of PyTorch's custom function tutorial). Saved statistics (mean, rstd) are never differentiated
as constants: the double backward carries their dependence on x in closed form. Third and higher
derivatives, and forward mode through the double backward, go through the plain double backward with
mean and rstd rebuilt as functions of x (``norm_vmap.py``): correct to any order, not fused.

What a call fixes besides its tensors travels as one frozen record, :class:`NormCall` (the norm's
``NormSpec`` and the backend asked for); the flags of what to compute as ``needs`` triples. Every stage
callable takes its tensors first, then ``call``, then ``needs`` (the backend calls here, the eager
Functions, the plain twins, and ``norm_library``'s adapters of the registered ops), so a stage
backward or JVP rule takes any of them.

The Functions are written in the ``setup_context`` style, with ``jvp`` and ``vmap`` staticmethods, so
torch.func (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) goes through them as through PyTorch's own
ops. ``ops/norm_library.py`` registers the same stages as ``torch.library`` ops (the torch.compile
entry); ``ops/norm.py`` is the public entry and chooses between them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ..precision import NormSpec, acc_dtype, norm_spec
from . import dispatch, norm_vmap

_STAGE_KEYS = {True: ("rms.fwd", "rms.bwd", "rms.bwd_bwd"), False: ("layer.fwd", "layer.bwd", "layer.bwd_bwd")}
Needs = tuple[bool, bool, bool]  # what a stage computes: (dx, dw, db), or (d_dy, d_x, d_w) for the double backward


@dataclass(frozen=True)
class NormCall:
    """What a norm call fixes besides its tensors: the norm (``spec``) and the ``backend`` asked for
    ("auto" or a name of ``vocab.BACKEND_NAMES``). Build it with :func:`norm_call` (one object per
    distinct call)."""

    spec: NormSpec
    backend: str


@functools.lru_cache(maxsize=256)
def norm_call(is_rms: bool, offset: float, cast_mode: str, backend: str) -> NormCall:
    """The checked :class:`NormCall` of these fields (interned: an op call pays a dictionary lookup)."""
    return NormCall(norm_spec(is_rms, offset, cast_mode), backend)


def output_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype | None, spec: NormSpec) -> torch.dtype:
    """HF's result dtype: "llama"/"none" RMSNorm promote x with the weight; others keep x's."""
    if spec.is_rms and spec.cast_mode != "gemma" and w_dtype is not None:
        return torch.promote_types(x_dtype, w_dtype)
    return x_dtype


def row_major(t: Tensor) -> Tensor:
    """The kernels need unit stride along the last dim; any row stride is fine. An empty tensor (its
    strides can be anything, e.g. the zero strides of an expanded gradient, and ``contiguous()`` keeps
    them) is cloned to standard strides, for free (and still differentiable)."""
    if t.numel() == 0:
        return t.clone(memory_format=torch.contiguous_format)
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def padded(grads: tuple, inputs: int) -> tuple:
    """A backward's gradients followed by None for the remaining (non-differentiable) inputs."""
    return grads + (None,) * (inputs - len(grads))


def _none_if_empty(t: Tensor | None) -> Tensor | None:
    return None if t is None or t.numel() == 0 else row_major(t)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ----------------------------------------------------------------------------------- backend calls


def call_fwd(x, weight, bias, eps: float, call: NormCall):
    """(y, mean, rstd) from the backend ``dispatch`` picks for this launch."""
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, call.spec)
    impl = dispatch.resolve(call.backend, x.device, "norm", x.shape[-1], x.dtype, _STAGE_KEYS[call.spec.is_rms][0])
    return impl.norm_fwd(x, weight, bias, eps, call.spec, out_dtype)


def call_bwd(dy, x, weight, mean, rstd, call: NormCall, needs: Needs, dw_dtype=None, db_dtype=None):
    """(dx, dw, db); None where not needed. dw/db in the accumulation dtype, or in the dtypes given where
    the backend writes those directly (``fwd_stage_backward`` casts the rest). ``dy`` is row-major: every
    caller made it so once."""
    need_dx, need_dw, need_db = needs
    impl = dispatch.resolve(call.backend, x.device, "norm", x.shape[-1], x.dtype, _STAGE_KEYS[call.spec.is_rms][1])
    return impl.norm_bwd(dy, x, weight, mean, rstd, call.spec, (need_dx, need_dw and weight is not None, need_db),
                         dw_dtype=dw_dtype, db_dtype=db_dtype)


def call_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, call: NormCall, needs: Needs):
    """(d_dy, d_x, d_w); d_dy/d_x are zeros when needed but no cotangent reached them, d_w may be None. The
    spec has cast mode "none": the double backward differentiates the norm without its rounding."""
    need_ddy, need_dx, need_dw = needs
    impl = dispatch.resolve(call.backend, x.device, "norm", x.shape[-1], x.dtype, _STAGE_KEYS[call.spec.is_rms][2])
    d_dy, d_x, d_w = impl.norm_bwd_bwd(dy, x, weight, mean, rstd, (grad_dx, grad_dw, grad_db), call.spec.unrounded(),
                                       (need_ddy, need_dx, need_dw and weight is not None))
    if need_ddy and d_dy is None:
        d_dy = torch.zeros_like(dy)
    if need_dx and d_x is None:
        d_x = torch.zeros_like(x)
    return d_dy, d_x, d_w


# -------------------------------------------------------- stage backwards, shared by both entries


def save_fwd(ctx, x, weight, bias, call: NormCall, mean, rstd) -> None:
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.call, ctx.bias_dtype = call, None if bias is None else bias.dtype


def save_bwd(ctx, dy, x, weight, mean, rstd, call: NormCall) -> None:
    ctx.save_for_backward(dy, x, weight, mean, rstd)
    ctx.call = call


def save_bwd_bwd(ctx, tensors: tuple, call: NormCall) -> None:
    """``tensors``: (dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db)."""
    ctx.save_for_backward(*tensors)
    ctx.call = call


def fwd_stage_backward(bwd, ctx, dy, in_param_dtypes: bool = False) -> tuple:
    """(dx, dw, db) of the forward stage through ``bwd`` (the op, the eager Function, or with
    ``in_param_dtypes`` the backend call itself, which then writes dw/db in the parameters' dtypes), dw/db
    cast where still needed. ``dy`` is made row-major here, once: autograd hands ``y.sum()``'s gradient
    over expanded (zero strides), and the backward stage saves its dy for the double backward."""
    x, weight, mean, rstd = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    need_dx, need_dw, need_db = needs
    dy = row_major(dy)
    if in_param_dtypes:
        dx, dw, db = bwd(dy, x, weight, mean, rstd, ctx.call, needs,
                         dw_dtype=None if weight is None else weight.dtype, db_dtype=ctx.bias_dtype)
    else:
        dx, dw, db = bwd(dy, x, weight, mean, rstd, ctx.call, needs)
    return (dx if need_dx else None, _cast(dw, weight.dtype) if need_dw else None,
            _cast(db, ctx.bias_dtype) if need_db else None)


def bwd_stage_backward(bwd_bwd, ctx, grad_dx, grad_dw, grad_db) -> tuple:
    """(d_dy, d_x, d_w) of the backward stage (the double backward) through ``bwd_bwd``."""
    dy, x, weight, mean, rstd = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    d_dy, d_x, d_w = bwd_bwd(dy, x, weight, mean, rstd, _none_if_empty(grad_dx), _none_if_empty(grad_dw),
                             _none_if_empty(grad_db), ctx.call, needs)
    need_ddy, need_dx, need_dw = needs
    if need_dw:  # no cotangent of dx reached the weight: its second derivative is zero
        d_w = torch.zeros_like(weight) if d_w is None or d_w.numel() == 0 else d_w.to(weight.dtype)
    return d_dy if need_ddy else None, d_x if need_dx else None, d_w if need_dw else None


# ------------------------------------------------- forward-mode (jvp) rules, shared by both entries
#
# The forward stage's JVP is the norm's Jacobian applied to the tangents: exactly the d_dy output of
# the double backward with cotangents (x_t, w_t, b_t). The backward stage is the gradient of
# L = <dy, y(x, w, b)>: linear in dy, and its Jacobian in (x, w) is L's Hessian, which is symmetric,
# so its JVP is the double backward's (d_x, d_w) with cotangents (x_t, w_t). Both run fused. The
# double backward's own JVP (third order) is forward-mode through its plain twin (``norm_vmap.py``).


transforms_active = torch._C._are_functorch_transforms_active
functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_has_storage = torch._C._has_storage


def legacy_batched(*tensors: Tensor | None) -> bool:
    """Tensors batched by the legacy ``torch._vmap_internals`` (gradcheck's batched checks) have no
    storage and no functorch level on the stack: only the plain twins can take them."""
    return any(t is not None and not _has_storage(t) and not functorch_wrapped(t) for t in tensors)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def fwd_jvp(bwd_bwd, saved: tuple, tangents: tuple, call: NormCall, out_dtype: torch.dtype) -> Tensor | None:
    """The forward stage's output tangent; ``saved`` (x, weight, mean, rstd), ``tangents`` (x_t, w_t, b_t)."""
    x, weight, mean, rstd = saved
    x_t, w_t, b_t = tangents
    w_t = None if weight is None else w_t
    if x_t is None and w_t is None and b_t is None:
        return None
    if legacy_batched(x_t, w_t, b_t):
        bwd_bwd = norm_vmap.plain_bwd_bwd
    else:
        x_t, w_t, b_t = (None if t is None else row_major(t) for t in (x_t, w_t, b_t))
    d_dy = bwd_bwd(x.detach(), x, weight, mean, rstd, x_t, w_t, b_t, call, (True, False, False))[0]
    return _cast(d_dy, out_dtype)


def bwd_jvp(stages: tuple, saved: tuple, tangents: tuple, call: NormCall, needs: Needs) -> tuple:
    """The backward stage's output tangents (dx_t, dw_t, db_t); ``stages`` (bwd, bwd_bwd), ``saved``
    (dy, x, weight, mean, rstd), ``tangents`` (dy_t, x_t, w_t)."""
    bwd, bwd_bwd = stages
    dy, x, weight, mean, rstd = saved
    dy_t, x_t, w_t = tangents
    need_dx, need_dw, need_db = needs
    need_dw = need_dw and weight is not None
    t_dx = t_dw = t_db = None
    legacy = legacy_batched(dy_t, x_t, w_t)
    if legacy:
        bwd, bwd_bwd = norm_vmap.plain_bwd, norm_vmap.plain_bwd_bwd
    if dy_t is not None:
        t_dx, t_dw, t_db = bwd(dy_t if legacy else row_major(dy_t), x, weight, mean, rstd, call,
                               (need_dx, need_dw, need_db))
    w_t = None if weight is None else w_t
    if (x_t is not None or w_t is not None) and (need_dx or need_dw):
        if not legacy:
            x_t, w_t = (None if t is None else row_major(t) for t in (x_t, w_t))
        _, d_x, d_w = bwd_bwd(dy, x, weight, mean, rstd, x_t, w_t, None, call,
                              (False, need_dx, need_dw and x_t is not None))
        t_dx, t_dw = _add(t_dx, d_x if need_dx else None), _add(t_dw, d_w if need_dw else None)
    # an output whose inputs carried no tangent has a zero one (None there trips autograd's forward grad)
    if need_dx and t_dx is None:
        t_dx = torch.zeros_like(x)
    if need_dw and t_dw is None:
        t_dw = torch.zeros(x.shape[-1], dtype=acc_dtype(x.dtype), device=x.device)
    if need_db and t_db is None:
        t_db = torch.zeros(x.shape[-1], dtype=acc_dtype(x.dtype), device=x.device)
    return t_dx, t_dw, t_db


# ------------------------------------------------------------------------- the eager Functions


def _forward_mode_possible() -> bool:
    """A jvp can only be asked of a Function called inside a forward-AD level or a torch.func transform:
    only then is saving for it worth its cost."""
    return forward_ad._current_level >= 0 or transforms_active()


class NormFn(torch.autograd.Function):
    """The forward stage: ``(x, weight, bias, eps, call) -> (y, mean, rstd)``."""

    @staticmethod
    def forward(x, weight, bias, eps, call):
        return call_fwd(x, weight, bias, eps, call)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _eps, call = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # mean and rstd never receive a gradient: no zeros for them
        save_fwd(ctx, x, weight, bias, call, mean, rstd)
        if _forward_mode_possible():
            ctx.save_for_forward(x, weight, mean, rstd)
        ctx.out_dtype = y.dtype

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        if dy is None:  # y received no gradient (grads are not materialised as zeros)
            return (None,) * 5
        if legacy_batched(dy):  # legacy vmap over the backward (gradcheck)
            return padded(fwd_stage_backward(norm_vmap.plain_bwd, ctx, dy), 5)
        # Grad mode is on in a backward only when it builds a graph (create_graph=True): then the backward
        # is itself differentiable (NormBwdFn); else the backend is called directly, with no Function.
        if torch.is_grad_enabled() or transforms_active():  # vmap over the backward (batched gradients) too
            return padded(fwd_stage_backward(apply_bwd, ctx, dy), 5)
        return padded(fwd_stage_backward(call_bwd, ctx, dy, in_param_dtypes=True), 5)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        return fwd_jvp(NormBwdBwdFn.apply, ctx.saved_tensors, (x_t, w_t, b_t), ctx.call, ctx.out_dtype), None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps, call):
        out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, call.spec)
        return norm_vmap.fwd_rule(NormFn.apply, info.batch_size, in_dims[:3], (x, weight, bias), eps, call,
                                  out_dtype)


class NormBwdFn(torch.autograd.Function):
    """The backward stage: ``(dy, x, weight, mean, rstd, call, needs) -> (dx, dw, db)``."""

    @staticmethod
    def forward(dy, x, weight, mean, rstd, call, needs):
        return call_bwd(dy, x, weight, mean, rstd, call, needs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, x, weight, mean, rstd, call, needs = inputs
        save_bwd(ctx, dy, x, weight, mean, rstd, call)
        ctx.set_materialize_grads(False)  # an output no cotangent reached costs no work in the double backward
        if _forward_mode_possible():
            ctx.save_for_forward(dy, x, weight, mean, rstd)
        ctx.needs = needs

    @staticmethod
    def backward(ctx, grad_dx, grad_dw, grad_db):
        bwd_bwd = norm_vmap.plain_bwd_bwd if legacy_batched(grad_dx, grad_dw, grad_db) else apply_bwd_bwd
        return padded(bwd_stage_backward(bwd_bwd, ctx, grad_dx, grad_dw, grad_db), 7)

    @staticmethod
    def jvp(ctx, dy_t, x_t, w_t, *_):
        return bwd_jvp((NormBwdFn.apply, NormBwdBwdFn.apply), ctx.saved_tensors, (dy_t, x_t, w_t), ctx.call,
                       ctx.needs)

    @staticmethod
    def vmap(info, in_dims, dy, x, weight, mean, rstd, call, needs):
        outs, dims = norm_vmap.bwd_rule(NormBwdFn.apply, info.batch_size, in_dims[:5], (dy, x, weight, mean, rstd),
                                        call, needs)
        return tuple(outs), dims


class NormBwdBwdFn(torch.autograd.Function):
    """The double backward: ``(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, call, needs) ->
    (d_dy, d_x, d_w)``."""

    @staticmethod
    def forward(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, call, needs):
        return call_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, call, needs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_bwd_bwd(ctx, inputs[:8], inputs[8])
        ctx.set_materialize_grads(False)
        if _forward_mode_possible():
            ctx.save_for_forward(*inputs[:8])
        ctx.needs = inputs[9]

    @staticmethod
    def backward(ctx, *grads):
        return padded(norm_vmap.bwd_bwd_stage_backward(ctx, *grads), 10)

    @staticmethod
    def jvp(ctx, *tangents):
        return norm_vmap.bwd_bwd_jvp(ctx.saved_tensors, tangents[:3] + tangents[5:8], ctx.call, ctx.needs)

    @staticmethod
    def vmap(info, in_dims, *args):
        outs, dims = norm_vmap.bwd_bwd_rule(NormBwdBwdFn.apply, info.batch_size, in_dims[:8], args[:8], args[8],
                                            args[9])
        return tuple(outs), dims


def _direct_apply(cls):
    """``cls.apply`` without ``autograd.Function.apply``'s Python prologue, which binds the arguments
    through ``inspect.signature`` for every setup_context-style Function (tens of microseconds per call).
    Taken only outside torch.func transforms and for plain tensors (no functorch wrapper, dead or alive);
    every argument is passed positionally, so there are no defaults to bind."""
    c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)

    def apply(*args):
        a, b, c = args[:3]  # the first three arguments are each Function's tensors (or None): spelled out, hot path
        if (transforms_active() or functorch_wrapped(a) or (b is not None and functorch_wrapped(b))
                or (c is not None and functorch_wrapped(c))):
            return cls.apply(*args)
        return c_apply(*args)
    return apply


apply_norm, apply_bwd, apply_bwd_bwd = (_direct_apply(c) for c in (NormFn, NormBwdFn, NormBwdBwdFn))
