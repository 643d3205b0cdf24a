"""Triton kernels for the sharpness probes: perturbation, probe rows and probe dot products.

Each kernel regenerates the probe ``nu`` from ``(keys, counter)`` with the counter-based generator
of ``ofa_kernels/rng.py`` (same bits; see there), so no probe tensor is ever stored. A leading probe
dimension K is folded into the rows: row ``r`` of a perturbed ``[K * rows_per_probe, N]`` input
belongs to probe ``r // rows_per_probe``. Arithmetic is fp32 (fp64 for fp64 inputs).

- ``probe_perturb``: ``y = x + s_r * gamma * nu`` (or the noise alone), with
  ``s_r = eps * rms(x_r)`` when scaling by the row RMS, else ``eps``; writes ``s_r`` too.
- ``probe_rows``: ``out_r = coef_r * gamma * nu_r`` for gathered rows (the dot's backward, HVP probes).
- ``probe_dot``: ``q_r = -nu_r . (a_r - b_r - (c - d)_{r mod C}) / s_r``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..precision import acc_dtype
from .grid import cdiv, next_power_of_2
from .launch import Launcher, pointer_or
from .norm import acc_tl_dtype, cast_to

MAX_WIDTH = 32768


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _bits(c, k0, k1):
    return _mix32(_mix32(c ^ k0) + k1)


@triton.jit
def _values(counters, k0, k1, GAUSSIAN: tl.constexpr):
    """Probe values (fp32) for int64 counters < 2**31 and uint32 keys (broadcast)."""
    c = counters.to(tl.uint32)
    if GAUSSIAN:
        a = _bits(2 * c, k0, k1)
        b = _bits(2 * c + 1, k0, k1)
        u1 = ((a >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
        u2 = (b >> 8).to(tl.float32) * 5.9604644775390625e-08
        return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
    return 1.0 - 2.0 * (_bits(c, k0, k1) >> 31).to(tl.float32)


@triton.jit
def _keys(Keys, probe, mask):
    k0 = tl.load(Keys + probe * 2, mask=mask, other=0).to(tl.uint32)
    k1 = tl.load(Keys + probe * 2 + 1, mask=mask, other=0).to(tl.uint32)
    return k0, k1


@triton.jit
def _perturb_kernel(X, Y, G, Scale, Keys, M, N, stride_x, stride_y, rows_per_probe, row_offset, eps,
                    SCALE_BY_RMS: tl.constexpr, ADD_X: tl.constexpr, GAUSSIAN: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if SCALE_BY_RMS:
        rms = tl.sqrt(tl.sum(x * x, 1) / N)
        scale = eps * tl.where(rms > 0, rms, 1.0)
    else:
        scale = tl.zeros([BLOCK_M], dtype=ACC) + eps
    probe = rows // rows_per_probe
    k0, k1 = _keys(Keys, probe, row_ok)
    counters = (rows - probe * rows_per_probe + row_offset)[:, None] * N + cols[None, :]
    nu = _values(counters, k0[:, None], k1[:, None], GAUSSIAN).to(ACC)
    g = tl.load(G + cols, mask=col_ok, other=0.0).to(ACC)
    y = scale[:, None] * g[None, :] * nu
    if ADD_X:
        y = x + y
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_to(y, Y.dtype.element_ty), mask=mask)
    tl.store(Scale + rows, scale, mask=row_ok)


@triton.jit
def _probe_rows_kernel(Out, Coef, G, Keys, Probe, Base, N,
                       HAS_G: tl.constexpr, GAUSSIAN: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k0, k1 = _keys(Keys, tl.load(Probe + r), True)
    nu = _values(tl.load(Base + r) + cols, k0, k1, GAUSSIAN).to(ACC)
    out = tl.load(Coef + r).to(ACC) * nu
    if HAS_G:
        out = out * tl.load(G + cols, mask=col_ok, other=0.0).to(ACC)
    tl.store(Out + r * N + cols, out, mask=col_ok)


@triton.jit
def _probe_dot_kernel(A, B, C, D, Scale, Keys, Probe, Base, Q, N, clean_rows,
                      HAS_CLEAN: tl.constexpr, GAUSSIAN: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k0, k1 = _keys(Keys, tl.load(Probe + r), True)
    nu = _values(tl.load(Base + r) + cols, k0, k1, GAUSSIAN).to(ACC)
    nu = tl.where(col_ok, nu, 0.0)
    scale = tl.load(Scale + r).to(ACC)
    delta = tl.load(A + r * N + cols, mask=col_ok, other=0.0).to(ACC) - tl.load(B + r * N + cols, mask=col_ok,
                                                                               other=0.0).to(ACC)
    if HAS_CLEAN:
        rc = r % clean_rows
        delta -= (tl.load(C + rc * N + cols, mask=col_ok, other=0.0).to(ACC)
                  - tl.load(D + rc * N + cols, mask=col_ok, other=0.0).to(ACC))
    tl.store(Q + r, -tl.sum(nu * delta, 0) / scale)


# --------------------------------------------------------------------------------- launchers

_launch_perturb = Launcher(_perturb_kernel)
_launch_rows = Launcher(_probe_rows_kernel)
_launch_dot = Launcher(_probe_dot_kernel)


def _block_n(N: int) -> int:
    if N > MAX_WIDTH:
        raise ValueError(f"probe kernels support rows up to {MAX_WIDTH} wide, got {N}")
    return next_power_of_2(N)


def _warps(elements: int) -> int:
    return max(1, min(16, elements // 1024))


def probe_perturb(x, gamma, eps, keys, rows_per_probe, distribution, scale_by_rms, add_x, row_offset=0, *,
                  rows_per_program=None):
    """x: [M, N] (last-dim stride 1). Returns (y in x.dtype, per-row scale in the accumulation dtype)."""
    M, N = x.shape
    block_n = _block_n(N)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    scale = torch.empty(M, dtype=acc_dtype(x.dtype), device=x.device)
    if M == 0:
        return y, scale
    if rows_per_program is None:
        rows_per_program = max(1, (4096 if x.is_cuda else 16384) // block_n)
    block_m = next_power_of_2(rows_per_program)
    _launch_perturb(cdiv(M, block_m), _warps(block_m * block_n),
                    X=x, Y=y, G=gamma, Scale=scale, Keys=keys, M=M, N=N, stride_x=x.stride(0), stride_y=y.stride(0),
                    rows_per_probe=rows_per_probe, row_offset=row_offset, eps=eps,
                    SCALE_BY_RMS=scale_by_rms, ADD_X=add_x, GAUSSIAN=distribution == "gaussian",
                    ACC=acc_tl_dtype(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n)
    return y, scale


def probe_rows(coef, gamma, keys, probe, base, N, distribution):
    """Gathered rows ``coef_r * gamma * nu_r``: [R, N] in coef's (accumulation) dtype."""
    R = coef.shape[0]
    out = torch.empty((R, N), dtype=coef.dtype, device=coef.device)
    if R:
        block_n = _block_n(N)
        _launch_rows(R, _warps(block_n), Out=out, Coef=coef, G=pointer_or(gamma, coef), Keys=keys, Probe=probe,
                     Base=base, N=N, HAS_G=gamma is not None, GAUSSIAN=distribution == "gaussian",
                     ACC=acc_tl_dtype(coef.dtype), BLOCK_N=block_n)
    return out


def probe_dot(a, b, c, d, scale, keys, probe, base, distribution):
    """q_r for gathered rows a, b: [R, N] and clean rows c, d: [C, N] or None. Returns [R]."""
    R, N = a.shape
    q = torch.empty(R, dtype=scale.dtype, device=a.device)
    if R:
        block_n = _block_n(N)
        has_clean = c is not None
        _launch_dot(R, _warps(block_n), A=a, B=b, C=pointer_or(c, a), D=pointer_or(d, a), Scale=scale, Keys=keys,
                    Probe=probe, Base=base, Q=q, N=N, clean_rows=c.shape[0] if has_clean else 1,
                    HAS_CLEAN=has_clean, GAUSSIAN=distribution == "gaussian", ACC=acc_tl_dtype(scale.dtype),
                    BLOCK_N=block_n)
    return q
