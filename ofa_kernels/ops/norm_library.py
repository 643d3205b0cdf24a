"""The norm's three stages registered as ``torch.library`` ops (the ``torch.compile`` entry): the ops, their
fake (meta) implementations, their autograd and their batching rules.

``ofa::norm_fwd`` -> ``ofa::norm_bwd`` -> ``ofa::norm_bwd_bwd``, each differentiable by the next. The
schemas take plain arguments (``offset, is_rms, cast_mode, backend`` and the need flags); each op's body
turns them into the ``NormCall`` record once and runs the same backend calls, stage backwards and
batching rules as the eager Functions (``norm_autograd.py``). Fake implementations let ``torch.compile``
trace models that use the ops without graph breaks. The ops have no forward-mode AD (``ops/norm.py``
sends tangents to the plain reference under compile).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..precision import acc_dtype
from . import norm_vmap
from .norm_autograd import (
    NormCall, bwd_stage_backward, call_bwd, call_bwd_bwd, call_fwd, fwd_stage_backward,
    norm_call, output_dtype, padded, row_major, save_bwd, save_bwd_bwd, save_fwd,
)

__all__ = ["norm_bwd", "norm_bwd_bwd", "norm_fwd"]


def _nothing(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh 0-element tensor standing for an output that was not asked for (ops return tensors)."""
    return x.new_empty(0, dtype=dtype)


# ---------------------------------------------------------------------------------------- forward


@torch.library.custom_op("ofa::norm_fwd", mutates_args=())
def norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, offset: float,
    is_rms: bool, cast_mode: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return call_fwd(x, weight, bias, eps, norm_call(is_rms, offset, cast_mode, backend))


@norm_fwd.register_fake
def _(x, weight, bias, eps, offset, is_rms, cast_mode, backend):
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, norm_call(is_rms, offset, cast_mode,
                                                                                          backend).spec)
    acc = acc_dtype(x.dtype)
    M = x.shape[0]
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(0 if is_rms else M, dtype=acc), x.new_empty(M, dtype=acc)


def _fwd_setup(ctx, inputs, output):
    x, weight, bias, _eps, offset, is_rms, cast_mode, backend = inputs
    save_fwd(ctx, x, weight, bias, norm_call(is_rms, offset, cast_mode, backend), output[1], output[2])


def _op_bwd(dy, x, weight, mean, rstd, call: NormCall, needs):
    """``norm_bwd`` in the stage convention (``norm_autograd.py``)."""
    spec = call.spec
    return norm_bwd(dy, x, weight, mean, rstd, spec.offset, spec.is_rms, spec.cast_mode, *needs, call.backend)


norm_fwd.register_autograd(lambda ctx, dy, _dmean, _drstd: padded(fwd_stage_backward(_op_bwd, ctx, dy), 8),
                           setup_context=_fwd_setup)


# --------------------------------------------------------------------------------------- backward


@torch.library.custom_op("ofa::norm_bwd", mutates_args=())
def norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, offset: float,
    is_rms: bool, cast_mode: str, need_dx: bool, need_dw: bool, need_db: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = call_bwd(row_major(dy), x, weight, mean, rstd, norm_call(is_rms, offset, cast_mode, backend),
                          (need_dx, need_dw, need_db))  # the op may be called with any layout
    acc = acc_dtype(x.dtype)
    return (dx if dx is not None else _nothing(x), dw if dw is not None else _nothing(x, acc),
            db if db is not None else _nothing(x, acc))


@norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend):
    acc = acc_dtype(x.dtype)
    N = x.shape[-1]
    return (x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(N if need_dw and weight is not None else 0, dtype=acc),
            x.new_empty(N if need_db else 0, dtype=acc))


def _bwd_setup(ctx, inputs, output):
    dy, x, weight, mean, rstd, offset, is_rms, cast_mode, *_needs, backend = inputs
    save_bwd(ctx, dy, x, weight, mean, rstd, norm_call(is_rms, offset, cast_mode, backend))


def _op_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, call: NormCall, needs):
    """``norm_bwd_bwd`` in the stage convention."""
    return norm_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, call.spec.offset, call.spec.is_rms,
                        *needs, call.backend)


