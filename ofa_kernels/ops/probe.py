"""Autograd and backend dispatch for the probe ops of the sharpness estimators.

Rows of a perturbed input are grouped by probe: ``[K * rows_per_probe, N]``. Gathered rows (the
selected positions) carry their own probe index and counter base, so they see exactly the numbers
the perturbation used. The preconditioner ``gamma`` and the step ``eps`` are constants: no gradient
flows to them (OFA takes P_t from the frozen original weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import rng
from . import dispatch


def _backend(backend: str | None, device: torch.device):
    return dispatch.resolve(backend or "auto", device, "probe")


def _rows_backend(backend: str | None, device: torch.device):
    """The backend of the gathered-row ops: the chosen one where it has them (the native extension
    has none: a few rows per layer run as plain PyTorch there)."""
    module = _backend(backend, device)
    return module if hasattr(module, "probe_rows") else dispatch.resolve("torch", device, "probe")


@dataclass(frozen=True)
class _Perturbation:
    """What one perturb call fixes besides its tensors (the arguments of a backend's ``probe_perturb``)."""

    eps: float
    rows_per_probe: int
    distribution: str
    scale_by_rms: bool
    add_x: bool
    row_offset: int
    backend: str | None


class _PerturbFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, keys, how: _Perturbation):
        ctx.add_x = how.add_x
        y, scale = _backend(how.backend, x.device).probe_perturb(x, gamma, how.eps, keys, how.rows_per_probe,
                                                                 how.distribution, how.scale_by_rms, how.add_x,
                                                                 how.row_offset)
        ctx.mark_non_differentiable(scale)
        return y, scale

    @staticmethod
    def backward(ctx, dy, _dscale):
        return (dy if ctx.add_x else None), None, None, None


class _ProbeDotFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c, d, scale, index: tuple, distribution: str, backend: str | None):
        keys, probe, base = index
        ctx.save_for_backward(scale, keys, probe, base)
        ctx.width, ctx.clean_rows = a.shape[-1], None if c is None else c.shape[0]
        ctx.distribution, ctx.backend, ctx.a_dtype, ctx.c_dtype = distribution, backend, a.dtype, \
            None if c is None else c.dtype
        return _rows_backend(backend, a.device).probe_dot(a, b, c, d, scale, keys, probe, base, distribution)

    @staticmethod
    @once_differentiable
    def backward(ctx, gq):
        scale, keys, probe, base = ctx.saved_tensors
        N, clean_rows = ctx.width, ctx.clean_rows
        coef = (-gq.to(scale.dtype) / scale).contiguous()
        w = _rows_backend(ctx.backend, scale.device).probe_rows(coef, None, keys, probe, base, N, ctx.distribution)
        dc = dd = None
        if clean_rows is not None:
            w_clean = w.view(-1, clean_rows, N).sum(0)
            dc, dd = (-w_clean).to(ctx.c_dtype), w_clean.to(ctx.c_dtype)
        return w.to(ctx.a_dtype), (-w).to(ctx.a_dtype), dc, dd, None, None, None, None


def _rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def perturb(
    x: Tensor,
    gamma: Tensor,
    eps: float,
    *,
    stream: rng.ProbeStream,
    distribution: str = "rademacher",
    scale_by_rms: bool = False,
    noise_only: bool = False,
    row_offset: int = 0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``x + s * gamma * nu`` (or ``s * gamma * nu`` with ``noise_only``) and the per-row step ``s``.

    ``x``: ``[K * ..., N]``; its rows split evenly into the ``stream``'s ``count`` consecutive groups,
    group k drawing probe ``stream.first + k`` of block ``stream.layer``. ``s = eps * rms(row)`` with
    ``scale_by_rms``, else ``eps``. The probe numbers equal ``rng.probes(x[k].shape, seed, distribution,
    layer=layer, probe=k)`` (``stream.seed``: an int, or a 0-dim int64 tensor on ``x``'s device, read
    there: see ``rng.key_table``); with ``row_offset`` each group is rows ``row_offset ..`` of a larger slab
    (a shard of a batch).
    """
    rng.check_distribution(distribution)
    num_probes = stream.count
    N = x.shape[-1]
    if gamma.shape != (N,):
        raise ValueError(f"gamma must have shape ({N},) to match x's last dim, got {tuple(gamma.shape)}")
    rows = x.numel() // N if N else 0
    if num_probes < 1 or rows % num_probes:
        raise ValueError(f"x has {rows} rows, which do not split into num_probes={num_probes} equal groups")
    rows_per_probe = rows // num_probes
    if row_offset < 0:
        raise ValueError(f"row_offset must be >= 0, got {row_offset}")
    if (rows_per_probe + row_offset) * N > rng.MAX_COUNTER:
        raise ValueError(f"one probe covers {rows_per_probe * N} elements; at most 2**31 are supported")
    how = _Perturbation(float(eps), rows_per_probe, distribution, scale_by_rms, not noise_only, int(row_offset),
                        backend)
    y, scale = _PerturbFn.apply(_rows(x), gamma.detach().contiguous(), stream.keys(x.device), how)
    return y.view(x.shape), scale.view(x.shape[:-1])


def probe_rows(coef: Tensor, gamma: Tensor | None, keys: Tensor, probe: Tensor, base: Tensor, width: int,
               distribution: str, backend: str | None = None) -> Tensor:
    """``coef_r * gamma * nu_r`` for gathered rows (probe index and counter base per row); not differentiable."""
    return _rows_backend(backend, coef.device).probe_rows(coef.contiguous(), None if gamma is None else gamma.detach(),
                                                     keys, probe, base, width, distribution)


def probe_dot(a: Tensor, b: Tensor, clean_a: Tensor | None, clean_b: Tensor | None, scale: Tensor, keys: Tensor,
              probe: Tensor, base: Tensor, distribution: str, *, backend: str | None = None) -> Tensor:
    """``q_r = -nu_r . ((a_r - b_r) - (clean_a - clean_b)_{r mod C}) / s_r`` in fp32 (fp64 for fp64).

    ``a, b``: [R, N] gathered rows (perturbed pass); ``clean_a, clean_b``: [C, N] (clean pass, shared
    by the R / C probes) or None; ``scale``: [R] steps. Differentiable in a, b, clean_a, clean_b;
    the backward regenerates nu.
    """
    return _ProbeDotFn.apply(_rows(a), _rows(b), None if clean_a is None else _rows(clean_a),
                             None if clean_b is None else _rows(clean_b), scale.contiguous(), (keys, probe, base),
                             distribution, backend)
