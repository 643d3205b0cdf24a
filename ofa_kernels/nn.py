"""Drop-in modules over the fused norm ops, state-dict compatible with HF and torch.nn."""

from __future__ import annotations

import torch
from torch import nn

from .ops.norm import layer_norm, normalized_dims, rms_norm
from .precision import check_cast_mode
from .vocab import BACKEND_NAMES


def check_backend(backend: str | None) -> str | None:
    """``backend`` when it is None or one of ``BACKEND_NAMES``, else a ValueError naming it."""
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be None or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


class FusedRMSNorm(nn.Module):
    """RMSNorm with a ``weight`` parameter, like HF ``LlamaRMSNorm`` (same state dict).

    ``hidden_size``: the normalised trailing dims, an int or a tuple (as ``torch.nn.RMSNorm``'s
    ``normalized_shape``); the weight has that shape.

    ``offset`` and ``cast_mode`` select Gemma-style ``(offset + weight)`` in fp32; both attributes
    ``eps`` and ``variance_epsilon`` are exposed, since HF models use either name. ``output_dtype``
    (None: HF's promotion rule) fixes the result dtype, e.g. bf16 for fp32 master weights in a bf16 model.
    ``backend`` (None: "auto") is the backend this module's op runs on (``ofa_kernels.backends()``).
    """

    output_dtype: torch.dtype | None = None

    def __init__(
        self,
        hidden_size: int | tuple[int, ...],
        eps: float = 1e-6,
        *,
        offset: float = 0.0,
        cast_mode: str = "llama",
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        check_cast_mode(cast_mode)
        shape = normalized_dims(hidden_size, "hidden_size")
        self.hidden_size = hidden_size
        self.normalized_shape = shape
        self.eps = eps
        self.offset = offset
        self.cast_mode = cast_mode
        init = torch.zeros if offset else torch.ones
        if elementwise_affine:
            self.weight = nn.Parameter(init(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y = rms_norm(hidden_states, self.weight, self.eps, normalized_shape=self.normalized_shape, offset=self.offset,
                     cast_mode=self.cast_mode, backend=self.backend)
        return y if self.output_dtype is None else y.to(self.output_dtype)

    def extra_repr(self) -> str:
        extra = f", offset={self.offset}, cast_mode={self.cast_mode!r}" if self.offset or self.cast_mode != "llama" else ""
        return f"{self.hidden_size}, eps={self.eps}{extra}"


class FusedLayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` over its ``normalized_shape`` (any number of trailing dims), computed by the
    fused op (same state dict); ``backend`` as for ``FusedRMSNorm``."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = check_backend(backend)

    output_dtype: torch.dtype | None = None  # None: x's dtype (LayerNorm's rule)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = layer_norm(input, self.weight, self.bias, self.eps, normalized_shape=self.normalized_shape,
                       backend=self.backend)
        return y if self.output_dtype is None else y.to(self.output_dtype)