norm_bwd.register_autograd(lambda ctx, *grads: padded(bwd_stage_backward(_op_bwd_bwd, ctx, *grads), 12),
                           setup_context=_bwd_setup)


# -------------------------------------------------------------------------------- double backward


@torch.library.custom_op("ofa::norm_bwd_bwd", mutates_args=())
def norm_bwd_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    grad_dx: Optional[Tensor], grad_dw: Optional[Tensor], grad_db: Optional[Tensor], offset: float,
    is_rms: bool, need_ddy: bool, need_dx: bool, need_dw: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    d_dy, d_x, d_w = call_bwd_bwd(row_major(dy), x, weight, mean, rstd, grad_dx, grad_dw, grad_db,
                                  norm_call(is_rms, offset, "none", backend), (need_ddy, need_dx, need_dw))
    return (d_dy if need_ddy else _nothing(dy), d_x if need_dx else _nothing(x),
            d_w if d_w is not None else _nothing(x, acc_dtype(x.dtype)))


@norm_bwd_bwd.register_fake
def _(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, offset, is_rms, need_ddy, need_dx, need_dw, backend):
    N = x.shape[-1]
    has_dw = need_dw and weight is not None and grad_dx is not None
    return (dy.new_empty(dy.shape if need_ddy else (0,)), x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(N if has_dw else 0, dtype=acc_dtype(x.dtype)))


def _bwd_bwd_setup(ctx, inputs, output):
    offset, is_rms, backend = inputs[8], inputs[9], inputs[13]
    save_bwd_bwd(ctx, inputs[:8], norm_call(is_rms, offset, "none", backend))


norm_bwd_bwd.register_autograd(lambda ctx, *grads: padded(norm_vmap.bwd_bwd_stage_backward(ctx, *grads), 14),
                               setup_context=_bwd_bwd_setup)


# ------------------------------------------------------------------------------ batching rules


def _with_placeholders(outs: list, size: int, like: list) -> tuple[tuple, tuple]:
    """Registered ops return empty tensors for outputs not asked for: here ``[B, 0]`` ones, as stacking
    the per-entry results would give."""
    return tuple(o if o is not None else t.new_empty((size, 0), dtype=dt) for o, (t, dt) in zip(outs, like)), (0,) * 3


def _op_fwd(x, weight, bias, eps, call: NormCall):
    """``norm_fwd`` in the stage convention."""
    spec = call.spec
    return norm_fwd(x, weight, bias, eps, spec.offset, spec.is_rms, spec.cast_mode, call.backend)


def _fwd_vmap(info, in_dims, *args):
    x, weight, bias, eps, offset, is_rms, cast_mode, backend = args
    call = norm_call(is_rms, offset, cast_mode, backend)
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, call.spec)
    return norm_vmap.fwd_rule(_op_fwd, info.batch_size, in_dims[:3], (x, weight, bias), eps, call, out_dtype)


def _bwd_vmap(info, in_dims, *args):
    dy, x, weight, mean, rstd, offset, is_rms, cast_mode, need_dx, need_dw, need_db, backend = args
    outs, _ = norm_vmap.bwd_rule(_op_bwd, info.batch_size, in_dims[:5], (dy, x, weight, mean, rstd),
                                 norm_call(is_rms, offset, cast_mode, backend), (need_dx, need_dw, need_db))
    acc = acc_dtype(x.dtype)
    return _with_placeholders(outs, info.batch_size, [(x, x.dtype), (x, acc), (x, acc)])


def _bwd_bwd_vmap(info, in_dims, *args):
    offset, is_rms, need_ddy, need_dx, need_dw, backend = args[8:]
    dy, x = args[:2]
    outs, _ = norm_vmap.bwd_bwd_rule(_op_bwd_bwd, info.batch_size, in_dims[:8], args[:8],
                                     norm_call(is_rms, offset, "none", backend), (need_ddy, need_dx, need_dw))
    return _with_placeholders(outs, info.batch_size, [(dy, dy.dtype), (x, x.dtype), (x, acc_dtype(x.dtype))])


torch.library.register_vmap("ofa::norm_fwd", _fwd_vmap)
torch.library.register_vmap("ofa::norm_bwd", _bwd_vmap)
torch.library.register_vmap("ofa::norm_bwd_bwd", _bwd_bwd_vmap)
