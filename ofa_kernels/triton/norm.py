"""Triton RMSNorm / LayerNorm: forward, backward with in-kernel weight gradient, double backward.

What is fused: statistics, normalisation and the affine in one forward pass; dx, dW and dB in one
backward pass; all three second-order outputs (d dy, d x, d W) in one double-backward pass.
The maths and its notation are in ``ofa_kernels/eager/norm.py``; the names here follow it.

Key choices:
- One kernel per pass for both norms (``IS_RMS``); rows of any stride (last-dim stride 1),
  64-bit row offsets, ``BLOCK_M`` rows per program for narrow rows.
- Rows up to ``MAX_BLOCK_N`` live in registers (one read of each input). Wider rows loop over
  column chunks and read the inputs again (two or three passes): any width works, wide rows cost
  more traffic.
- Backward and double backward run a persistent grid: each program owns a strided set of row
  tiles, accumulates dW/dB in fp32 registers and writes one fp32 partial row. The partials are summed
  in a fixed order: by the program that finishes last (it takes the last ticket of a counter, sums
  every partial row and resets the counter), so a small backward is one launch; or, where the partials
  are many (one program reading them all would be slow), by a separate ``sum``. Either way dW is
  bitwise identical run to run. (Looped path: the partial row is updated in place in global memory,
  still owned by one program.)
- Arithmetic in fp32 (fp64 for fp64 inputs, so gradcheck can test these kernels directly).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..precision import CAST_CODE, NormSpec, acc_dtype
from . import tuning
from .grid import cdiv, next_power_of_2
from .launch import Launcher, pointer_or

MAX_BLOCK_N = 16384
# The backward kernels take rows wider than this in chunks of it (the looped path) unless a knob says
# otherwise. Read off ptxas (benchmarks/kernel_resources.py, sm_90; not yet timed): in one 16384-column
# pass they spill 120 B to 3 KB per thread at the default warps (16: at most 128 registers each), in
# 8192-column chunks none, at 90-150 registers (bwd, 8 warps) and 91-118 (bwd_bwd, 16 warps).
BACKWARD_MAX_BLOCK_N = 8192
# Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest even); round in software there.
CAST_LLAMA = tl.constexpr(CAST_CODE["llama"])  # the cast rule that rounds the normalised row first
_SOFT_BF16_RNE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def cast_to(x, DTYPE: tl.constexpr):
    """x.to(DTYPE) with round-to-nearest-even on every target (x is fp32 or fp64)."""
    if _SOFT_BF16_RNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def _tile(rows_start, M, N, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (int64), column indices and the in-bounds mask of one [BLOCK_M, BLOCK_N] tile."""
    rows = rows_start + tl.arange(0, BLOCK_M)
    cols = col_start + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64), cols, mask


@triton.jit
def _load(ptr, rows, stride, cols, mask, ACC: tl.constexpr):
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _load_vec(ptr, cols, N, ACC: tl.constexpr):
    return tl.load(ptr + cols, mask=cols < N, other=0.0).to(ACC)


@triton.jit
def _div_n(s, N):
    """Row sum -> row mean. IEEE division: fp32 `/` is approximate on GPUs (u - sum(u)/1 != 0)."""
    if s.dtype == tl.float32:  # N may arrive as a constexpr int (Triton specialises N == 1)
        return tl.fdiv(s, tl.zeros_like(s) + N, ieee_rounding=True)
    return s / N


