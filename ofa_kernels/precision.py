"""How every backend computes and casts (one home for these facts): the accumulation dtype, the cast
rules of the norms' output with the codes the compiled and Triton kernels take for them, and the
spec of a norm that the ops hand every backend (``NormSpec``)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .vocab import CAST_CODE, CAST_MODES  # the names and their kernel codes (``vocab.py``)


def check_cast_mode(cast_mode: object) -> str:
    """``cast_mode`` when it is one of ``CAST_MODES``, else the ValueError every entry point gives (the one
    place it is checked: the modules, the ops and ``NormSpec`` call here)."""
    if cast_mode not in CAST_MODES:
        raise ValueError(f"cast_mode must be one of {CAST_MODES}, got {cast_mode!r}")
    return cast_mode


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (so gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class NormSpec:
    """Which norm a backend computes: RMSNorm (``is_rms``) or LayerNorm; the weight's ``offset`` (RMSNorm
    multiplies by ``offset + weight``; LayerNorm has none); the ``cast_mode`` of the output (one of
    ``CAST_MODES``; LayerNorm's is "none"). The double backward differentiates the norm without its
    intermediate rounding, so it is handed the spec with cast mode "none". Frozen and hashable; build
    it with :func:`norm_spec`, which checks it once per distinct spec and hands back the same object."""

    is_rms: bool
    offset: float = 0.0
    cast_mode: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.is_rms, bool):
            raise TypeError(f"is_rms must be a bool, got {self.is_rms!r}")
        check_cast_mode(self.cast_mode)
        if not (isinstance(self.offset, float) and math.isfinite(self.offset)):
            raise ValueError(f"offset must be a finite float, got {self.offset!r}")
        if not self.is_rms and (self.offset != 0.0 or self.cast_mode != "none"):
            raise ValueError(f"LayerNorm takes offset 0.0 and cast mode 'none', got {self.offset!r}, "
                             f"{self.cast_mode!r}")

    @property
    def cast_code(self) -> int:
        """The cast mode as the compiled and Triton kernels take it."""
        return CAST_CODE[self.cast_mode]

    def unrounded(self) -> "NormSpec":
        """This norm without intermediate rounding (cast mode "none"): what the double backward differentiates."""
        return norm_spec(self.is_rms, self.offset, "none")


@functools.lru_cache(maxsize=256)
def _interned(is_rms: bool, offset: float, cast_mode: str) -> NormSpec:
    return NormSpec(is_rms, offset, cast_mode)


def norm_spec(is_rms: bool, offset: float = 0.0, cast_mode: str = "none") -> NormSpec:
    """The checked :class:`NormSpec` of these fields (one object per distinct spec, so an op call pays a
    dictionary lookup, not a check)."""
    return _interned(is_rms, float(offset), cast_mode)
