"""``torch.func`` support for the three norm stages: plain differentiable twins and batching rules.

The fused stages read saved statistics (mean, rstd) as plain inputs and carry their dependence on x
in closed form. The *plain twins* here compute the same stage with PyTorch ops, the statistics
rebuilt as functions of x (same values), so any transform (grad, jvp, vmap, at any depth) can go
through them exactly. They serve three purposes: the third derivative, forward-mode through the
double backward, and the batching rules' general case.

The stage callables take their tensors, then the ``norm_autograd.NormCall``, then the ``needs`` flags
(``norm_autograd.py``'s convention), so a plain twin stands in for a fused stage anywhere.

Batching rules (``vmap`` staticmethods of the eager Functions and ``torch.library.register_vmap`` of
the registered ops share them): a norm is row-wise, so when only per-row tensors (x, dy, the dx
cotangent, mean, rstd) carry the batch dim, the batch is folded into the rows and the fused stage runs
once on ``[B*M, N]``. Column sums (dw, db, the double backward's d_w) must stay per batch entry, and
a batched weight / bias (or their cotangents) cannot be folded into one kernel call: those outputs
come from the plain twin run on the whole batch at once (the eager formulas broadcast over a leading
batch dim: vectorised PyTorch ops, no Python loop over the batch).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..eager import norm as plain_formulas
from ..precision import acc_dtype


def stats_of(x: Tensor, mean: Tensor, rstd: Tensor, is_rms: bool) -> tuple[Tensor, Tensor]:
    """mean and rstd as differentiable functions of x with the saved values (eps recovered from rstd)."""
    xs = x.to(acc_dtype(x.dtype))
    if is_rms:
        var, mean_f = xs.pow(2).mean(-1), mean
    else:
        m = xs.mean(-1)
        var = (xs - m[..., None]).pow(2).mean(-1)
        mean_f = m + (mean - m).detach()
    eps_hat = (rstd.pow(-2) - var).detach()
    return mean_f, (var + eps_hat).rsqrt()


def plain_fwd(x, weight, bias, eps, call, out_dtype):
    """The forward stage in PyTorch ops: ``(y, mean, rstd)``. ``call``: a ``norm_autograd.NormCall``."""
    return plain_formulas.norm_fwd(x, weight, bias, eps, call.spec, out_dtype)


def plain_bwd(dy, x, weight, mean, rstd, call, needs):
    """The backward stage in PyTorch ops, differentiable through the statistics: ``(dx, dw, db)``."""
    need_dx, need_dw, need_db = needs
    mean_f, rstd_f = stats_of(x, mean, rstd, call.spec.is_rms)
    return plain_formulas.norm_bwd(dy, x, weight, mean_f, rstd_f, call.spec,
                                   (need_dx, need_dw and weight is not None, need_db))


def plain_bwd_bwd(dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db, call, needs):
    """The double backward in PyTorch ops, differentiable through the statistics: ``(d_dy, d_x, d_w)``."""
    need_ddy, need_dx, need_dw = needs
    mean_f, rstd_f = stats_of(x, mean, rstd, call.spec.is_rms)
    return plain_formulas.norm_bwd_bwd(dy, x, weight, mean_f, rstd_f, (grad_dx, grad_dw, grad_db),
                                       call.spec.unrounded(), (need_ddy, need_dx, need_dw and weight is not None))


def plain_bwd_bwd_in(fixed: list, slots: list[int], mean, rstd, call, mask: tuple[bool, ...]):
    """The plain double backward as a function of the ``slots`` of ``fixed`` = (dy, x, weight, grad_dx,
    grad_dw, grad_db), the others held; returns the outputs ``mask`` selects (for torch.func.vjp / jvp)."""
    def fn(*free):
        args = list(fixed)
        for i, t in zip(slots, free):
            args[i] = t
        dy, x, w, a, bw, e = args
        return present(plain_bwd_bwd, mask)(dy, x, w, mean, rstd, a, bw, e, call, mask)
    return fn


def present(fn: Callable[..., tuple], mask: tuple[bool, ...]) -> Callable[..., tuple]:
    """``fn`` returning only the outputs ``mask`` selects (transforms want tensors, not None)."""
    def call(*args):
        return tuple(o for o, keep in zip(fn(*args), mask) if keep)
    return call


def scatter(values: tuple, mask: tuple[bool, ...]) -> list:
    """The inverse of ``present``: None where ``mask`` is False."""
    it = iter(values)
    return [next(it) if keep else None for keep in mask]


# ------------------------------------------------------- third derivative and forward mode of the double backward


_BWD_BWD_DIFFERENTIABLE = (0, 1, 2, 5, 6, 7)  # dy, x, weight, grad_dx, grad_dw, grad_db


def bwd_bwd_stage_backward(ctx, *grads) -> tuple:
    """Third derivative, for the double backward's 8 tensor inputs: the VJP of the plain double backward,
    statistics rebuilt from x (any order, unfused). Under torch.func transforms through
    ``torch.func.vjp``; under plain autograd through ``torch.autograd.grad``, which (unlike torch.func)
    works inside saved-tensor hooks (activation offloading, checkpointing)."""
    saved = ctx.saved_tensors
    dy, x, weight, mean, rstd, a, bw, e = saved
    needs = [ctx.needs_input_grad[i] and saved[i] is not None for i in _BWD_BWD_DIFFERENTIABLE]
    fixed = [dy, x, weight, a, bw, e]
    # outputs that exist and received a cotangent (the stage returns zeros / empties for the others)
    mask = (grads[0] is not None and grads[0].numel() > 0, grads[1] is not None and grads[1].numel() > 0,
            grads[2] is not None and grads[2].numel() > 0 and weight is not None and a is not None)
    result = [None] * 6
    wrt = [i for i, need in enumerate(needs) if need]
    if wrt and any(mask):
        fn = plain_bwd_bwd_in(fixed, wrt, mean, rstd, ctx.call, mask)
        cotangents = tuple(g for g, keep in zip(grads, mask) if keep)
        if torch._C._are_functorch_transforms_active():
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
    return d_dy, d_x, d_w, None, None, d_a, d_bw, d_e


def bwd_bwd_jvp(saved: tuple, tangents: tuple, call, needs: tuple[bool, bool, bool]) -> tuple:
    """Forward-mode through the plain double backward; ``saved`` its 8 tensor inputs, ``tangents`` those of
    (dy, x, weight, grad_dx, grad_dw, grad_db)."""
    dy, x, weight, mean, rstd, a, bw, e = saved
    need_ddy, need_dx, need_dw = needs
    mask = (need_ddy, need_dx, need_dw and weight is not None and a is not None)
    if not any(mask):
        return None, None, None
    fixed = [dy, x, weight, a, bw, e]
    where = [i for i, p in enumerate(fixed) if p is not None]
    primals = tuple(fixed[i] for i in where)
    tans = tuple(torch.zeros_like(fixed[i]) if tangents[i] is None else tangents[i].to(fixed[i].dtype) for i in where)
    fn = plain_bwd_bwd_in(fixed, where, mean, rstd, call, mask)
    _, out_t = torch.func.jvp(fn, primals, tans)
    return tuple(scatter(out_t, mask))


# ------------------------------------------------------------------------------------ batching


def _batch_first(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(size, *t.shape)


def _fold(t: Tensor, dim: int | None, size: int) -> Tensor:
    """[B, M, ...] (batch at ``dim``, or broadcast when unbatched) -> [B*M, ...], unit stride along the last dim
    (what the kernels read)."""
    t = _batch_first(t, dim, size)
    t = t.reshape(-1, *t.shape[2:])
    return t.contiguous() if t.shape[-1] > 1 and t.stride(-1) != 1 else t


def _rows_batched(t: Tensor | None, dim: int | None) -> Tensor | None:
    """A per-row tensor (x, dy, mean, rstd, ...) with its batch dim first; unbatched ones broadcast as they are."""
    return None if t is None or dim is None else t.movedim(dim, 0)


def _columns_batched(t: Tensor | None, dim: int | None) -> Tensor | None:
    """A weight-like vector ``[N]``: batched ones become ``[B, 1, N]`` to broadcast over the rows."""
    return None if t is None or dim is None else t.movedim(dim, 0).unsqueeze(-2)


def _batched(t, dim, column: bool):
    if t is None or dim is None:
        return t
    return _columns_batched(t, dim) if column else _rows_batched(t, dim)


def _out_dim(t: Tensor | None, per_entry_dims: int) -> int | None:
    return None if t is None or t.dim() == per_entry_dims else 0


def _broadcast_plain(fn, args, dims, columns, out_ranks):
    """``fn`` (a plain twin) on the whole batch at once: the eager formulas broadcast over a leading batch dim
    (rows ``[B, M, N]``, vectors ``[B, 1, N]``), so this is vectorised PyTorch, no loop and no nested vmap
    (which the registered ops' batching rules cannot host)."""
    outs = fn(*(_batched(t, d, c) for t, d, c in zip(args, dims, columns)))
    return list(outs), tuple(_out_dim(o, r) for o, r in zip(outs, out_ranks))


def fwd_rule(fused, size, in_dims, tensors, eps, call, out_dtype):
    """Batching rule of the forward stage: ``((y, mean, rstd), out_dims)``. ``tensors``: (x, weight, bias)
    with their ``in_dims``; ``fused(x, weight, bias, eps, call)`` the stage on unbatched tensors."""
    x, weight, bias = tensors
    x_dim, w_dim, b_dim = in_dims
    if w_dim is None and b_dim is None:
        rows = _fold(x, x_dim, size)
        M, N = (x.shape[:x_dim] + x.shape[x_dim + 1:]) if x_dim is not None else x.shape
        y, mean, rstd = fused(rows, weight, bias, eps, call)
        return (y.view(size, M, N), mean.view(size, 0 if call.spec.is_rms else M), rstd.view(size, M)), (0, 0, 0)

    def fn(x, w, b):
        return plain_fwd(x, w, b, eps, call, out_dtype)
    outs, dims = _broadcast_plain(fn, tensors, in_dims, (False, True, True), (2, 1, 1))
    return tuple(outs), dims


def bwd_rule(fused, size, in_dims, tensors, call, needs):
    """Batching rule of the backward stage: ``([dx, dw, db], out_dims)``, None for what was not asked.
    ``tensors``: (dy, x, weight, mean, rstd) with their ``in_dims``; ``fused`` takes them, then call, needs."""
    dy, x, weight, mean, rstd = tensors
    dims = in_dims
    need_dx, need_dw, need_db = needs
    need_dw = need_dw and weight is not None
    fused_dx = need_dx and dims[2] is None
    dx = None
    if fused_dx:  # dx is row-wise: the batch folds into the rows, one fused call
        dy_r, x_r, mean_r, rstd_r = (_fold(t, d, size) for t, d in zip((dy, x, mean, rstd), dims[:2] + dims[3:]))
        dx = fused(dy_r, x_r, weight, mean_r, rstd_r, call, (True, False, False))[0]
        dx = dx.view(size, x_r.shape[0] // size, x_r.shape[-1])
    rest = [None, None, None]
    rest_dims = (None, None, None)
    if (need_dx and not fused_dx) or need_dw or need_db:
        def fn(dy, x, w, mean, rstd):
            return plain_bwd(dy, x, w, mean, rstd, call, (need_dx and not fused_dx, need_dw, need_db))
        rest, rest_dims = _broadcast_plain(fn, tensors, dims, (False, False, True, False, False), (2, 1, 1))
    if fused_dx:
        rest[0], rest_dims = dx, (0,) + rest_dims[1:]
    return rest, rest_dims


def bwd_bwd_rule(fused, size, in_dims, tensors, call, needs):
    """Batching rule of the double backward: ``([d_dy, d_x, d_w], out_dims)``. ``tensors``: (dy, x, weight,
    mean, rstd, grad_dx, grad_dw, grad_db) with their ``in_dims``; ``fused`` takes them, then call, needs."""
    dy, x, weight, mean, rstd, grad_dx, grad_dw, grad_db = tensors
    dims = in_dims
    need_ddy, need_dx, need_dw = needs
    need_dw = need_dw and weight is not None and grad_dx is not None
    foldable = dims[2] is None and dims[6] is None and dims[7] is None
    d_dy = d_x = None
    if foldable and (need_ddy or need_dx):
        rows = [_fold(t, d, size) for t, d in ((dy, dims[0]), (x, dims[1]), (mean, dims[3]), (rstd, dims[4]))]
        a_r = None if grad_dx is None else _fold(grad_dx, dims[5], size)
        d_dy, d_x, _ = fused(rows[0], rows[1], weight, rows[2], rows[3], a_r, grad_dw, grad_db, call,
                             (need_ddy, need_dx, False))
        M, N = rows[1].shape[0] // size, rows[1].shape[-1]
        d_dy = d_dy.view(size, M, N) if need_ddy else None
        d_x = d_x.view(size, M, N) if need_dx else None
    rest_mask = (need_ddy and not foldable, need_dx and not foldable, need_dw)
    rest, rest_dims = [None, None, None], (None, None, None)
    if any(rest_mask):
        def fn(dy, x, w, mean, rstd, a, bw, e):
            return plain_bwd_bwd(dy, x, w, mean, rstd, a, bw, e, call, rest_mask)
        rest, rest_dims = _broadcast_plain(fn, tensors, dims, (False, False, True, False, False, False, True, True),
                                           (2, 2, 1))
    if foldable:
        rest[0], rest[1] = d_dy, d_x
        rest_dims = (None if d_dy is None else 0, None if d_x is None else 0, rest_dims[2])
    return rest, rest_dims
