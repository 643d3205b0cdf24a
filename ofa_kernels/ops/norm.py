"""RMSNorm and LayerNorm as ``torch.library`` ops with first and second derivatives.

Three ops, each differentiable by the next (the double-backward pattern of PyTorch's custom
function tutorial): ``ofa::norm_fwd`` -> ``ofa::norm_bwd`` -> ``ofa::norm_bwd_bwd``. Saved
statistics (mean, rstd) are never differentiated as constants: ``norm_bwd_bwd`` carries their
dependence on x in closed form. Every op hands its work to the backend that ``dispatch.resolve``
picks; fake implementations let ``torch.compile`` trace models that use them without graph breaks.

Third and higher derivatives (the gradient of an HVP-based sharpness with respect to the norm
weights needs them) recompute the closed-form double backward in plain PyTorch, with mean and
rstd rebuilt as functions of x, and let autograd differentiate it: correct to any order, not fused.
Forward-mode AD (dual tensors, used by the "jvp" sharpness estimator) runs the plain-PyTorch
reference, which autograd differentiates in both modes.

Eager calls skip the op boundary: the same three stages as ``torch.autograd.Function``s that call
the backend directly (measured on an H200: ~87 us of host time per op call against ~39 us for the
Triton launch itself, which left the GPU idle between forward and backward). Nothing to record
(grad mode off, or no input requiring grad) calls the backend with no Function at all, and a
backward that builds no graph (``create_graph=False``) calls it directly too. Under
``torch.compile`` the registered ops are used. Both entry points run the same backend functions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ..reference import layer_norm_ref, rms_norm_ref
from . import dispatch

CAST_MODES = ("llama", "gemma", "none")
_OPS = {True: ("rms.fwd", "rms.bwd", "rms.bwd_bwd"), False: ("layer.fwd", "layer.bwd", "layer.bwd_bwd")}  # table keys
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    return impl.norm_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, out_dtype)


def _call_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend,
              dw_dtype=None, db_dtype=None):
    """(dx, dw, db); None where not needed. dw/db in the accumulation dtype, or in the dtypes given where
    the backend writes those directly (``_fwd_stage_backward`` casts the rest)."""
    impl = dispatch.resolve(backend, x.device, "norm", x.shape[-1], x.dtype, _OPS[is_rms][1])
    return impl.norm_bwd(_row_major(dy), x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx,
                         need_dw and weight is not None, need_db, dw_dtype=dw_dtype, db_dtype=db_dtype)


def _call_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms,
                  need_ddy, need_dx, need_dw, backend):
    """(d_dy, d_x, d_w); d_dy/d_x are zeros when needed but no cotangent reached them, d_w may be None."""
    d_dy, d_x, d_w = dispatch.resolve(backend, x.device, "norm", x.shape[-1], x.dtype, _OPS[is_rms][2]).norm_bwd_bwd(
        dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms, need_ddy, need_dx,
        need_dw and weight is not None)
    if need_ddy and d_dy is None:
        d_dy = torch.zeros_like(dy)
    if need_dx and d_x is None:
        d_x = torch.zeros_like(x)
    return d_dy, d_x, d_w


def _fwd_stage_backward(bwd, ctx, dy, in_param_dtypes: bool = False):
    """Gradients of the forward stage: runs ``bwd`` (the op, the eager Function, or with
    ``in_param_dtypes`` the backend itself, which then writes dw/db in the parameters' dtypes) and casts
    dw/db where still needed."""
    x, weight, mean, rstd = ctx.saved_tensors
    offset, is_rms, cast_mode, backend, bias_dtype = ctx.meta
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    args = (dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend)
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


def _stats_of(x: Tensor, mean: Tensor, rstd: Tensor, is_rms: bool) -> tuple[Tensor, Tensor]:
    """mean and rstd as differentiable functions of x with the saved values (eps recovered from rstd)."""
    xs = x.to(_acc(x.dtype))
    if is_rms:
        var, mean_f = xs.pow(2).mean(-1), mean
    else:
        m = xs.mean(-1)
        var = (xs - m[:, None]).pow(2).mean(-1)
        mean_f = m + (mean - m).detach()
    eps_hat = (rstd.pow(-2) - var).detach()
    return mean_f, (var + eps_hat).rsqrt()


def _save_bwd_bwd(ctx, inputs) -> None:
    dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms, *_rest = inputs
    ctx.save_for_backward(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db)
    ctx.meta = (offset, is_rms)


def _bwd_bwd_stage_backward(ctx, *grads) -> tuple:
    """Third derivative: autograd through the plain-PyTorch double backward (any order, unfused)."""
    from ..eager import norm as eager

    saved = ctx.saved_tensors
    offset, is_rms = ctx.meta
    needs = [ctx.needs_input_grad[i] and saved[i] is not None for i in (0, 1, 2, 5, 6, 7)]
    with torch.enable_grad():
        dy, x, weight, mean, rstd, a, bw, e = [None if t is None else t.detach() for t in saved]
        leaves = [t.requires_grad_(need) if t is not None else None
                  for t, need in zip((dy, x, weight, a, bw, e), needs)]
        dy, x, weight, a, bw, e = leaves
        mean_f, rstd_f = _stats_of(x, mean, rstd, is_rms)
        outs = eager.norm_bwd_bwd(dy, x, weight, mean_f, rstd_f, a, bw, e, offset, is_rms,
                                  True, True, weight is not None)
        pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and g.numel()]
        wrt = [t for t, need in zip(leaves, needs) if need]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                                         create_graph=torch.is_grad_enabled()) if pairs and wrt else ())
    result = [next(found, None) if need else None for need in needs]
    for i, t in enumerate((dy, x, weight, a, bw, e)):
        if needs[i] and result[i] is None:
            result[i] = torch.zeros_like(t)
    d_dy, d_x, d_w, d_a, d_bw, d_e = result
    return (d_dy, d_x, d_w, None, None, d_a, d_bw, d_e) + (None,) * 6


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
    acc = _acc(x.dtype)
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
    dx, dw, db = _call_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend)
    acc = _acc(x.dtype)
    return (dx if dx is not None else _nothing(x), dw if dw is not None else _nothing(x, acc),
            db if db is not None else _nothing(x, acc))


@_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend):
    acc = _acc(x.dtype)
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
    d_dy, d_x, d_w = _call_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms,
                                   need_ddy, need_dx, need_dw, backend)
    return (d_dy if need_ddy else _nothing(dy), d_x if need_dx else _nothing(x),
            d_w if d_w is not None else _nothing(x, _acc(x.dtype)))


@_norm_bwd_bwd.register_fake
def _(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms, need_ddy, need_dx, need_dw, backend):
    N = x.shape[-1]
    has_dw = need_dw and weight is not None and grad_dx is not None
    return (dy.new_empty(dy.shape if need_ddy else (0,)), x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(N if has_dw else 0, dtype=_acc(x.dtype)))


_norm_bwd_bwd.register_autograd(_bwd_bwd_stage_backward,
                                setup_context=lambda ctx, inputs, output: _save_bwd_bwd(ctx, inputs))


# ------------------------------------------------------------- eager entry: no op boundary


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, offset, is_rms, cast_mode, backend):
        y, mean, rstd = _call_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, backend)
        _save_fwd(ctx, x, weight, bias, offset, is_rms, cast_mode, backend, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        # Grad mode is on in a backward only when it builds a graph (create_graph=True): then the backward
        # is itself differentiable (_NormBwdFn); else the backend is called directly, with no Function.
        if torch.is_grad_enabled():
            return _fwd_stage_backward(_NormBwdFn.apply, ctx, dy)
        return _fwd_stage_backward(_call_bwd, ctx, dy, in_param_dtypes=True)


class _NormBwdFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend):
        _save_bwd(ctx, dy, x, weight, mean, rstd, offset, is_rms, backend)
        return _call_bwd(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend)

    @staticmethod
    def backward(ctx, grad_dx, grad_dw, grad_db):
        return _bwd_stage_backward(_NormBwdBwdFn.apply, ctx, grad_dx, grad_dw, grad_db)


class _NormBwdBwdFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        _save_bwd_bwd(ctx, args)
        return _call_bwd_bwd(*args)

    @staticmethod
    def backward(ctx, *grads):
        return _bwd_bwd_stage_backward(ctx, *grads)


def _has_tangent(*tensors: Tensor | None) -> bool:
    """True inside a forward-AD level when any input carries a tangent."""
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _norm(x, weight, bias, eps, offset, is_rms, cast_mode, backend) -> Tensor:
    """The one call site: registered op under torch.compile, lean autograd.Function in eager."""
    if _has_tangent(x, weight, bias):  # forward-mode AD: the plain-PyTorch reference
        if is_rms:
            return rms_norm_ref(x, weight, eps, offset=offset, cast_mode=cast_mode)
        return layer_norm_ref(x, weight, bias, eps)
    if torch.compiler.is_compiling() or not EAGER_FAST_PATH:
        return _norm_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, backend)[0]
    if not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                         or (bias is not None and bias.requires_grad))):
        return _call_fwd(x, weight, bias, eps, offset, is_rms, cast_mode, backend)[0]  # nothing to record
    return _NormFn.apply(x, weight, bias, eps, offset, is_rms, cast_mode, backend)


EAGER_FAST_PATH = True  # tests flip it to run the registered ops eagerly too


# ------------------------------------------------------------------------------- public API


def _check(x: Tensor, eps: float, **params: Tensor | None) -> int:
    """Validates inputs; returns the row width. Errors name the argument and what was expected."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised last dim), got a scalar")
    width = x.shape[-1]
    if width == 0:
        raise ValueError(f"x has zero-width rows (shape {tuple(x.shape)}); expected a last dim >= 1")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    for name, p in params.items():
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        if p.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
        if tuple(p.shape) != (width,):
            raise ValueError(f"{name} must have shape ({width},) to match x's last dim, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}; expected the same device")
    return width


