"""ofa_kernels: fused, twice-differentiable norms and the OFA few-shot adaptation toolkit."""

from .nn import FusedLayerNorm, FusedRMSNorm
from .objectives import (hutchinson_trace, last_token_states, preconditioners, sharpness, sharpness_terms,
                         step_ratio)
from .ops import backends, layer_norm, rms_norm
from .patch import patch_model, unpatch_model
from .rng import probes

__version__ = "0.1.0"

__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "__version__",
    "backends",
    "hutchinson_trace",
    "last_token_states",
    "layer_norm",
    "patch_model",
    "preconditioners",
    "probes",
    "rms_norm",
    "sharpness",
    "sharpness_terms",
    "step_ratio",
    "unpatch_model",
]
