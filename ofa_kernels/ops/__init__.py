"""Op definitions, autograd and backend dispatch for the fused norms."""

from .dispatch import backends, use_backend
from .norm import layer_norm, rms_norm

__all__ = ["backends", "layer_norm", "rms_norm", "use_backend"]