def _as_rows(x: Tensor, width: int) -> Tensor:
    """[..., N] -> [M, N] as a view when the leading dims collapse (any row stride), else a copy."""
    x = _row_major(x)
    return x if x.dim() == 2 else x.reshape(-1, width)


def _as_input_shape(y: Tensor, x: Tensor) -> Tensor:
    return y if y.dim() == x.dim() else y.view(x.shape)  # rows of a 2-D x are its rows already


def _param(p: Tensor | None) -> Tensor | None:
    return None if p is None else _row_major(p)


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    cast_mode: str = "llama",
    backend: str | None = None,
) -> Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``.

    Statistics are fp32. ``cast_mode``: "llama" rounds the normalised x to x's dtype before the
    weight multiply and returns the promoted dtype (bit-compatible with HF ``LlamaRMSNorm``);
    "gemma" computes all in fp32 and returns x's dtype (HF Gemma, with ``offset=1``); "none" does no
    intermediate rounding and returns the promoted dtype. Differentiable in x, weight and the
    upstream gradient (second order fused; higher orders in plain PyTorch). ``backend``: "auto"
    (default, or ``OFA_BACKEND``), "torch", "triton", "cpu" or "cuda" (the compiled extension);
    see ``ofa_kernels.backends()``.
    """
    width = _check(x, eps, weight=weight)
    if cast_mode not in CAST_MODES:
        raise ValueError(f"cast_mode must be one of {CAST_MODES}, got {cast_mode!r}")
    if not math.isfinite(offset):
        raise ValueError(f"offset must be finite, got {offset!r}")
    y = _norm(_as_rows(x, width), _param(weight), None, float(eps), float(offset), True, cast_mode,
              backend or "auto")
    return _as_input_shape(y, x)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """LayerNorm over the last dim with fp32 statistics; returns x's dtype.

    ``weight`` and ``bias`` may be None. Differentiable in x, weight, bias and the upstream
    gradient. ``backend`` as for :func:`rms_norm`.
    """
    width = _check(x, eps, weight=weight, bias=bias)
    y = _norm(_as_rows(x, width), _param(weight), _param(bias), float(eps), 0.0, False, "none",
              backend or "auto")
    return _as_input_shape(y, x)
