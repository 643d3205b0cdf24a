"""ofa_kernels: fused, twice-differentiable norms and the OFA few-shot adaptation toolkit.

Submodules keep their own names (``ofa_kernels.evaluate.evaluate``, ``ofa_kernels.data``, ...);
nothing here shadows one.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# Each public name and the submodule that defines it, imported on first use (PEP 562): importing
# ``ofa_kernels`` or a leaf module such as ``ofa_kernels.options`` loads neither torch nor the
# kernels, so the CLI refuses bad arguments at once.
_HOMES = {
    "AdaptOptions": "options",
    "AdaptResult": "options",
    "FusedLayerNorm": "nn",
    "FusedRMSNorm": "nn",
    "adapt": "trainer",
    "backends": "ops",
    "export_hf": "export",
    "export_peft": "export",
    "hutchinson_trace": "objectives",
    "k_shot": "data",
    "last_token_states": "anatomy",
    "layer_norm": "ops",
    "layer_report": "diagnostics",
    "load_adapter": "adapters",
    "load_model": "models",
    "load_table": "data",
    "load_task": "data",
    "norm_parameters": "anatomy",
    "patch_model": "patch",
    "preconditioners": "anatomy",
    "riding_pass": "objectives",
    "probes": "rng",
    "rms_norm": "ops",
    "save_adapter": "adapters",
    "sharpness": "objectives",
    "sharpness_terms": "objectives",
    "step_ratio": "objectives",
    "test_subset": "data",
    "tokenizer_from_gguf": "gguf_tokenizer",
    "training_step": "trainer",
    "unpatch_model": "patch",
    "use_backend": "ops",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ofa_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["__version__", *sorted(_HOMES)]  # the one table above is the public face
