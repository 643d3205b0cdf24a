"""Adapter files: the adapted norm weights as safetensors with what they belong to.

Metadata: ``base_model`` (a name or path), ``base_hash`` (sha256 of the base model's norm weights,
see ``trainer.weights_hash``), ``task``, ``options`` (JSON), ``library_version``. Written atomically.
``load_adapter`` refuses a model whose norm names or shapes differ, or whose current norm weights
are not the base the adapter was trained from. Adapters of the PEFT baselines (arms "lora", "ia3")
hold the adapter layers' weights; loading one injects those layers first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .baselines import PEFT_ARMS, attach
from .files import atomic_path
from .patch import patch_model
from .anatomy import norm_parameters
from .trainer import AdaptOptions, AdaptResult, weights_hash


def save_adapter(result: AdaptResult, path: str | Path, *, base_model: str, task: str) -> Path:
    from safetensors.torch import save_file

    from . import __version__

    metadata = {"base_model": base_model, "base_hash": result.base_hash, "task": task,
                "options": json.dumps(dataclasses.asdict(result.options), sort_keys=True),
                "library_version": __version__, "format": "ofa_kernels.adapter/1"}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in result.weights.items()}, str(tmp), metadata=metadata)
    return Path(path)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _check_fit(weights: dict[str, torch.Tensor], params: dict[str, nn.Parameter], path) -> None:
    missing, extra = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
    if missing or extra:
        raise ValueError(f"adapter {path} does not fit this model: parameters only in the adapter {missing[:5]}, "
                         f"only in the model {extra[:5]}")
    for name, t in weights.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"adapter {path}: {name} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Patches ``model``'s norms and loads the adapter (norm weights, or a PEFT baseline's layers) into
    it; returns the adapter's metadata."""
    weights, meta = read_adapter(path)
    if meta.get("format") != "ofa_kernels.adapter/1":
        raise ValueError(f"{path} is not an ofa_kernels adapter (format {meta.get('format')!r})")
    known = {f.name for f in dataclasses.fields(AdaptOptions)}
    options = AdaptOptions(**{k: v for k, v in json.loads(meta.get("options", "{}")).items() if k in known})
    patch_model(model)
    params = norm_parameters(model)
    if options.arm not in PEFT_ARMS:
        _check_fit(weights, params, path)
    if weights_hash(params) != meta.get("base_hash"):
        raise ValueError(f"adapter {path} was trained from another base model ({meta.get('base_model')!r}): the "
                         "norm weights of this model differ from its base (load it into the original model)")
    if options.arm in PEFT_ARMS:
        params = attach(model, options)
        _check_fit(weights, params, path)
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t.to(params[name].dtype))
    return meta
