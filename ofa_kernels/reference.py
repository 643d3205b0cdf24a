"""Plain-PyTorch norms: the truth every kernel is checked against.

These follow Hugging Face's modules operation by operation and are differentiated by autograd,
so tests can run them in float64 (``upcast=True``) for an exact reference, or in the input dtype
to measure how far PyTorch itself strays from that reference.
"""

from __future__ import annotations

import torch

__all__ = ["rms_norm_ref", "layer_norm_ref"]


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    cast_mode: str = "llama",
    upcast: bool = False,
) -> torch.Tensor:
    """RMSNorm as HF writes it. ``upcast`` computes everything in float64 and returns float64.

    cast_mode "llama": ``(offset + w) * (x32 * rstd).to(x.dtype)`` (LlamaRMSNorm, offset 0);
    "gemma": ``((x32 * rstd) * (offset + w32)).to(x.dtype)`` (GemmaRMSNorm, offset 1);
    "none": ``(x32 * rstd * (offset + w32))`` in the promoted dtype, no intermediate rounding.
    """
    if upcast:
        x = x.double()
        weight = None if weight is None else weight.double()
    in_dtype = x.dtype
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(stat_dtype)
    rstd = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xs * rstd
    if weight is None:
        return xhat.to(in_dtype)
    if cast_mode == "llama":
        return (weight + offset) * xhat.to(in_dtype) if offset else weight * xhat.to(in_dtype)
    if cast_mode == "gemma":
        return (xhat * (offset + weight.to(stat_dtype))).to(in_dtype)
    if cast_mode == "none":
        out_dtype = torch.promote_types(in_dtype, weight.dtype)
        return (xhat * (offset + weight.to(stat_dtype))).to(out_dtype)
    raise ValueError(f"cast_mode must be 'llama', 'gemma' or 'none', got {cast_mode!r}")


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """LayerNorm over the last dim with fp32 (or fp64) statistics; output in x's dtype."""
    if upcast:
        x = x.double()
        weight = None if weight is None else weight.double()
        bias = None if bias is None else bias.double()
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(stat_dtype)
    mean = xs.mean(-1, keepdim=True)
    xc = xs - mean
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    y = xc * rstd
    if weight is not None:
        y = y * weight.to(stat_dtype)
    if bias is not None:
        y = y + bias.to(stat_dtype)
    return y.to(x.dtype)