@triton.jit
def _xhat(x, mean, rstd, mask, IS_RMS: tl.constexpr):
    if IS_RMS:
        return x * rstd[:, None]
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _row_stats(Mean, Rstd, row0, M, BLOCK_M: tl.constexpr, IS_RMS: tl.constexpr):
    """Saved (mean, rstd) of rows row0 .. row0 + BLOCK_M (mean is a placeholder for RMSNorm)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    rstd = tl.load(Rstd + rows, mask=rows < M, other=0.0)
    mean = rstd
    if not IS_RMS:
        mean = tl.load(Mean + rows, mask=rows < M, other=0.0)
    return mean, rstd


# ----------------------------------------------------------------------------------- forward


@triton.jit
def _affine(xhat, W, B, cols, N, offset, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            CAST_MODE: tl.constexpr, IN_DTYPE: tl.constexpr, ACC: tl.constexpr):
    y = xhat
    if HAS_W:
        g = _load_vec(W, cols, N, ACC) + offset
        if CAST_MODE == CAST_LLAMA:  # round xhat to the input dtype, then multiply
            y = cast_to(xhat, IN_DTYPE).to(ACC) * g[None, :]
        else:
            y = xhat * g[None, :]
    if HAS_B:
        y = y + _load_vec(B, cols, N, ACC)[None, :]
    return y


@triton.jit
def _norm_fwd_kernel(
    X, Y, W, B, Mean, Rstd,  # x, y: [M, N] row-strided; w, b: [N]; mean, rstd: [M] (acc dtype)
    stride_x, stride_y, M, N, eps, offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, CAST_MODE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    rows, cols, mask = _tile(row0, M, N, 0, BLOCK_M, BLOCK_N)
    row_mask = (row0 + tl.arange(0, BLOCK_M)) < M
    in_dtype = X.dtype.element_ty
    mean = tl.zeros([BLOCK_M], ACC)
    if SINGLE_PASS:
        x = _load(X, rows, stride_x, cols, mask, ACC)
        if not IS_RMS:
            mean = _div_n(tl.sum(x, axis=1), N)
        xc = _xhat(x, mean, tl.full([BLOCK_M], 1.0, ACC), mask, IS_RMS)
        rstd = tl.rsqrt(_div_n(tl.sum(xc * xc, axis=1), N) + eps)
        y = _affine(xc * rstd[:, None], W, B, cols, N, offset, HAS_W, HAS_B, CAST_MODE, in_dtype, ACC)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_to(y, Y.dtype.element_ty), mask=mask)
    else:
        ones = tl.full([BLOCK_M], 1.0, ACC)
        if not IS_RMS:
            for c0 in range(0, N, BLOCK_N):
                rows, cols, mask = _tile(row0, M, N, c0, BLOCK_M, BLOCK_N)
                mean += tl.sum(_load(X, rows, stride_x, cols, mask, ACC), axis=1)
            mean = _div_n(mean, N)
        sq = tl.zeros([BLOCK_M], ACC)
        for c0 in range(0, N, BLOCK_N):
            rows, cols, mask = _tile(row0, M, N, c0, BLOCK_M, BLOCK_N)
            xc = _xhat(_load(X, rows, stride_x, cols, mask, ACC), mean, ones, mask, IS_RMS)
            sq += tl.sum(xc * xc, axis=1)
        rstd = tl.rsqrt(_div_n(sq, N) + eps)
        for c0 in range(0, N, BLOCK_N):
            rows, cols, mask = _tile(row0, M, N, c0, BLOCK_M, BLOCK_N)
            xhat = _xhat(_load(X, rows, stride_x, cols, mask, ACC), mean, rstd, mask, IS_RMS)
            y = _affine(xhat, W, B, cols, N, offset, HAS_W, HAS_B, CAST_MODE, in_dtype, ACC)
            tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_to(y, Y.dtype.element_ty), mask=mask)
    r = row0 + tl.arange(0, BLOCK_M)
    if not IS_RMS:
        tl.store(Mean + r, mean, mask=row_mask)
    tl.store(Rstd + r, rstd, mask=row_mask)


# ---------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_row_sums(dy, xhat, W, cols, N, offset, HAS_W: tl.constexpr, ACC: tl.constexpr):
    """Per-row sums of u = g*dy and u*xhat over one chunk."""
    u = dy
    if HAS_W:
        u = dy * (_load_vec(W, cols, N, ACC) + offset)[None, :]
    return tl.sum(u, axis=1), tl.sum(u * xhat, axis=1)


@triton.jit
def _bwd_dx(dy, xhat, rstd, sum_u, sum_uxhat, W, cols, N, offset,
            IS_RMS: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr):
    u = dy
    if HAS_W:
        u = dy * (_load_vec(W, cols, N, ACC) + offset)[None, :]
    t = u - _div_n(sum_uxhat, N)[:, None] * xhat
    if not IS_RMS:
        t = t - _div_n(sum_u, N)[:, None]
    return t * rstd[:, None]


@triton.jit
def _takes_last_ticket(Counter, n_progs):
    """Called once by every program after writing its partial rows: True for the one that finishes last
    (every other program's rows are then written and visible to it)."""
    tl.debug_barrier()  # every thread's partial-row stores precede the ticket (released by the atomic)
    return tl.atomic_add(Counter, 1, sem="acq_rel") == n_progs - 1


@triton.jit
def _sum_partials(Part, Out, n_progs, N, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """``Out[:] = Part.sum(0)`` for ``Part`` [n_progs, N], in a fixed order (bitwise repeatable), rounded
    once to Out's dtype (the parameter's: no cast launch after the backward)."""
    ROWS: tl.constexpr = max(1, 4096 // BLOCK_N)  # partial rows read per step
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        total = tl.zeros([BLOCK_N], ACC)
        for r0 in range(0, n_progs, ROWS):
            r = r0 + tl.arange(0, ROWS)
            m = (r[:, None] < n_progs) & (cols[None, :] < N)
            rows = tl.load(Part + r[:, None].to(tl.int64) * N + cols[None, :], mask=m, other=0.0,
                           cache_modifier=".cg")  # written by other programs: read past this SM's L1
            total += tl.sum(rows, axis=0)
        tl.store(Out + cols, cast_to(total, Out.dtype.element_ty), mask=cols < N)


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, Mean, Rstd,  # inputs; dy, x: [M, N] row-strided
    DX, DW_part, DB_part,  # dx: [M, N] contiguous; partials: [num_programs, N] fp32/fp64
    DW, DB, Counter,  # REDUCE: the summed dW, dB ([N], accumulation dtype) and the ticket counter
    stride_dy, stride_x, stride_dx, M, N, n_tiles, n_progs, offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, CAST_MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr, REDUCE: tl.constexpr,
):
    pid = tl.program_id(0)
    in_dtype = X.dtype.element_ty
    part = pid.to(tl.int64) * N
    if SINGLE_PASS:
        dw_acc = tl.zeros([BLOCK_N], ACC)
        db_acc = tl.zeros([BLOCK_N], ACC)
        for tile in range(pid, n_tiles, n_progs):
            rows, cols, mask = _tile(tile * BLOCK_M, M, N, 0, BLOCK_M, BLOCK_N)
            mean, rstd = _row_stats(Mean, Rstd, tile * BLOCK_M, M, BLOCK_M, IS_RMS)
            xhat = _xhat(_load(X, rows, stride_x, cols, mask, ACC), mean, rstd, mask, IS_RMS)
            dy = _load(DY, rows, stride_dy, cols, mask, ACC)
            if NEED_DX:
                s_u, s_ux = _bwd_row_sums(dy, xhat, W, cols, N, offset, HAS_W, ACC)
                dx = _bwd_dx(dy, xhat, rstd, s_u, s_ux, W, cols, N, offset, IS_RMS, HAS_W, ACC)
                tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast_to(dx, DX.dtype.element_ty), mask=mask)
            if NEED_DW:
                if CAST_MODE == CAST_LLAMA:
                    dw_acc += tl.sum(dy * cast_to(xhat, in_dtype).to(ACC), axis=0)
                else:
                    dw_acc += tl.sum(dy * xhat, axis=0)
            if NEED_DB:
                db_acc += tl.sum(dy, axis=0)
        cols = tl.arange(0, BLOCK_N)
        if NEED_DW:
            tl.store(DW_part + part + cols, dw_acc, mask=cols < N)
        if NEED_DB:
            tl.store(DB_part + part + cols, db_acc, mask=cols < N)
    else:
        for tile in range(pid, n_tiles, n_progs):
            rows, cols, mask = _tile(tile * BLOCK_M, M, N, 0, BLOCK_M, BLOCK_N)
            mean, rstd = _row_stats(Mean, Rstd, tile * BLOCK_M, M, BLOCK_M, IS_RMS)
            s_u = tl.zeros([BLOCK_M], ACC)
            s_ux = tl.zeros([BLOCK_M], ACC)
            if NEED_DX:
                for c0 in range(0, N, BLOCK_N):
                    rows, cols, mask = _tile(tile * BLOCK_M, M, N, c0, BLOCK_M, BLOCK_N)
                    xhat = _xhat(_load(X, rows, stride_x, cols, mask, ACC), mean, rstd, mask, IS_RMS)
                    dy = _load(DY, rows, stride_dy, cols, mask, ACC)
                    a, b = _bwd_row_sums(dy, xhat, W, cols, N, offset, HAS_W, ACC)
                    s_u += a
                    s_ux += b
            for c0 in range(0, N, BLOCK_N):
                rows, cols, mask = _tile(tile * BLOCK_M, M, N, c0, BLOCK_M, BLOCK_N)
                xhat = _xhat(_load(X, rows, stride_x, cols, mask, ACC), mean, rstd, mask, IS_RMS)
                dy = _load(DY, rows, stride_dy, cols, mask, ACC)
                if NEED_DX:
                    dx = _bwd_dx(dy, xhat, rstd, s_u, s_ux, W, cols, N, offset, IS_RMS, HAS_W, ACC)
                    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast_to(dx, DX.dtype.element_ty), mask=mask)
                if NEED_DW:
                    xw = xhat
                    if CAST_MODE == CAST_LLAMA:
                        xw = cast_to(xhat, in_dtype).to(ACC)
                    p = DW_part + part + cols
                    tl.store(p, tl.load(p, mask=cols < N) + tl.sum(dy * xw, axis=0), mask=cols < N)
                if NEED_DB:
                    p = DB_part + part + cols
                    tl.store(p, tl.load(p, mask=cols < N) + tl.sum(dy, axis=0), mask=cols < N)
    if REDUCE:
        if _takes_last_ticket(Counter, n_progs):
            if NEED_DW:
                _sum_partials(DW_part, DW, n_progs, N, ACC, BLOCK_N)
            if NEED_DB:
                _sum_partials(DB_part, DB, n_progs, N, ACC, BLOCK_N)
            tl.atomic_xchg(Counter, 0)  # ready for the next launch on this stream


