"""Swap a model's norms for the fused ones, in place, and back.

One walk over the module tree; norms are recognised by kind, not by model type:
- ``torch.nn.LayerNorm`` over any trailing dims (GPT-2 ``ln_*``, BERT ``LayerNorm``, ...) -> FusedLayerNorm;
- RMSNorms as ``rms_kind`` recognises them (HF's Llama, Mistral, Qwen2, SmolLM, Gemma, ...;
  ``torch.nn.RMSNorm``) -> FusedRMSNorm.
PEFT wrappers (``LNTuningLayer``, ``ModulesToSaveWrapper``) are not norms themselves; the norms
inside them (base layer and trainable copies) are found by the same walk. The replacement takes
over the very same Parameter objects (values, dtype, device, ``requires_grad`` and optimizer
references stay) and the module's hooks, and is checked against the original on a small probe
input before it is kept; a module whose output differs is left alone with a warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .nn import FusedLayerNorm, FusedRMSNorm, check_backend

_RECORD = "_ofa_patched_norms"


# ------------------------------------------------------------------------------- norm recognition


def rms_kind(module: nn.Module) -> tuple[float, float, str] | None:
    """(eps, offset, cast_mode) when ``module`` is an RMSNorm the fused kernels reproduce, else None.

    ``torch.nn.RMSNorm``; classes HF tags as "RMSNorm" or named ``*RMSNorm`` with a 1-D ``weight``
    and an ``eps``/``variance_epsilon`` (Llama, Mistral, Qwen2, SmolLM; Gemma's ``1 + weight``).
    """
    if isinstance(module, FusedRMSNorm):
        return float(module.eps), float(module.offset), module.cast_mode
    cls = type(module)
    if isinstance(module, nn.RMSNorm):
        eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
        return float(eps), 0.0, "gemma"
    tagged = getattr(cls, "kernel_layer_name", None) == "RMSNorm" or cls.__name__.endswith("RMSNorm")
    weight = getattr(module, "weight", None)
    if not tagged or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(eps, (int, float)):
        return None
    if "gemma" in cls.__name__.lower():
        return float(eps), 1.0, "gemma"
    return float(eps), 0.0, "llama"


def is_norm(module: nn.Module) -> bool:
    """Any normalisation layer: LayerNorm, RMSNorm (ours, torch's, HF's) or a class named ``*Norm``-like."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or rms_kind(module) is not None:
        return True
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


# ----------------------------------------------------------------------------------- swapping


def _fused_for(module: nn.Module, backend: str | None = None) -> nn.Module | None:
    """A fused module sharing ``module``'s parameters, or None if it is not a norm we handle."""
    if isinstance(module, (FusedRMSNorm, FusedLayerNorm)):
        return None
    if type(module) is nn.LayerNorm or (isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward):
        fused = FusedLayerNorm(module.normalized_shape, module.eps, elementwise_affine=False, device="meta",
                               backend=backend)
        fused.elementwise_affine = module.elementwise_affine
        fused.weight, fused.bias = module.weight, module.bias
        return fused
    kind = rms_kind(module)
    if kind is None:
        return None
    eps, offset, cast_mode = kind
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if weight is not None else tuple(module.normalized_shape)
    fused = FusedRMSNorm(shape[0] if len(shape) == 1 else shape, eps, offset=offset, cast_mode=cast_mode,
                         elementwise_affine=False, backend=backend)
    fused.weight = weight
    return fused


def _agrees(original: nn.Module, fused: nn.Module) -> bool:
    """Both modules give the same output on a small random input (in the weights' dtype)."""
    weight = getattr(original, "weight", None)
    if weight is None or weight.device.type == "meta":
        return True
    gen = torch.Generator(device=weight.device).manual_seed(0)  # leaves the global RNG untouched
    probe = torch.randn(3, *weight.shape, device=weight.device, generator=gen).to(weight.dtype)
    with torch.no_grad():
        want, got = original.forward(probe), fused.forward(probe)  # .forward: no user hooks fire
    tol = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    return want.dtype == got.dtype and torch.allclose(got, want, rtol=tol, atol=tol)


def _carry_hooks(src: nn.Module, dst: nn.Module) -> None:
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks"):
        if hasattr(src, attr):
            getattr(dst, attr).update(getattr(src, attr))
    dst.train(src.training)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fusable_norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of every norm ``patch_model`` replaces (or has replaced), by the names they keep
    after patching; the model is not changed."""
    out = {}
    for name, module in model.named_modules():
        if name and (isinstance(module, (FusedRMSNorm, FusedLayerNorm)) or _fused_for(module) is not None):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p
    return out


def patch_model(model: nn.Module, backend: str | None = None) -> list[str]:
    """Replaces every supported norm of ``model`` in place with its fused twin.

    Returns the qualified names replaced (a second call returns []). ``unpatch_model`` restores
    the original modules, which still share the (possibly trained) parameters. ``backend`` (None:
    "auto") is carried by every fused module of the model, those patched before included, so the
    model runs on it whatever ``OFA_BACKEND`` or ``use_backend`` say.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    if backend is not None:
        for module in model.modules():
            if isinstance(module, (FusedRMSNorm, FusedLayerNorm)):
                module.backend = backend
    record: dict[str, nn.Module] = model.__dict__.setdefault(_RECORD, {})
    replaced = []
    for name, module in list(model.named_modules()):
        if not name:
            continue
        fused = _fused_for(module, backend)
        if fused is None:
            continue
        if not _agrees(module, fused):
            warnings.warn(f"patch_model: left {name} ({type(module).__name__}) alone: the fused norm's "
                          "output differs from it on a probe input", stacklevel=2)
            continue
        _carry_hooks(module, fused)
        _set(model, name, fused)
        record[name] = module
        replaced.append(name)
    return replaced


def unpatch_model(model: nn.Module) -> list[str]:
    """Puts back the original norm modules ``patch_model`` replaced; returns their names."""
    record: dict[str, nn.Module] = model.__dict__.pop(_RECORD, {})
    for name, original in record.items():
        _set(model, name, original)
    return list(record)


def use_fp32_masters(model: nn.Module) -> None:
    """Trainable norms of a bf16/fp16 model in fp32; the norms keep returning the model's dtype."""
    for module in model.modules():
        if isinstance(module, (FusedRMSNorm, FusedLayerNorm)):
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.bfloat16, torch.float16):
                    module.output_dtype = p.dtype
                    p.data = p.data.float()
