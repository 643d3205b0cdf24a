"""Adapter files: the adapted norm weights as safetensors with what they belong to.

Metadata: ``base_model`` (a name or path), ``base_hash`` (sha256 of the base model's norm weights,
see ``weights_hash``), ``task``, ``options`` (JSON), ``library_version``. Written atomically.
``load_adapter`` refuses a file whose stored options do not check (types, then ``AdaptOptions.check``)
or whose tensors are not finite floating-point values, a model whose norm names or shapes differ, or
whose current norm weights are not the base the adapter was trained from. Adapters of the PEFT baselines (arms "lora", "ia3")
hold the adapter layers' weights; loading one injects those layers first.

``load_adapter`` also reads a PEFT ``LNTuningConfig`` adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes it, see ``export.export_peft``):
its norm weights are loaded the same way. Such a folder names no task and no base-weights hash, so
those two checks are skipped for it; names and shapes are still checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .. import _version
from .anatomy import norm_parameters
from .baselines import attach
from .files import atomic_path, read_json
from .options import KEYED_WHEN_SET, PEFT_ARMS, AdaptOptions, AdaptResult
from ..patch import fusable_norm_parameters, patch_model


FORMAT = "ofa_kernels.adapter/1"
PEFT_LN_TUNING_FORMAT = "peft/LN_TUNING"
PEFT_PREFIX = "base_model.model."  # PEFT's key layout: base_model.model.<module>[.ln_tuning_layers.<adapter>].<param>
PEFT_LAYER = ".ln_tuning_layers."


def peft_key(name: str, norm_tuning: bool, adapter: str = "default") -> str:
    """The key PEFT gives parameter ``name`` (``<module>.<param>``): a LoRA / IA3 layer's as it is under
    the prefix, a norm's (LN tuning) inside its ``ln_tuning_layers.<adapter>`` copy."""
    if not norm_tuning:
        return PEFT_PREFIX + name
    module, param = name.rsplit(".", 1)
    return f"{PEFT_PREFIX}{module}{PEFT_LAYER}{adapter}.{param}"


