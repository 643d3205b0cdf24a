"""Adapted models out of ofa_kernels, for whoever serves Hugging Face models.

``export_hf`` writes a complete Hugging Face model folder with the adapted weights merged (norm
weights replaced; LoRA/IA3 baselines folded into their Linear layers), so
``AutoModelForCausalLM.from_pretrained(folder)`` gives the adapted model at no inference cost.
``export_peft`` writes a PEFT adapter folder that ``PeftModel.from_pretrained(base, folder)`` loads:
an ``LNTuningConfig`` adapter for the norm arms (PEFT's own method for tuning exactly these
weights), a LoRA or IA3 adapter for those baselines. Both check the adapter against the base model
first (``adapters.checked_adapter``) and write the folder atomically: it appears whole or not at all.
The merged folder keeps the base model's dtype (a bf16 base gets bf16 norms; the adapter's fp32
values are rounded once).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .adapters import checked_adapter, load_adapter, peft_key
from .baselines import peft_config
from .options import PEFT_ARMS
from .files import atomic_dir
from ..patch import unpatch_model


def _base(model: nn.Module | str | Path, tokenizer):
    """(model, tokenizer): a loaded model as given, or a name/folder loaded in its stored dtype."""
    if isinstance(model, nn.Module):
        return model, tokenizer
    from .models import MODELS, load_model

    if str(model) not in MODELS and not Path(model).is_dir():
        raise FileNotFoundError(f"model: {model} is not a folder (expected one of {sorted(MODELS)} or a Hugging Face "
                                "model folder)")
    if tokenizer is None and str(model) not in MODELS and not _has_tokenizer(Path(model)):
        warnings.warn(f"{model} holds no tokenizer files: the exported folder has none either", stacklevel=3)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model, dtype="auto").eval(), None
    loaded, loaded_tokenizer = load_model(str(model), dtype="auto")
    return loaded, tokenizer if tokenizer is not None else loaded_tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                      "vocab.json"))


def _fold_peft_layers(model: nn.Module) -> None:
    """Merges every injected LoRA/IA3 layer into the layer it wraps, and puts that layer back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            model.set_submodule(name, module.get_base_layer())


def export_hf(model: nn.Module | str | Path, adapter: str | Path, out: str | Path, *, tokenizer=None) -> Path:
    """Writes ``model`` with ``adapter`` merged as a Hugging Face model folder at ``out``; returns ``out``.

    ``model`` is the base model (a loaded ``PreTrainedModel``, which is adapted in place, or a name or
    folder, loaded here in its stored dtype); the tokenizer, when given or loaded, is saved beside it.
    """
    model, tokenizer = _base(model, tokenizer)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    with atomic_dir(out) as tmp:
        load_adapter(model, adapter)
        _fold_peft_layers(model)
        unpatch_model(model)  # the model's own norm classes again, holding the adapted weights
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def export_peft(model: nn.Module | str | Path, adapter: str | Path, out: str | Path, *,
                base_model: str | None = None) -> Path:
    """Writes ``adapter`` as a PEFT adapter folder at ``out`` for the base ``model``; returns ``out``.

    ``base_model`` is recorded as the folder's ``base_model_name_or_path`` (default: ``model`` when it
    is a name or folder, else the adapter's own record). A loaded ``model`` is returned to its base
    state afterwards.
    """
    from peft import get_peft_model

    if base_model is None and not isinstance(model, nn.Module):
        from .models import MODELS, model_folder

        base_model = str(model_folder(str(model))) if str(model) in MODELS else str(model)  # a folder PEFT can load
    model, _ = _base(model, None)
    unpatch_model(model)  # PEFT wraps the model's own norm classes, which every user has
    weights, meta, options = checked_adapter(model, adapter)
    if options.arm in PEFT_ARMS:
        config = peft_config(options.arm, options.rank)
        names = {name: peft_key(name, norm_tuning=False) for name in weights}
    else:
        modules = sorted({name.rsplit(".", 1)[0] for name in weights})
        from peft import LNTuningConfig

        config = LNTuningConfig(target_modules=modules)
        names = {name: peft_key(name, norm_tuning=True) for name in weights}
    peft_model = get_peft_model(model, config)
    # set after get_peft_model, which fills it from the model's config (empty for a model built in memory)
    peft_model.peft_config["default"].base_model_name_or_path = base_model or meta.get("base_model") or None
    try:
        params = dict(peft_model.named_parameters())
        missing = sorted(name for name, target in names.items() if target not in params)
        if missing:
            raise ValueError(f"PEFT placed no {options.arm} weight for {missing[:3]} in this model")
        with torch.no_grad():
            for name, t in weights.items():
                params[names[name]].copy_(t.to(params[names[name]].dtype))
        with atomic_dir(out) as tmp:
            peft_model.save_pretrained(tmp)
    finally:
        peft_model.unload()  # the base model's own layers again
    return Path(out)
