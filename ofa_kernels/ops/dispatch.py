"""The one place that picks a backend for the ops (norm and probe families).

Order: the ``backend`` argument, then ``OFA_BACKEND``, then auto (Triton for CUDA tensors when it
imports, plain PyTorch otherwise). An explicitly requested backend that cannot run raises; auto
falls back quietly. ``backends()`` reports what is available and why not.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKEND_NAMES = ("auto", "torch", "triton")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


FAMILIES = ("norm", "probe")


@functools.lru_cache(maxsize=None)
def _load(name: str, family: str = "norm") -> tuple[ModuleType | None, str]:
    """Imports a backend's module for an op family once; returns (module or None, reason when missing)."""
    if family not in FAMILIES:
        raise ValueError(f"op family must be one of {FAMILIES}, got {family!r}")
    if name == "torch":
        return importlib.import_module(f"..eager.{family}", __package__), "plain PyTorch closed forms; any device"
    if name == "triton":
        try:
            module = importlib.import_module(f"..triton.{family}", __package__)
        except Exception as exc:  # ImportError, or triton failing to initialise its driver
            return None, f"triton did not import: {exc}"
        where = "CUDA tensors" + (", and CPU tensors through the interpreter" if _interpreting() else "")
        return module, f"Triton kernels for {where}"
    raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")


def _runs_on(name: str, device: torch.device) -> bool:
    return name == "torch" or device.type == "cuda" or _interpreting()


def resolve(backend: str, device: torch.device, family: str = "norm") -> ModuleType:
    """Returns the backend module that runs ``family``'s ops for tensors on ``device``."""
    name = backend if backend != "auto" else os.environ.get("OFA_BACKEND", "auto") or "auto"
    if name == "auto":
        if device.type == "cuda" and _load("triton", family)[0] is not None:
            return _load("triton", family)[0]
        return _load("torch", family)[0]
    module, reason = _load(name, family)
    if module is None:
        raise RuntimeError(f"backend {name!r} was requested but is not available: {reason}")
    if not _runs_on(name, device):
        raise RuntimeError(
            f"backend {name!r} cannot run on {device.type} tensors "
            "(Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors)"
        )
    return module


def backends() -> dict[str, dict[str, object]]:
    """What each backend is, whether it is available here, and why not."""
    report = {}
    for name in BACKEND_NAMES[1:]:
        module, reason = _load(name)
        report[name] = {"available": module is not None, "detail": reason}
    report["auto"] = {
        "available": True,
        "detail": "triton on CUDA tensors when available, torch otherwise; OFA_BACKEND overrides",
    }
    return report