def weights_hash(params: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and fp32 values of norm parameters (identifies a base model).

    Sharded (FSDP2) parameters are gathered, so every rank must call it with the same names."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = distributed.full(params[name]).detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_adapter(result: AdaptResult, path: str | Path, *, base_model: str, task: str) -> Path:
    from safetensors.torch import save_file

    metadata = {"base_model": base_model, "base_hash": result.base_hash, "task": task,
                "options": json.dumps(dataclasses.asdict(result.options.resolved()), sort_keys=True),
                "library_version": _version.__version__, "format": FORMAT}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in result.weights.items()}, str(tmp), metadata=metadata)
    return Path(path)


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    """The adapter's metadata (reads only the file's header, or a PEFT folder's config); clear errors for a
    missing, corrupt or foreign file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        return _peft_metadata(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an ofa_kernels adapter (format {meta.get('format')!r})")
    return meta


def _peft_metadata(folder: Path) -> dict[str, str]:
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"adapter folder {folder} has no adapter_config.json (expected a PEFT adapter folder)")
    config = read_json(config_path)
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind != "LN_TUNING":
        raise ValueError(f"adapter folder {folder} holds a PEFT {kind!r} adapter; ofa_kernels loads PEFT LN_TUNING "
                         "folders (norm weights) only")
    if not (folder / "adapter_model.safetensors").is_file():
        raise ValueError(f"adapter folder {folder} has no adapter_model.safetensors")
    _check_peft_config(config_path, config)
    return {"format": PEFT_LN_TUNING_FORMAT, "target_modules": json.dumps(config.get("target_modules")), "base_model": str(config.get("base_model_name_or_path") or ""),
            "task": "", "base_hash": "", "options": "{}", "library_version": str(config.get("peft_version", ""))}


def _check_peft_config(config_path: Path, config: dict) -> None:
    """An LN_TUNING config this version reads whole: no key PEFT's ``LNTuningConfig`` does not have (a
    setting silently ignored would change what was trained), ``target_modules`` a name, a list of
    names or null, and nothing in ``modules_to_save`` (weights outside the norms)."""
    try:
        from peft import LNTuningConfig

        known = {f.name for f in dataclasses.fields(LNTuningConfig)}
    except ImportError:  # PEFT absent: the keys its 0.22 LNTuningConfig has
        known = {"auto_mapping", "base_model_name_or_path", "exclude_modules", "inference_mode", "modules_to_save",
                 "peft_type", "peft_version", "revision", "target_modules", "task_type"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown} (an LN_TUNING config has {sorted(known)}); a setting "
                         "this version would ignore is refused, not dropped")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))):
        raise ValueError(f"{config_path}: target_modules must be a module name, a list of names or null, got {targets!r}")
    if config.get("modules_to_save"):
        raise ValueError(f"{config_path}: modules_to_save {config['modules_to_save']!r} holds weights outside the "
                         "norms, which ofa_kernels does not load")


def _targeted(module: str, targets) -> bool:
    """PEFT's rule: a name is a regular expression matched whole; a list matches a module whose name is,
    or ends with ``.`` and, one of its entries."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _peft_name(key: str) -> str | None:
    """``base_model.model.<module>.ln_tuning_layers[.<adapter>].<param>`` -> ``<module>.<param>``."""
    if not key.startswith(PEFT_PREFIX) or PEFT_LAYER not in key:
        return None
    module, _, rest = key[len(PEFT_PREFIX):].partition(PEFT_LAYER)
    return f"{module}.{rest.rsplit('.', 1)[-1]}"


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by parameter name, metadata) of an adapter file or a PEFT LN_TUNING folder."""
    from safetensors import SafetensorError, safe_open

    meta = read_adapter_metadata(path)
    peft = meta["format"] == PEFT_LN_TUNING_FORMAT
    file = Path(path) / "adapter_model.safetensors" if peft else Path(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: its tensors cannot be read ({exc})") from None
    if not peft:
        return tensors, meta
    weights = {}
    targets = json.loads(meta.get("target_modules", "null"))
    for key, t in tensors.items():
        name = _peft_name(key)
        if name is None:
            raise ValueError(f"adapter folder {path}: tensor {key!r} is not an LN tuning weight")
        module = name.rsplit(".", 1)[0]
        if not _targeted(module, targets):
            raise ValueError(f"adapter folder {path}: tensor {key!r} is for module {module!r}, which the config's "
                             f"target_modules {targets!r} does not name; the config and the weights disagree")
        weights[name] = t
    return weights, meta


def _field_types(field: dataclasses.Field) -> tuple[type, ...]:
    """The JSON value types an ``AdaptOptions`` field takes, from its default (None where it may be None)."""
    default = field.default
    optional = "None" in str(field.type)
    if isinstance(default, bool) or str(field.type).startswith("bool"):
        kinds: tuple[type, ...] = (bool,)
    elif isinstance(default, int) or str(field.type).startswith("int"):
        kinds = (int,)
    elif isinstance(default, float) or str(field.type).startswith("float"):
        kinds = (int, float)
    else:
        kinds = (str,)
    return kinds + ((type(None),) if optional or default is None else ())


def adapter_options(meta: dict[str, str], path: str | Path = "the adapter") -> AdaptOptions:
    """The training options stored with an adapter, checked (types, then ``AdaptOptions.check``); fields
    this version does not know are ignored. A bad value is a ValueError naming the file and the field."""
    fields = {f.name: f for f in dataclasses.fields(AdaptOptions)}
    try:
        stored = json.loads(meta.get("options", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the stored options are not JSON ({exc})") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: the stored options must be a JSON object, got {type(stored).__name__}")
    for name, value in stored.items():
        if name in fields:
            kinds = _field_types(fields[name])
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"{path}: stored option {name} must be {' or '.join(k.__name__ for k in kinds)}, "
                                 f"got {value!r}")
    try:
        # a field the adapter predates had, when it was written, the value runs had before the field existed
        return AdaptOptions(**{**KEYED_WHEN_SET, **{k: v for k, v in stored.items() if k in fields}}).check()
    except ValueError as exc:
        raise ValueError(f"{path}: stored options: {exc}") from None


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_values(weights: dict[str, torch.Tensor], path) -> None:
    """Floating-point, finite tensors only: an all-NaN adapter used to load and score chance silently."""
    for name, t in weights.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"adapter {path}: {name} is {t.dtype}; adapters hold floating-point weights")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"adapter {path}: {name} holds {bad} non-finite value(s) (NaN or Inf)")


def _check_fit(weights: dict[str, torch.Tensor], params: dict[str, nn.Parameter], path) -> None:
    missing, extra = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
    if missing or extra:
        raise ValueError(f"adapter {path} does not fit this model: parameters only in the adapter {missing[:5]}, "
                         f"only in the model {extra[:5]}")
    for name, t in weights.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"adapter {path}: {name} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")


def _check_peft_fit(model: nn.Module, weights: dict[str, torch.Tensor], options: AdaptOptions, path) -> None:
    """Every PEFT layer of the adapter sits on a Linear of the model with matching features, and a LoRA
    layer's rank is the stored ``rank`` (checked before any layer is built: a forged rank would size them)."""
    arm = options.arm
    marker = ".lora_" if arm == "lora" else ".ia3_"
    modules = dict(model.named_modules())
    for name, t in weights.items():
        owner = name.split(marker, 1)[0]
        target = modules.get(owner)
        target = getattr(target, "base_layer", target)  # already injected: the wrapped Linear
        if marker not in name or not isinstance(target, nn.Linear):
            raise ValueError(f"adapter {path}: {name} belongs to no Linear layer of this model")
        features = {"lora_A": t.shape[-1] == target.in_features, "lora_B": t.shape[0] == target.out_features}
        part = name.split(marker, 1)[1].split(".", 1)[0]
        ok = features.get(f"lora_{part}", t.numel() in (target.in_features, target.out_features))
        if not ok:
            raise ValueError(f"adapter {path}: {name} has shape {tuple(t.shape)}, which does not fit {owner} "
                             f"({target.in_features} -> {target.out_features})")
        if arm == "lora" and t.dim() == 2 and part in ("A", "B"):
            rank = t.shape[0] if part == "A" else t.shape[1]
            if rank != options.rank:
                raise ValueError(f"adapter {path}: {name} has rank {rank}, but its options say rank {options.rank}")