# --------------------------------------------------------------------------- double backward


@triton.jit
def _bb_chunk(DY, X, W, A, BW, rows, cols, mask, mean, rstd, stride_dy, stride_x, stride_a, N,
              offset, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_A: tl.constexpr,
              HAS_BW: tl.constexpr, ACC: tl.constexpr):
    """Loads one chunk and forms xhat, dy, u = g*dy, a (cotangent of dx), w2 = bw*dy."""
    xhat = _xhat(_load(X, rows, stride_x, cols, mask, ACC), mean, rstd, mask, IS_RMS)
    dy = _load(DY, rows, stride_dy, cols, mask, ACC)
    g = tl.full([1, 1], 1.0, ACC)
    if HAS_W:
        g = (_load_vec(W, cols, N, ACC) + offset)[None, :]
    a = xhat * 0
    if HAS_A:
        a = _load(A, rows, stride_a, cols, mask, ACC)
    w2 = xhat * 0
    if HAS_BW:
        w2 = dy * _load_vec(BW, cols, N, ACC)[None, :]
    return xhat, dy, g, dy * g, a, w2


@triton.jit
def _bb_sums(xhat, u, a, w2):
    """Row sums needed by the double backward: u, u*xhat, a, a*xhat, a*u, w2, w2*xhat."""
    return (tl.sum(u, axis=1), tl.sum(u * xhat, axis=1), tl.sum(a, axis=1), tl.sum(a * xhat, axis=1),
            tl.sum(a * u, axis=1), tl.sum(w2, axis=1), tl.sum(w2 * xhat, axis=1))


