"""ofa_kernels: fused, twice-differentiable norms and the OFA few-shot adaptation toolkit.

Submodules keep their own names (``ofa_kernels.evaluate.evaluate``, ``ofa_kernels.data``, ...);
nothing here shadows one.
"""

from .adapters import load_adapter, save_adapter
from .anatomy import last_token_states, norm_parameters, preconditioners
from .data import k_shot, load_table, load_task, test_subset
from .diagnostics import layer_report
from .export import export_hf, export_peft
from .gguf_tokenizer import tokenizer_from_gguf
from .models import load_model
from .nn import FusedLayerNorm, FusedRMSNorm
from .objectives import hutchinson_trace, sharpness, sharpness_terms, step_ratio
from .ops import backends, layer_norm, rms_norm
from .patch import patch_model, unpatch_model
from .rng import probes
from .trainer import AdaptOptions, AdaptResult, adapt, training_step

__version__ = "0.1.0"

__all__ = [
    "AdaptOptions",
    "AdaptResult",
    "FusedLayerNorm",
    "FusedRMSNorm",
    "__version__",
    "adapt",
    "backends",
    "export_hf",
    "export_peft",
    "hutchinson_trace",
    "k_shot",
    "last_token_states",
    "layer_norm",
    "layer_report",
    "load_adapter",
    "load_model",
    "load_table",
    "load_task",
    "norm_parameters",
    "patch_model",
    "preconditioners",
    "probes",
    "rms_norm",
    "save_adapter",
    "sharpness",
    "sharpness_terms",
    "step_ratio",
    "test_subset",
    "tokenizer_from_gguf",
    "training_step",
    "unpatch_model",
]
