"""ofa_kernels: fused, twice-differentiable norms and the OFA few-shot adaptation toolkit, on two floors.

- The kernel library, this package's top level: ``ops`` (the public ops, and the one place that picks
  a backend), the backends ``eager/``, ``triton/`` and ``native/``, ``nn`` (the fused modules),
  ``patch`` (norm recognition and swapping), ``rng`` (counter-based probes), ``precision``,
  ``reference``, ``measured`` and ``vocab`` (the torch-free names).
- The few-shot application, ``ofa_kernels.fewshot``: options, data and prompts, a model's anatomy, the
  objective (CE, J, S), the trainer, runs, adapters, the CLI. It imports the kernel floor; the kernel
  floor never imports it (the layer contracts in ``pyproject.toml``, checked by ``lint-imports``).

The public names below are re-exported from both floors; submodules keep their own names
(``ofa_kernels.fewshot.evaluate.evaluate``, ``ofa_kernels.fewshot.data``, ...) and nothing here shadows one.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# Each public name and the submodule that defines it, imported on first use (PEP 562): importing
# ``ofa_kernels`` or a leaf module such as ``ofa_kernels.fewshot.options`` loads neither torch nor the
# kernels, so the CLI refuses bad arguments at once.
_HOMES = {
    "AdaptOptions": "fewshot.options",
    "AdaptResult": "fewshot.options",
    "FusedLayerNorm": "nn",
    "FusedRMSNorm": "nn",
    "adapt": "fewshot.trainer",
    "backends": "ops",
    "export_hf": "fewshot.export",
    "export_peft": "fewshot.export",
    "hutchinson_trace": "fewshot.objectives",
    "k_shot": "fewshot.data",
    "last_token_states": "fewshot.anatomy",
    "layer_norm": "ops",
    "layer_report": "fewshot.diagnostics",
    "load_adapter": "fewshot.adapters",
    "load_model": "fewshot.models",
    "load_table": "fewshot.data",
    "load_task": "fewshot.data",
    "norm_parameters": "fewshot.anatomy",
    "patch_model": "patch",
    "preconditioners": "fewshot.anatomy",
    "riding_pass": "fewshot.objectives",
    "probes": "rng",
    "rms_norm": "ops",
    "save_adapter": "fewshot.adapters",
    "sharpness": "fewshot.objectives",
    "sharpness_terms": "fewshot.objectives",
    "step_ratio": "fewshot.objectives",
    "test_subset": "fewshot.data",
    "tokenizer_from_gguf": "fewshot.gguf_tokenizer",
    "training_step": "fewshot.trainer",
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