@triton.jit
def _bb_outputs(xhat, dy, g, u, a, w2, rstd, s_u, s_ux, s_a, s_ax, s_au, s_w2, s_w2x, BW, E,
                cols, N, IS_RMS: tl.constexpr, HAS_BW: tl.constexpr, HAS_E: tl.constexpr,
                ACC: tl.constexpr):
    r = rstd[:, None]
    c2 = _div_n(s_ux, N)[:, None]
    ca = _div_n(s_ax, N)[:, None]
    mau = _div_n(s_au, N)[:, None]
    cb = _div_n(s_w2x, N)[:, None]
    if IS_RMS:
        ma = 0.0
        mu = 0.0
        mw2 = 0.0
    else:
        ma = _div_n(s_a, N)[:, None]
        mu = _div_n(s_u, N)[:, None]
        mw2 = _div_n(s_w2, N)[:, None]
    ja = r * (a - ma - ca * xhat)
    d_dy = ja * g
    if HAS_BW:
        d_dy += _load_vec(BW, cols, N, ACC)[None, :] * xhat
    if HAS_E:
        d_dy += _load_vec(E, cols, N, ACC)[None, :]
    d_x = r * r * ((3.0 * ca * c2 - mau + ma * mu) * xhat - c2 * (a - ma) - ca * (u - mu))
    d_x += r * (w2 - mw2 - cb * xhat)
    return d_dy, d_x, dy * ja


