"""Closed-form RMSNorm/LayerNorm forward, backward and double backward in plain PyTorch.

This is the ``torch`` backend: what CPU tensors run when no compiled extension is built. Every
backend (this one, the Triton kernels, the C++/CUDA extension) implements the same three functions
on 2-D inputs (rows x width, last-dim stride 1), with fp32 statistics and fp32 arithmetic. These
also take a leading batch dim, broadcasting: rows ``[B, M, N]`` (statistics ``[B, M]``) and weight-like
vectors ``[N]`` or ``[B, 1, N]``, column sums ``[B, N]`` (the batching rules in ops/norm_vmap.py).

Notation, per row of width N: ``g = offset + w`` (1 without weight), ``r = rstd``,
``xhat = (x - mean) * r`` (mean = 0 for RMSNorm), ``y = g * xhat + b``, ``u = g * dy``.

Backward (VJP of y)::

    dx = r * (u - mean(u) - mean(u * xhat) * xhat)        # mean(u) term only for LayerNorm
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)

Double backward: the VJP of (dx, dw, db) above with respect to (dy, x, w), for cotangents
``a`` (of dx, per row), ``bw`` (of dw) and ``e`` (of db). With ``c2 = mean(u*xhat)``,
``mu = mean(u)``, ``ma = mean(a)``, ``ca = mean(a*xhat)``, ``mau = mean(a*u)``, ``w2 = bw*dy``,
``mw2 = mean(w2)``, ``cb = mean(w2*xhat)`` (all means of LayerNorm-only terms are 0 for RMSNorm)::

    ja   = r * (a - ma - ca * xhat)                       # the norm's Jacobian applied to a
    d_dy = g * ja + bw * xhat + e
    d_w  = sum_rows(dy * ja)
    d_x  = r^2 * ((3*ca*c2 - mau + ma*mu) * xhat - c2 * (a - ma) - ca * (u - mu))
           + r * (w2 - mw2 - cb * xhat)

The derivative of ``r`` (and ``mean``) with respect to x is inside d_x: the saved statistics are
never differentiated as if they were constants. Rounding in the "llama" cast (xhat rounded to the
input dtype before the weight multiply) is treated as the identity in derivatives, as autograd
does for HF's ``.to(dtype)``.
"""

from __future__ import annotations

import torch

from ..precision import NormSpec, acc_dtype

Tensor = torch.Tensor


def _xhat(x: Tensor, mean: Tensor, rstd: Tensor, is_rms: bool) -> Tensor:
    xs = x.to(acc_dtype(x.dtype))
    if not is_rms:
        xs = xs - mean[..., None]
    return xs * rstd[..., None]


def _gain(weight: Tensor | None, offset: float, acc: torch.dtype) -> Tensor | None:
    if weight is None:
        return None
    g = weight.to(acc)
    return g + offset if offset else g


def norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    spec: NormSpec,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y, mean, rstd)``; mean is empty for RMSNorm. Ops are ordered as HF's modules."""
    offset, is_rms, cast_mode = spec.offset, spec.is_rms, spec.cast_mode
    acc = acc_dtype(x.dtype)
    xs = x.to(acc)
    if is_rms:
        mean = xs.new_empty(0)
        rstd = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
        xhat = xs * rstd
    else:
        mean = xs.mean(-1, keepdim=True)
        xc = xs - mean
        rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        xhat = xc * rstd
        mean = mean.squeeze(-1)
    if weight is None:
        y = xhat
    elif cast_mode == "llama":
        g = weight + offset if offset else weight
        y = g * xhat.to(x.dtype)
    else:
        y = xhat * _gain(weight, offset, acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(out_dtype), mean, rstd.squeeze(-1)


def norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    spec: NormSpec,
    needs: tuple[bool, bool, bool],
    *,
    dw_dtype: torch.dtype | None = None,
    db_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Returns ``(dx, dw, db)``: dx in x's dtype, dw and db in the accumulation dtype; None where not needed
    (``needs``: dx, dw, db). ``dw_dtype``/``db_dtype`` (the parameters' dtypes) are for backends that write
    them directly; here the caller's cast does it."""
    need_dx, need_dw, need_db = needs
    offset, is_rms, cast_mode = spec.offset, spec.is_rms, spec.cast_mode
    acc = acc_dtype(x.dtype)
    dy32 = dy.to(acc)
    xhat = _xhat(x, mean, rstd, is_rms)
    dx = dw = db = None
    if need_dx:
        g = _gain(weight, offset, acc)
        u = dy32 * g if g is not None else dy32
        c2 = (u * xhat).mean(-1, keepdim=True)
        proj = u - c2 * xhat
        if not is_rms:
            proj = proj - u.mean(-1, keepdim=True)
        dx = (proj * rstd[..., None]).to(x.dtype)
    if need_dw:
        xw = xhat.to(x.dtype).to(acc) if cast_mode == "llama" else xhat
        dw = (dy32 * xw).sum(-2)
    if need_db:
        db = dy32.sum(-2)
    return dx, dw, db


def norm_bwd_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    cotangents: tuple[Tensor | None, Tensor | None, Tensor | None],
    spec: NormSpec,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Returns ``(d_dy, d_x, d_w)`` in dy's, x's and the accumulation dtype (see the module docstring);
    ``cotangents``: (grad_dx, grad_dw, grad_db), each may be None; ``needs``: d_dy, d_x, d_w. Reads
    ``spec.is_rms`` and ``spec.offset`` (the unrounded norm's second derivative)."""
    grad_dx, grad_dw, grad_db = cotangents
    need_ddy, need_dx, need_dw = needs
    offset, is_rms = spec.offset, spec.is_rms
    acc = acc_dtype(x.dtype)
    dy32 = dy.to(acc)
    xhat = _xhat(x, mean, rstd, is_rms)
    r = rstd[..., None]
    g = _gain(weight, offset, acc)
    u = dy32 * g if g is not None else dy32
    zeros = torch.zeros_like(xhat)
    a = grad_dx.to(acc) if grad_dx is not None else None
    w2 = dy32 * grad_dw.to(acc) if grad_dw is not None else None

    def mean_(t: Tensor) -> Tensor:
        return t.mean(-1, keepdim=True)

    ja = None
    if a is not None:
        ma = zeros[..., :1] if is_rms else mean_(a)
        ca = mean_(a * xhat)
        ja = r * (a - ma - ca * xhat)

    # Out of place throughout: under torch.vmap a term may be batched where the accumulator is not.
    d_dy = d_x = d_w = None
    if need_ddy:
        terms = [] if ja is None else [ja * g if g is not None else ja]
        if grad_dw is not None:
            terms.append(grad_dw.to(acc) * xhat)
        if grad_db is not None:
            terms.append(grad_db.to(acc) + zeros)
        d_dy = sum(terms[1:], terms[0]) if terms else zeros
    if need_dx:
        terms = []
        if a is not None:
            c2 = mean_(u * xhat)
            mu = zeros[..., :1] if is_rms else mean_(u)
            coef = 3 * ca * c2 - mean_(a * u) + ma * mu
            terms.append(r * r * (coef * xhat - c2 * (a - ma) - ca * (u - mu)))
        if w2 is not None:
            mw2 = zeros[..., :1] if is_rms else mean_(w2)
            terms.append(r * (w2 - mw2 - mean_(w2 * xhat) * xhat))
        d_x = sum(terms[1:], terms[0]) if terms else zeros
    if need_dw and ja is not None:
        d_w = (dy32 * ja).sum(-2)
    return (None if d_dy is None else d_dy.to(dy.dtype)), (None if d_x is None else d_x.to(x.dtype)), d_w
