"""The kernel library's names, torch-free (a leaf: both floors and the CLI read it without loading torch).

- ``BACKEND_NAMES``: what the ops' ``backend`` argument, ``OFA_BACKEND`` and the modules take ("auto"
  picks; the others are ``ops/dispatch.py``'s backends).
- ``CAST_MODES``: how an RMSNorm rounds its output ("llama": normalise in the accumulation dtype, cast to
  the input dtype, then multiply by the weight; "gemma": multiply by (offset + weight) in the
  accumulation dtype, then cast; "none": no cast between). ``CAST_CODE``: the number each mode is in the
  kernels (``csrc/ofa_ext.h`` and ``triton/norm.py`` name the same numbers).
- ``DISTRIBUTIONS``: of the random probes (``rng.py``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BACKEND_NAMES", "CAST_CODE", "CAST_MODES", "DISTRIBUTIONS", "check_choice"]

BACKEND_NAMES = ("auto", "torch", "triton", "cpu", "cuda")
CAST_MODES = ("llama", "gemma", "none")
CAST_CODE = {mode: code for code, mode in enumerate(CAST_MODES)}
DISTRIBUTIONS = ("rademacher", "gaussian")


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """``value`` when it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
