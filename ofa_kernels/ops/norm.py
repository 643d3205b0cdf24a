"""RMSNorm and LayerNorm, the public entry: checks, the normalised dims onto the kernels' rows, and the
one call site that picks the entry (first and second derivatives fused, any order correct).

Two entries run the same stages (forward -> backward -> double backward) and the same backend
functions: eager calls use the ``torch.autograd.Function``s of ``norm_autograd.py``, with no op
boundary (its host cost is in benchmarks/RESULTS.md, "Launch-bound shape"); under ``torch.compile``
the ``torch.library`` ops of ``norm_library.py`` are used. Nothing to record (grad mode off, no
input requiring grad, no transform, no tangent) calls the backend with no Function at all, and a
backward that builds no graph (``create_graph=False``) calls it directly too. Forward mode is fused
(``norm_autograd.py``, "forward-mode rules"); third and higher derivatives go through plain twins.
Every input may have any layout: a tensor is made row-major once, where its last dim is not
unit-stride (the kernels read any row stride), and a backward's incoming gradient before it is saved
for the double backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ..precision import check_cast_mode
from ..reference import layer_norm_ref, rms_norm_ref
from .norm_autograd import apply_norm, call_fwd, norm_call, row_major, transforms_active
from .norm_library import norm_fwd

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _has_tangent(*tensors: Tensor | None) -> bool:
    """True inside a forward-AD level when any input carries a tangent."""
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _norm(x, weight, bias, eps: float, call) -> Tensor:
    """The one call site: registered op under torch.compile, lean autograd.Function in eager.

    Under torch.func transforms the eager Functions run even where the registered ops were asked for
    (``EAGER_FAST_PATH`` off): the autograd.Function that ``torch.library.register_autograd`` generates
    has no ``setup_context``, so grad-type transforms refuse it (pytorch/pytorch#168393). The ops'
    own ``register_vmap`` rules serve ``torch.vmap`` of the ops called directly."""
    if torch.compiler.is_compiling() or not (EAGER_FAST_PATH or transforms_active()):
        if _has_tangent(x, weight, bias):  # torch.library ops have no forward-mode AD: the plain reference
            spec = call.spec
            if spec.is_rms:
                return rms_norm_ref(x, weight, eps, offset=spec.offset, cast_mode=spec.cast_mode)
            return layer_norm_ref(x, weight, bias, eps)
        spec = call.spec
        return norm_fwd(x, weight, bias, eps, spec.offset, spec.is_rms, spec.cast_mode, call.backend)[0]
    if not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                         or (bias is not None and bias.requires_grad))) \
            and not transforms_active() and not _has_tangent(x, weight, bias):
        return call_fwd(x, weight, bias, eps, call)[0]  # nothing to record
    return apply_norm(x, weight, bias, eps, call)[0]


EAGER_FAST_PATH = True  # tests flip it to run the registered ops eagerly too


# ------------------------------------------------------------------------------- public API


def normalized_dims(value, name: str = "normalized_shape") -> tuple[int, ...]:
    """The normalised dims as a tuple: ``value`` an int or a non-empty sequence of ints >= 0 (the one check of
    a norm's shape: the ops and the modules call it), else a ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        shape = None if isinstance(value, (str, bytes)) else tuple(value)
    except TypeError:
        shape = None
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{name} must be an int or a non-empty tuple of ints >= 0 (any sequence of them), "
                         f"got {value!r}")
    return shape


def _normalized_shape(x: Tensor, normalized_shape) -> tuple[int, ...]:
    """``normalized_shape`` checked against x's trailing dims."""
    shape = normalized_dims(normalized_shape)
    if tuple(x.shape[-len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"normalized_shape {shape} must equal x's trailing dims; x has shape {tuple(x.shape)}")
    return shape


def _check(x: Tensor, eps: float, normalized_shape, **params: Tensor | None) -> tuple[int, ...]:
    """Validates inputs; returns the normalised shape: ``normalized_shape``, else the weight's (or bias's)
    shape where it equals x's trailing dims, else x's last dim. Errors name the argument and what was
    expected."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised last dim), got a scalar")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")  # negative is allowed, as in F.layer_norm
    # the common case (x's last dim) first, without the general resolution's cost
    shape = (x.shape[-1],) if normalized_shape is None else _normalized_shape(x, normalized_shape)
    for name, p in params.items():
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        if p.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
        if tuple(p.shape) != shape:
            if normalized_shape is None and p.dim() > 1 and tuple(x.shape[-p.dim():]) == tuple(p.shape):
                return _check(x, eps, tuple(p.shape), **params)  # the parameter's shape names the dims
            raise ValueError(f"{name} must have shape {shape} to match x's normalised dims, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}; expected the same device")
    return shape


def _as_rows(x: Tensor, width: int) -> Tensor:
    """[..., N] -> [M, N] as a view when the leading dims collapse (any row stride), else a copy."""
    x = row_major(x)
    return x if x.dim() == 2 else x.reshape(-1, width)


def _param(p: Tensor | None) -> Tensor | None:
    return None if p is None else row_major(p)


def _run(x: Tensor, shape: tuple[int, ...], weight, bias, eps: float, call) -> Tensor:
    """Flattens the normalised dims onto the kernels' rows and back."""
    if len(shape) == 1:
        y = _norm(_as_rows(x, shape[0]), _param(weight), _param(bias), float(eps), call)
        return y if y.dim() == x.dim() else y.view(x.shape)  # rows of a 2-D x are its rows already
    width = math.prod(shape)
    flat = (None if p is None else p.reshape(width) for p in (weight, bias))
    y = _norm(row_major(x).reshape(-1, width), *map(_param, flat), float(eps), call)
    return y.view(x.shape)


def _empty_rows(x, shape, weight, bias, eps: float, call) -> Tensor | None:
    """Zero-width rows have nothing to launch: the plain reference gives the (empty) result, still
    differentiable."""
    xr = x.reshape(*x.shape[:x.dim() - len(shape)], 0)
    w = None if weight is None else weight.reshape(0)
    if call.spec.is_rms:
        y = rms_norm_ref(xr, w, eps, offset=call.spec.offset, cast_mode=call.spec.cast_mode)
    else:
        y = layer_norm_ref(xr, w, None if bias is None else bias.reshape(0), eps)
    return y.reshape(x.shape)


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float = 1e-6,
    *,
    normalized_shape: int | Sequence[int] | None = None,
    offset: float = 0.0,
    cast_mode: str = "llama",
    backend: str | None = None,
) -> Tensor:
    """RMSNorm over the trailing dims: ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``.

    The normalised dims are ``normalized_shape`` (as ``F.rms_norm``'s), else the weight's shape, else
    x's last dim; the weight has that shape. Statistics are fp32. ``cast_mode``: "llama" rounds the
    normalised x to x's dtype before the weight multiply and returns the promoted dtype
    (bit-compatible with HF ``LlamaRMSNorm``); "gemma" computes all in fp32 and returns x's dtype (HF
    Gemma, with ``offset=1``); "none" does no intermediate rounding and returns the promoted dtype.
    Any layout of x and weight (strided, expanded, empty). Differentiable in x, weight and the
    upstream gradient (second order fused; higher orders in plain PyTorch), in reverse and forward
    mode, and under ``torch.func`` (grad, jvp, vmap, hessian, ...). ``backend``: "auto" (default, or
    ``OFA_BACKEND``), "torch", "triton", "cpu" or "cuda" (the compiled extension); see
    ``ofa_kernels.backends()``.
    """
    shape = _check(x, eps, normalized_shape, weight=weight)
    check_cast_mode(cast_mode)
    if not math.isfinite(offset):
        raise ValueError(f"offset must be finite, got {offset!r}")
    call = norm_call(True, float(offset), cast_mode, backend or "auto")
    if 0 in shape:
        return _empty_rows(x, shape, weight, None, float(eps), call)
    return _run(x, shape, weight, None, eps, call)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    *,
    normalized_shape: int | Sequence[int] | None = None,
    backend: str | None = None,
) -> Tensor:
    """LayerNorm over the trailing dims with fp32 statistics; returns x's dtype.

    The normalised dims as for :func:`rms_norm`; ``weight`` and ``bias`` (either may be None) have
    that shape. Differentiable in x, weight, bias and the upstream gradient, as :func:`rms_norm`.
    ``backend`` as for :func:`rms_norm`.
    """
    shape = _check(x, eps, normalized_shape, weight=weight, bias=bias)
    call = norm_call(False, 0.0, "none", backend or "auto")
    if 0 in shape:
        return _empty_rows(x, shape, weight, bias, float(eps), call)
    return _run(x, shape, weight, bias, eps, call)
