"""The backend contract, written as types: what a norm or probe backend module must provide.

A backend is a module (``eager``, ``triton``, ``native``) with these functions; ``ops/norm.py`` and
``ops/probe.py`` call them with exactly these positional arguments (and the keywords noted), and
``dispatch`` checks a module against its family's contract when it loads it, so a backend that
lacks a function or takes other arguments is reported unusable, with the reason, instead of failing
inside a training step. Shapes: ``x`` / ``dy`` are ``[M, N]`` rows (any row stride; the ops make
``dy`` row-major), ``weight`` / ``bias`` ``[N]`` or None, ``mean`` / ``rstd`` ``[M]`` in the
accumulation dtype (``precision.acc_dtype``; ``mean`` empty for RMSNorm); ``spec`` the frozen
``precision.NormSpec`` of the norm (RMSNorm or LayerNorm, the weight offset, the cast mode), one
object per distinct spec (``precision.norm_spec``).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Protocol

from torch import Tensor

from ..precision import NormSpec

__all__ = ["CONTRACTS", "NormBackend", "ProbeBackend", "unusable_reason"]


class NormBackend(Protocol):
    def norm_fwd(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, spec: NormSpec,
                 out_dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, rstd)``."""

    def norm_bwd(self, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, spec: NormSpec,
                 needs: tuple[bool, bool, bool], *, dw_dtype=None,
                 db_dtype=None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dw, db)``, None where not needed (``needs``: whether each is)."""

    def norm_bwd_bwd(self, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                     cotangents: tuple, spec: NormSpec, needs: tuple[bool, bool, bool]) -> tuple:
        """``(d_dy, d_x, d_w)`` of ``<grad_dx, dx> + <grad_dw, dw> + <grad_db, db>`` for ``cotangents`` =
        (grad_dx, grad_dw, grad_db), each may be None; None where not needed (``needs``: d_dy, d_x, d_w;
        ``spec`` with cast mode "none": the second derivative of the norm without its rounding)."""


class ProbeBackend(Protocol):
    def probe_perturb(self, x: Tensor, gamma: Tensor, eps: float, keys: Tensor, rows_per_probe: int,
                      distribution: str, scale_by_rms: bool, add_x: bool, row_offset: int = 0) -> tuple[Tensor, Tensor]:
        """``(y, scale)``: ``x + scale * gamma * nu`` (or the noise alone) per probe's rows."""

    # optional (``ops/probe.py`` runs them as plain PyTorch where a backend has none):
    # probe_rows(coef, gamma, keys, probe, base, N, distribution) and
    # probe_dot(a, b, c, d, scale, keys, probe, base, distribution)


CONTRACTS: dict[str, type] = {"norm": NormBackend, "probe": ProbeBackend}


def _required(method) -> tuple[list[str], list[str]]:
    params = list(inspect.signature(method).parameters.values())[1:]  # without self
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    keywords = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    return positional, keywords


def unusable_reason(module: ModuleType, family: str) -> str | None:
    """Why ``module`` does not meet ``family``'s contract (a missing function, or one that cannot take
    the contract's arguments), or None when it does."""
    contract = CONTRACTS[family]
    for name, method in inspect.getmembers(contract, inspect.isfunction):
        if name.startswith("_"):
            continue
        fn = getattr(module, name, None)
        if not callable(fn):
            return f"{module.__name__} has no {name}()"
        positional, keywords = _required(method)
        try:
            inspect.signature(fn).bind(*positional, **{k: None for k in keywords})
        except TypeError as exc:
            return f"{module.__name__}.{name}() does not take the contract's arguments ({exc})"
    return None
