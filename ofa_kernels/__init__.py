"""ofa_kernels: fused, twice-differentiable norms and the OFA few-shot adaptation toolkit."""

from .nn import FusedLayerNorm, FusedRMSNorm
from .patch import patch_model, unpatch_model
from .ops import backends, layer_norm, rms_norm

__version__ = "0.1.0"

__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "__version__",
    "backends",
    "layer_norm",
    "patch_model",
    "rms_norm",
    "unpatch_model",
]