@triton.jit
def _norm_bwd_bwd_kernel(
    DY, X, W, Mean, Rstd, A, BW, E,  # dy, x, a: [M, N] row-strided; w, bw, e: [N]
    D_DY, D_X, DW_part,  # d_dy, d_x: [M, N] contiguous; partials: [num_programs, N]
    DW, Counter,  # REDUCE: the summed d_w ([N], accumulation dtype) and the ticket counter
    stride_dy, stride_x, stride_a, stride_ddy, stride_dx, M, N, n_tiles, n_progs, offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_A: tl.constexpr, HAS_BW: tl.constexpr,
    HAS_E: tl.constexpr, NEED_DDY: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    REDUCE: tl.constexpr,
):
    pid = tl.program_id(0)
    part = pid.to(tl.int64) * N
    dw_acc = tl.zeros([BLOCK_N], ACC)
    for tile in range(pid, n_tiles, n_progs):
        rows, cols, mask = _tile(tile * BLOCK_M, M, N, 0, BLOCK_M, BLOCK_N)
        mean, rstd = _row_stats(Mean, Rstd, tile * BLOCK_M, M, BLOCK_M, IS_RMS)
        if SINGLE_PASS:
            xhat, dy, g, u, a, w2 = _bb_chunk(DY, X, W, A, BW, rows, cols, mask, mean, rstd, stride_dy,
                                              stride_x, stride_a, N, offset, IS_RMS, HAS_W, HAS_A, HAS_BW, ACC)
            s_u, s_ux, s_a, s_ax, s_au, s_w2, s_w2x = _bb_sums(xhat, u, a, w2)
        else:
            s_u = tl.zeros([BLOCK_M], ACC)
            s_ux = tl.zeros([BLOCK_M], ACC)
            s_a = tl.zeros([BLOCK_M], ACC)
            s_ax = tl.zeros([BLOCK_M], ACC)
            s_au = tl.zeros([BLOCK_M], ACC)
            s_w2 = tl.zeros([BLOCK_M], ACC)
            s_w2x = tl.zeros([BLOCK_M], ACC)
            for c0 in range(0, N, BLOCK_N):
                rows, cols, mask = _tile(tile * BLOCK_M, M, N, c0, BLOCK_M, BLOCK_N)
                xhat, dy, g, u, a, w2 = _bb_chunk(DY, X, W, A, BW, rows, cols, mask, mean, rstd, stride_dy,
                                                  stride_x, stride_a, N, offset, IS_RMS, HAS_W, HAS_A, HAS_BW, ACC)
                t_u, t_ux, t_a, t_ax, t_au, t_w2, t_w2x = _bb_sums(xhat, u, a, w2)
                s_u += t_u
                s_ux += t_ux
                s_a += t_a
                s_ax += t_ax
                s_au += t_au
                s_w2 += t_w2
                s_w2x += t_w2x
        for c0 in range(0, N, BLOCK_N):  # one iteration on the register path (N <= BLOCK_N)
            rows, cols, mask = _tile(tile * BLOCK_M, M, N, c0, BLOCK_M, BLOCK_N)
            if not SINGLE_PASS:
                xhat, dy, g, u, a, w2 = _bb_chunk(DY, X, W, A, BW, rows, cols, mask, mean, rstd, stride_dy,
                                                  stride_x, stride_a, N, offset, IS_RMS, HAS_W, HAS_A, HAS_BW, ACC)
            d_dy, d_x, dw_rows = _bb_outputs(xhat, dy, g, u, a, w2, rstd, s_u, s_ux, s_a, s_ax, s_au, s_w2,
                                             s_w2x, BW, E, cols, N, IS_RMS, HAS_BW, HAS_E, ACC)
            if NEED_DDY:
                tl.store(D_DY + rows[:, None] * stride_ddy + cols[None, :], cast_to(d_dy, D_DY.dtype.element_ty), mask=mask)
            if NEED_DX:
                tl.store(D_X + rows[:, None] * stride_dx + cols[None, :], cast_to(d_x, D_X.dtype.element_ty), mask=mask)
            if NEED_DW:
                if SINGLE_PASS:
                    dw_acc += tl.sum(dw_rows, axis=0)
                else:
                    p = DW_part + part + cols
                    tl.store(p, tl.load(p, mask=cols < N) + tl.sum(dw_rows, axis=0), mask=cols < N)
    if NEED_DW and SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        tl.store(DW_part + part + cols, dw_acc, mask=cols < N)
    if REDUCE and NEED_DW:
        if _takes_last_ticket(Counter, n_progs):
            _sum_partials(DW_part, DW, n_progs, N, ACC, BLOCK_N)
            tl.atomic_xchg(Counter, 0)  # ready for the next launch on this stream


