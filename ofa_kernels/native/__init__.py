"""The compiled extension ``ofa_kernels._C`` (csrc/) as two backends: "cpu" and "cuda".

``load()`` returns the module or None with the reason, once; the backend modules in this package
(``norm``, ``probe``) follow the same contract as ``ofa_kernels/eager`` and ``ofa_kernels/triton``.
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def load() -> tuple[ModuleType | None, str]:
    try:
        from .. import _C
    except ImportError as exc:
        return None, f"the native extension is not built ({exc}); pip install --no-build-isolation . builds it"
    return _C, "compiled " + ("CPU + CUDA" if _C.with_cuda() else "CPU") + " kernels (csrc/)"
