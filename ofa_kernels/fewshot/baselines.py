"""PEFT baselines in the OFA harness: LoRA and IA3 adapters, trained with CE by the same trainer.

``attach`` injects the adapter layers into the model in place (``peft.inject_adapter_in_model``,
so the model object, its forward and the evaluation code stay the same) and returns the trainable
parameters by name. Target modules are PEFT's defaults for the model type (LoRA: the attention
query and value projections of Llama; IA3: keys, values and the MLP down projection). LoRA
uses rank ``options.rank`` with ``alpha = 2 * rank`` and no dropout.
"""

from __future__ import annotations

from torch import nn

from .options import PEFT_ARMS


def peft_config(arm: str, rank: int = 1):
    """The PEFT config of the baseline ``arm`` (LoRA of ``rank``, alpha 2 * rank; IA3)."""
    from peft import IA3Config, LoraConfig

    if arm == "lora":
        return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
    if arm == "ia3":
        return IA3Config()
    raise ValueError(f"arm must be one of {PEFT_ARMS} for a PEFT baseline, got {arm!r}")


def attach(model: nn.Module, arm: str, rank: int = 1) -> dict[str, nn.Parameter]:
    """Injects ``arm``'s adapter (LoRA of ``rank``, or IA3) into ``model``; returns its trainable parameters by name."""
    try:
        from peft import inject_adapter_in_model
    except ImportError as exc:
        raise ImportError("the lora and ia3 baselines need peft: pip install peft") from exc
    config = peft_config(arm, rank)
    if getattr(model, "config", None) is None:
        raise ValueError("PEFT baselines need a Hugging Face model (with .config) to pick target modules")
    if arm == "lora":
        _check_rank(model, config, rank)
    inject_adapter_in_model(config, model)
    marker = "lora_" if arm == "lora" else "ia3_"
    params = {n: p for n, p in model.named_parameters() if marker in n}
    if not params:
        raise ValueError(f"PEFT found no {arm} target modules in {type(model).__name__}")
    for p in params.values():
        p.requires_grad_(True)
    return params


def _check_rank(model: nn.Module, config, rank: int) -> None:
    """Refuses, before any adapter memory is allocated, a LoRA rank above the narrowest side of the
    layers it would adapt (the update's rank cannot exceed it)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

    names = config.target_modules or targets.get(getattr(model.config, "model_type", ""), ())
    widths = [min(m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in names)]
    if widths and rank > min(widths):
        raise ValueError(f"rank {rank} is above the narrowest layer LoRA adapts here ({min(widths)} wide): its "
                         f"update cannot have a higher rank; use --rank {min(widths)} or less")