# --------------------------------------------------------------------------------- launchers


_launch_fwd = Launcher(_norm_fwd_kernel)
_launch_bwd = Launcher(_norm_bwd_kernel)
_launch_bwd_bwd = Launcher(_norm_bwd_bwd_kernel)
LAUNCHERS = {"fwd": _launch_fwd, "bwd": _launch_bwd, "bwd_bwd": _launch_bwd_bwd}  # for static reports


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Elements of a [BLOCK_M, BLOCK_N] tile per warp, by kernel: the default rule where the measured table
# (``tuning.py``) has no entry, chosen to reproduce the launcher sweep's winners at width 4096 (RESULTS.md,
# "Launcher sweep").
_ELEMS_PER_WARP = {"fwd": 1024, "bwd": 2048, "bwd_bwd": 512}
# A register cap the 4096-wide rule does not see: the backward kernels keep fp32 dW (and dB)
# accumulators of BLOCK_N columns across their whole row loop, spread over the program's threads; at
# most _ACC_PER_THREAD each (the 4096 winner's count). Reasoned from the LayerNorm backward at 8192
# columns (RESULTS.md, "What the compiler made of each kernel"); not yet swept at 8192.
_ACC_PER_THREAD = 32


def default_warps(kernel: str, block_m: int, block_n: int) -> int:
    """Warps for a ``block_m`` x ``block_n`` tile when nothing was measured: the elements-per-warp rule,
    and for the backward kernels at least enough warps to hold the weight-gradient accumulators."""
    warps = block_m * block_n // _ELEMS_PER_WARP[kernel]
    if kernel == "bwd":
        warps = max(warps, block_n // (32 * _ACC_PER_THREAD))
    return max(1, min(16, next_power_of_2(warps)))


def _config(x: torch.Tensor, kernel: str, max_block_n: int | None, rows_per_program: int | None,
            num_warps: int | None = None, programs_per_sm: int | None = None):
    """Block sizes, single/looped path, warps and the persistent grid size for an [M, N] input.

    Each knob comes from the launcher's keyword argument (benchmarks/tune_norm.py), else from the
    measured table for this GPU, kernel, dtype and width, else from the default rule.
    """
    M, N = x.shape
    tuned = tuning.knobs(tuning.arch(x.device), kernel, x.dtype, N)
    if tuned:
        max_block_n = max_block_n or tuned.get("max_block_n")
        rows_per_program = rows_per_program or tuned.get("rows_per_program")
        num_warps = num_warps or tuned.get("num_warps")
        programs_per_sm = programs_per_sm or tuned.get("programs_per_sm")
    block_m, block_n, single, num_warps = tile(kernel, N, x.is_cuda, max_block_n, rows_per_program, num_warps)
    n_tiles = cdiv(M, block_m)
    persistent = _sm_count(x.device.index or 0) * (programs_per_sm or 2) if x.is_cuda else 4
    return block_m, block_n, single, num_warps, max(1, min(n_tiles, persistent))


def tile(kernel: str, N: int, on_gpu: bool = True, max_block_n: int | None = None,
         rows_per_program: int | None = None, num_warps: int | None = None) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, single pass, warps) of ``kernel`` ("fwd", "bwd", "bwd_bwd") for rows of ``N``:
    the knobs given, else the default rule (on a GPU, or for the interpreter)."""
    cap = min(max_block_n or (MAX_BLOCK_N if kernel == "fwd" else BACKWARD_MAX_BLOCK_N), MAX_BLOCK_N)
    block_n = min(next_power_of_2(N), next_power_of_2(cap))
    single = N <= block_n
    if rows_per_program is None:
        # Interpreter: each program costs milliseconds, so give it many rows.
        budget = 8192 if on_gpu else 16384
        rows_per_program = max(1, min(16 if on_gpu else 64, budget // block_n)) if single else 1
    block_m = next_power_of_2(rows_per_program)
    if num_warps is None:
        num_warps = default_warps(kernel, block_m, block_n)
    return block_m, block_n, single, num_warps


# Partial rows are summed inside the backward kernel (by its last program: no second launch) while they
# hold at most this many elements; beyond, one program reading them all would take longer than a
# separate ``sum`` launch. Set from the single-program read rate, not yet measured on a GPU:
# benchmarks/tune_norm.py sweeps it (``reduce_in_kernel=``).
IN_KERNEL_REDUCE_MAX = 1 << 19
_counters: dict[tuple[str, int, int], torch.Tensor] = {}


def _ticket_counter(device: torch.device) -> torch.Tensor | None:
    """The int32 counter the kernels' last-program reduction counts on: one per (device, stream), zero
    between launches (the last program resets it), so launches on one stream never share it at once.
    None while a CUDA graph is being captured on a stream that has none yet (it cannot be allocated
    outside the graph's pool then): that launch sums apart, which costs no host time in a graph."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device.type, device.index or 0, stream)
    counter = _counters.get(key)
    if counter is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counter = _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def _in_kernel(reduce_in_kernel: bool | None, x: torch.Tensor, kernel: str, n_progs: int) -> bool:
    """Launcher argument, else the measured table, else the size rule."""
    if reduce_in_kernel is None:
        reduce_in_kernel = tuning.knobs(tuning.arch(x.device), kernel, x.dtype, x.shape[1]).get("reduce_in_kernel")
    return n_progs * x.shape[1] <= IN_KERNEL_REDUCE_MAX if reduce_in_kernel is None else reduce_in_kernel


def acc_tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def norm_fwd(x, weight, bias, eps, spec: NormSpec, out_dtype, *, max_block_n=None, rows_per_program=None,
             num_warps=None):
    """x: [M, N] with x.stride(1) == 1. Returns (y, mean, rstd); mean is empty for RMSNorm."""
    offset, is_rms = spec.offset, spec.is_rms
    M, N = x.shape
    acc = acc_dtype(x.dtype)
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rstd = torch.empty(M, dtype=acc, device=x.device)
    mean = torch.empty(0 if is_rms else M, dtype=acc, device=x.device)
    if M == 0:
        return y, mean, rstd
    block_m, block_n, single, num_warps, _ = _config(x, "fwd", max_block_n, rows_per_program, num_warps)
    _launch_fwd(cdiv(M, block_m), num_warps,
                X=x, Y=y, W=pointer_or(weight, x), B=pointer_or(bias, x), Mean=rstd if is_rms else mean, Rstd=rstd,
                stride_x=x.stride(0), stride_y=y.stride(0), M=M, N=N, eps=eps, offset=offset,
                IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, CAST_MODE=spec.cast_code,
                ACC=acc_tl_dtype(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single)
    return y, mean, rstd


def norm_bwd(dy, x, weight, mean, rstd, spec: NormSpec, needs, *, dw_dtype=None, db_dtype=None, max_block_n=None,
             rows_per_program=None, num_warps=None, programs_per_sm=None, reduce_in_kernel=None):
    """Returns (dx in x.dtype, dw, db); None where not needed (``needs``: dx, dw, db). Where the kernel sums
    the partials itself it writes dw/db in ``dw_dtype``/``db_dtype`` (the parameters'); a separate sum leaves
    them in the accumulation dtype, for the caller to cast. The other keywords fix launch knobs
    (``benchmarks/tune_norm.py``)."""
    need_dx, need_dw, need_db = needs
    offset, is_rms = spec.offset, spec.is_rms
    M, N = x.shape
    acc = acc_dtype(x.dtype)
    dw_dtype, db_dtype = dw_dtype or acc, db_dtype or acc
    block_m, block_n, single, num_warps, n_progs = _config(x, "bwd", max_block_n, rows_per_program, num_warps,
                                                           programs_per_sm)
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device) if need_dx else None
    if M == 0:
        return dx, x.new_zeros(N, dtype=acc) if need_dw else None, x.new_zeros(N, dtype=acc) if need_db else None
    reduce = (need_dw or need_db) and _in_kernel(reduce_in_kernel, x, "bwd", n_progs)
    counter = _ticket_counter(x.device) if reduce else None
    reduce = counter is not None
    dw_part = _partials(need_dw, single, n_progs, N, acc, x.device)
    db_part = _partials(need_db, single, n_progs, N, acc, x.device)
    dw = torch.empty(N, dtype=dw_dtype, device=x.device) if reduce and need_dw else None
    db = torch.empty(N, dtype=db_dtype, device=x.device) if reduce and need_db else None
    _launch_bwd(n_progs, num_warps,
                DY=dy, X=x, W=pointer_or(weight, x), Mean=rstd if is_rms else mean, Rstd=rstd,
                DX=pointer_or(dx, x), DW_part=pointer_or(dw_part, rstd), DB_part=pointer_or(db_part, rstd),
                DW=pointer_or(dw, rstd), DB=pointer_or(db, rstd), Counter=pointer_or(counter, rstd),
                stride_dy=dy.stride(0), stride_x=x.stride(0), stride_dx=N if need_dx else 0, M=M, N=N,
                n_tiles=cdiv(M, block_m), n_progs=n_progs, offset=offset,
                IS_RMS=is_rms, HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
                CAST_MODE=spec.cast_code, ACC=acc_tl_dtype(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                SINGLE_PASS=single, REDUCE=reduce)
    if not reduce:
        dw, db = _reduce(dw_part), _reduce(db_part)
    return dx, dw, db


def norm_bwd_bwd(dy, x, weight, mean, rstd, cotangents, spec: NormSpec, needs, *, max_block_n=None,
                 rows_per_program=None, num_warps=None, programs_per_sm=None, reduce_in_kernel=None):
    """Returns (d_dy in dy.dtype, d_x in x.dtype, d_w in the accumulation dtype); ``cotangents``: (grad_dx,
    grad_dw, grad_db), ``needs``: d_dy, d_x, d_w; reads ``spec.is_rms`` and ``spec.offset``."""
    grad_dx, grad_dw, grad_db = cotangents
    need_ddy, need_dx, need_dw = needs
    offset, is_rms = spec.offset, spec.is_rms
    M, N = x.shape
    acc = acc_dtype(x.dtype)
    block_m, block_n, single, num_warps, n_progs = _config(x, "bwd_bwd", max_block_n, rows_per_program, num_warps,
                                                           programs_per_sm)
    need_dw = need_dw and grad_dx is not None
    d_dy = torch.empty((M, N), dtype=dy.dtype, device=x.device) if need_ddy else None
    d_x = torch.empty((M, N), dtype=x.dtype, device=x.device) if need_dx else None
    if M == 0 or not (need_ddy or need_dx or need_dw):
        return d_dy, d_x, x.new_zeros(N, dtype=acc) if need_dw else None
    reduce = need_dw and _in_kernel(reduce_in_kernel, x, "bwd_bwd", n_progs)
    counter = _ticket_counter(x.device) if reduce else None
    reduce = counter is not None
    dw_part = _partials(need_dw, single, n_progs, N, acc, x.device)
    d_w = torch.empty(N, dtype=acc, device=x.device) if reduce else None
    _launch_bwd_bwd(n_progs, num_warps,
                    DY=dy, X=x, W=pointer_or(weight, x), Mean=rstd if is_rms else mean, Rstd=rstd,
                    A=pointer_or(grad_dx, x), BW=pointer_or(grad_dw, x), E=pointer_or(grad_db, x),
                    D_DY=pointer_or(d_dy, x), D_X=pointer_or(d_x, x), DW_part=pointer_or(dw_part, rstd),
                    DW=pointer_or(d_w, rstd), Counter=pointer_or(counter, rstd),
                    stride_dy=dy.stride(0), stride_x=x.stride(0),
                    stride_a=grad_dx.stride(0) if grad_dx is not None else 0, stride_ddy=N, stride_dx=N, M=M, N=N,
                    n_tiles=cdiv(M, block_m), n_progs=n_progs, offset=offset,
                    IS_RMS=is_rms, HAS_W=weight is not None, HAS_A=grad_dx is not None, HAS_BW=grad_dw is not None,
                    HAS_E=grad_db is not None, NEED_DDY=need_ddy, NEED_DX=need_dx, NEED_DW=need_dw,
                    ACC=acc_tl_dtype(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single, REDUCE=reduce)
    if need_dw and not reduce:
        d_w = _reduce(dw_part)
    return d_dy, d_x, d_w


def _partials(needed, single, n_progs, N, dtype, device):
    """One fp32 (fp64) partial row per program; zeroed for the looped path, which accumulates in place."""
    if not needed:
        return None
    return (torch.empty if single else torch.zeros)((n_progs, N), dtype=dtype, device=device)


def _reduce(partials: torch.Tensor | None) -> torch.Tensor | None:
    """Sums the per-program partial rows in a fixed order (deterministic), in a launch of its own."""
    return None if partials is None else partials.sum(0)
