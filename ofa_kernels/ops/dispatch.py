"""The one place that picks a backend for the ops (norm and probe families).

Backends: "torch" (plain PyTorch closed forms, any device), "triton" (CUDA tensors; CPU tensors
through ``TRITON_INTERPRET=1``), and the compiled extension (csrc/) as "cpu" (CPU tensors) and
"cuda" (CUDA tensors). Order: the ``backend`` argument, then ``OFA_BACKEND``, then auto:
- CPU tensors: "cpu" when the extension is built, else "torch";
- CUDA tensors: "triton" or "cuda" by the measured table ``auto_backends.json`` (per GPU
  architecture, op, stage, dtype and row width; written by ``benchmarks/bench_norm.py
  --write-auto-table``), falling back to whichever is available; Triton where nothing was measured.
An explicitly requested backend that cannot run raises; auto falls back quietly. A backend module
is checked against its family's contract (``contract.py``: the functions and arguments the ops
call) when it loads. ``backends()`` reports what is available and why not.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from ..measured import gpu_arch, nearest_measured
from ..vocab import BACKEND_NAMES
from .contract import unusable_reason

FAMILIES = ("norm", "probe")
_PACKAGE = {"torch": "eager", "triton": "triton", "cpu": "native", "cuda": "native"}

AUTO_TABLE_PATH = Path(__file__).with_name("auto_backends.json")


@functools.lru_cache(maxsize=None)
def auto_table() -> dict:
    """The packaged table: arch ("sm90") -> op ("rms", "layer") -> stage -> dtype -> width -> backend;
    {} when none has been measured."""
    return json.loads(AUTO_TABLE_PATH.read_text()) if AUTO_TABLE_PATH.exists() else {}


def pick(table: dict, arch: str, op: str, stage: str, dtype: str, width: int) -> str | None:
    """The measured backend for one launch: the entry at the nearest measured width at or below
    ``width`` (the smallest one above it when none is below); None where nothing was measured."""
    by_width = table.get(arch, {}).get(op, {}).get(stage, {}).get(dtype, {})
    if not by_width:
        return None
    return by_width[str(nearest_measured((int(w) for w in by_width), width))]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _load(name: str, family: str = "norm") -> tuple[ModuleType | None, str]:
    """Imports a backend's module for an op family once and checks it against the family's contract
    (``contract.py``); returns (module or None, reason when missing or unusable)."""
    module, reason = _import(name, family)
    if module is not None:
        broken = unusable_reason(module, family)
        if broken is not None:
            return None, f"it breaks the backend contract: {broken}"
    return module, reason


def _import(name: str, family: str) -> tuple[ModuleType | None, str]:
    if family not in FAMILIES:
        raise ValueError(f"op family must be one of {FAMILIES}, got {family!r}")
    if name not in _PACKAGE:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "torch":
        return importlib.import_module(f"..eager.{family}", __package__), "plain PyTorch closed forms; any device"
    if name == "triton":
        try:
            module = importlib.import_module(f"..triton.{family}", __package__)
        except Exception as exc:  # ImportError, or triton failing to initialise its driver
            return None, f"triton did not import: {exc}"
        where = "CUDA tensors" + (", and CPU tensors through the interpreter" if _interpreting() else "")
        return module, f"Triton kernels for {where}"
    from ..native import load

    ext, reason = load()
    if ext is None:
        return None, reason
    if name == "cuda":
        if not ext.with_cuda():
            return None, "the native extension was built without CUDA (CPU torch or no nvcc at build time)"
        if not torch.cuda.is_available():
            return None, "no CUDA device is visible"
    return importlib.import_module(f"..native.{family}", __package__), reason


def _runs_on(name: str, device: torch.device) -> bool:
    if name in ("cpu", "cuda"):
        return device.type == name
    return name == "torch" or device.type == "cuda" or _interpreting()


def _auto(device: torch.device, family: str, width: int | None, dtype: torch.dtype | None, op: str | None) -> str:
    if device.type != "cuda":
        return "cpu" if _load("cpu", family)[0] is not None else "torch"
    choice = None
    if family == "norm" and op is not None and width is not None and dtype is not None:
        kind, stage = op.split(".")
        arch = gpu_arch(torch.device("cuda", device.index or 0))
        choice = pick(auto_table(), arch, kind, stage, str(dtype).removeprefix("torch."), width)
    for name in (choice or "triton", "triton", "cuda", "torch"):
        if _load(name, family)[0] is not None:
            return name
    return "torch"


_CHOSEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("ofa_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ops called with ``backend="auto"`` (the default) run on ``name``: an explicit
    ``backend=`` argument (a module's own, ``patch_model(backend=...)``) still wins, and this wins over
    ``OFA_BACKEND``. Nests, is per thread and per async task, and restores what was there on exit."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    token = _CHOSEN.set(name)
    try:
        yield
    finally:
        _CHOSEN.reset(token)


def resolve(backend: str, device: torch.device, family: str = "norm", width: int | None = None,
            dtype: torch.dtype | None = None, op: str | None = None) -> ModuleType:
    """Returns the backend module that runs ``family``'s ops for tensors on ``device``: rows of ``width``
    in ``dtype``, for ``op`` ("rms.fwd", "layer.bwd_bwd", ...; the measured table's key).

    ``backend="auto"`` takes ``use_backend``'s choice, else ``OFA_BACKEND``, else the automatic one.
    The decision is cached per (argument, that choice, device, family, width, dtype, op): one
    dictionary lookup per call once made (the choice is read on every call, so changing it takes
    effect). Stages may run on different backends: they share one contract (ops/norm.py)."""
    env = (_CHOSEN.get() or os.environ.get("OFA_BACKEND", "auto")) if backend == "auto" else ""
    return _resolve(backend, env, device, family, width, dtype, op)


@functools.lru_cache(maxsize=4096)
def _resolve(backend: str, env: str, device: torch.device, family: str, width: int | None,
             dtype: torch.dtype | None, op: str | None) -> ModuleType:
    name = backend if backend != "auto" else env or "auto"
    if name == "auto":
        name = _auto(device, family, width, dtype, op)
    module, reason = _load(name, family)
    if module is None:
        raise RuntimeError(f"backend {name!r} was requested but is not available: {reason}")
    if not _runs_on(name, device):
        raise RuntimeError(
            f"backend {name!r} cannot run on {device.type} tensors ("
            + ("it is the compiled extension for that device only)" if name in ("cpu", "cuda") else
               "Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors)"))
    return module


def backends() -> dict[str, dict[str, object]]:
    """What each backend is, whether it is available here, and why not."""
    report = {}
    for name in BACKEND_NAMES[1:]:
        module, reason = _load(name)
        report[name] = {"available": module is not None, "detail": reason}
    measured = f"measured for {', '.join(sorted(auto_table()))}" if auto_table() else "nothing measured yet: triton"
    report["auto"] = {
        "available": True,
        "detail": "CPU tensors: cpu if built, else torch; CUDA tensors: triton or cuda by a measured table "
                  f"per GPU, op, stage, dtype and width ({measured}); OFA_BACKEND overrides",
    }
    return report