def check_adapter_file(path: str | Path) -> dict[str, str]:
    """Everything about an adapter that needs no model: the file, its stored options and its tensors
    (floating-point, finite); returns its metadata. The CLI runs it before any model loads."""
    weights, meta = read_adapter(path)
    adapter_options(meta, path)
    _check_values(weights, path)
    return meta


def checked_adapter(model: nn.Module, path: str | Path, *, task: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str], AdaptOptions]:
    """(weights, metadata, options) of an adapter that fits ``model``; the model is not changed.

    Checks the file, the stored options (types and ranges), the tensors (floating-point, finite),
    ``task`` (when given and the adapter names one) against the adapter's, the base model (norm
    weights hash, when the adapter has one), names and shapes, and a LoRA adapter's rank.
    """
    weights, meta = read_adapter(path)
    options = adapter_options(meta, path)
    _check_values(weights, path)
    if task is not None and meta.get("task") and meta["task"] != task:
        raise ValueError(f"adapter {path} was trained on task {meta.get('task')!r}, not {task!r}")
    params = fusable_norm_parameters(model)
    if options.arm in PEFT_ARMS:
        _check_peft_fit(model, weights, options, path)
    else:
        _check_fit(weights, params, path)
    if meta.get("base_hash") and weights_hash(params) != meta["base_hash"]:
        raise ValueError(f"adapter {path} was trained from another base model ({meta.get('base_model')!r}): the "
                         "norm weights of this model differ from its base (load it into the original model)")
    return weights, meta, options


def load_adapter(model: nn.Module, path: str | Path, *, task: str | None = None) -> dict[str, str]:
    """Loads an adapter (norm weights, or a PEFT baseline's layers) into ``model``; returns its metadata.

    ``path`` is an adapter file written by ``save_adapter`` or a PEFT LN_TUNING folder. Everything is
    checked first (``checked_adapter``); then the norms are patched (and a PEFT baseline's layers
    injected) and the weights copied in.
    """
    weights, meta, options = checked_adapter(model, path, task=task)
    patch_model(model)
    params = norm_parameters(model)
    if options.arm in PEFT_ARMS:
        params = attach(model, options.arm, options.rank)
    _check_fit(weights, params, path)
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t.to(params[name].dtype))
    return meta
